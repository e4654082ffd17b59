"""Qwen3-VL-2B at its real dimensions on CPU: one federated LoRA round through job.py, then run_inference.py.

    .venv/bin/python bench/bench_real_dims.py --work_dir /tmp/real_dims      # CPU, no download

1. writes Qwen3-VL-2B-Instruct's exact configuration with random bf16 weights and the qwen-ids tokenizer
   (``python -m qwen3vl_sft.model.tiny --variant real-dims``: 28 layers, 151,936 vocabulary; 4.3 GB; a rerun
   with the same ``--work_dir`` reuses it);
2. writes a synthetic PubMedVision set in its realistic mode (paragraph answers, varied images) and
   shards it for one site with ``prepare_data.py``;
3. runs ``job.py`` in NVFlare's simulator: 1 site, 1 round, ``--lora true`` (ModelConfig's defaults,
   r 64 / alpha 128 on q/k/v/o), ``--max_steps`` steps, validation on the site's val.json;
4. runs ``run_inference.py`` on the global adapter against its base (base vs fine-tuned).

Prints, per phase: wall seconds, the peak memory of the phase's whole process tree (psutil, sampled every
0.25 s: the sum of PSS over processes alive at the same moment) and the largest RSS of one process in it;
for the round, the site's seconds per step as
its trainer measured them; and the global adapter as saved by the server, its tensor count and bf16
bytes beside ``bench_exchange.py``'s LoRA r64 count (224 tensors, 51,380,224 bytes), which it must equal.
Exit code 1 when a phase fails or the adapter differs from that count.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the package lives at the repo root

GIB = 2**30
LORA_R64_TENSORS, LORA_R64_BYTES = 224, 51_380_224  # bench_exchange.py's "LoRA r64 a128 q/k/v/o" row


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="Checkpoint, data, workspace and reports go here.")
    parser.add_argument("--max_steps", type=int, default=2, help="Optimizer steps of the site's round.")
    parser.add_argument("--num_records", type=int, default=40, help="Synthetic records before sharding.")
    parser.add_argument("--max_samples", type=int, default=4, help="Test records run_inference answers.")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="Tokens per generated answer.")
    parser.add_argument("--json", default="", help="Also write the figures to this JSON file.")
    return parser.parse_args(argv)


class TreePeak(threading.Thread):
    """Peak memory of a process and all its descendants, sampled until :meth:`stop`: the highest sum of
    their PSS (each shared page, such as the mmap of a safetensors file two processes read, counted once
    in total, not once per process as summed RSS would) and the highest RSS of any one of them."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.root, self.interval, self._done = pid, interval, threading.Event()
        self.peak_pss = self.peak_rss = 0

    def sample(self) -> tuple[int, int]:
        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0, 0
        pss, rss = 0, 0
        for proc in procs:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # ended between the listing and the read
            pss, rss = pss + info.pss, max(rss, info.rss)
        return pss, rss

    def run(self):
        while not self._done.wait(self.interval):
            pss, rss = self.sample()
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)

    def stop(self) -> tuple[int, int]:
        self._done.set()
        self.join()
        return self.peak_pss, self.peak_rss


def run_phase(name: str, command: list[str], log: Path) -> dict:
    """Run one command with its output in ``log``; its wall time, rc and the tree's peak RSS."""
    print(f"{name}: {' '.join(command[1:3])} ... (log: {log})", flush=True)
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        peak = TreePeak(proc.pid)
        peak.start()
        rc = proc.wait()
    pss, rss = peak.stop()
    figures = {"rc": rc, "seconds": round(time.monotonic() - start, 1), "peak_tree_pss_gib": pss / GIB,
               "peak_process_rss_gib": rss / GIB}  # fmt: skip
    print(f"  rc {rc}, {figures['seconds']:.0f} s, peak memory of the process tree {pss / GIB:.2f} GiB "
          f"(largest process {rss / GIB:.2f} GiB RSS)", flush=True)  # fmt: skip
    return figures


def python(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def phases(args, work: Path) -> list[tuple[str, list[str]]]:
    from qwen3vl_sft.data.synthetic import DATA_FILE_NAME

    model, data, shards, ws = work / "qwen3-vl-2b-random", work / "data", work / "shards", work / "workspace"
    from qwen3vl_sft.model.tiny import is_built

    out = [] if is_built(model) else [
        ("checkpoint", python("-m", "qwen3vl_sft.model.tiny", "--output", model, "--variant", "real-dims"))]  # fmt: skip
    out += [
        ("data", python("-m", "qwen3vl_sft.data.synthetic", "--output", data, "--num_records", args.num_records,
                        "--realistic")),
        ("shards", python("prepare_data.py", "--data_file", data / DATA_FILE_NAME,
                          "--output_dir", shards, "--num_sites", 1)),
        ("round", python("job.py", "--model_name_or_path", model, "--data_dir", shards, "--num_sites", 1,
                         "--num_rounds", 1, "--lora", "true", "--max_steps", args.max_steps,
                         "--per_device_train_batch_size", 1, "--val_max_new_tokens", 4, "--workspace", ws)),
    ]  # fmt: skip
    return out


def global_adapter(work: Path) -> Path:
    found = sorted((work / "workspace").glob("**/global_model_hf/adapter_model.safetensors"))
    if not found:
        raise FileNotFoundError(f"no global adapter under {work / 'workspace'}: see the round's log")
    return found[0]


def adapter_figures(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118 - not a dict
    return {"tensors": len(shapes), "bf16_bytes": 2 * sum(math.prod(s) for s in shapes.values())}


def site_step_seconds(work: Path) -> dict:
    from qwen3vl_sft.fl.summary import read_site_metrics

    rows = read_site_metrics(str(work / "workspace"))
    row = rows[0] if rows else {}
    steps = row.get("steps", 0)
    return {"steps": steps, "train_seconds": row.get("seconds"), "val_seconds": row.get("val_seconds"),
            "s_per_step": row["seconds"] / steps if steps else None, "sent_mib": row.get("sent_mib")}  # fmt: skip


def inference_phase(args, work: Path, adapter: Path) -> tuple[str, list[str]]:
    return ("inference", python("run_inference.py", "--model_path", adapter.parent, "--data_file",
                                work / "shards" / "test.json", "--max_samples", args.max_samples,
                                "--max_new_tokens", args.max_new_tokens, "--output_dir", work / "inference"))  # fmt: skip


def inference_losses(report_json: Path) -> dict[str, float]:
    """{label: loss} of run_inference.py's report (base and fine-tuned on the same test records)."""
    rows = json.loads(report_json.read_text())["checkpoints"]
    return {row["label"]: row["loss"] for row in rows}


def report(figures: dict) -> None:
    print(f"\n{'phase':<12} {'rc':>3} {'seconds':>8} {'tree PSS GiB':>13} {'max process RSS GiB':>20}")
    for name, f in figures["phases"].items():
        print(
            f"{name:<12} {f['rc']:>3} {f['seconds']:>8.0f} {f['peak_tree_pss_gib']:>13.2f} "
            f"{f['peak_process_rss_gib']:>20.2f}"
        )
    site, adapter = figures.get("site", {}), figures.get("adapter", {})
    if site.get("s_per_step"):
        print(f"\nsite-1: {site['steps']:.0f} steps in {site['train_seconds']:.0f} s = {site['s_per_step']:.1f} s/step "
              f"(validation {site['val_seconds']:.0f} s); sent {site['sent_mib']:.1f} MiB")  # fmt: skip
    if figures.get("inference"):
        losses = ", ".join(f"{label} {loss:.4f}" for label, loss in figures["inference"].items())
        print(f"run_inference.py test loss: {losses}")
    if adapter:
        print(f"global adapter: {adapter['tensors']} tensors, {adapter['bf16_bytes']:,} bytes in bf16; "
              f"bench_exchange LoRA r64: {LORA_R64_TENSORS} tensors, {LORA_R64_BYTES:,} bytes: "
              f"{'equal' if figures['adapter_matches'] else 'DIFFERENT'}")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    figures: dict = {"phases": {}}
    todo = phases(args, work)
    while todo:
        name, command = todo.pop(0)
        figures["phases"][name] = run_phase(name, command, work / "logs" / f"{name}.log")
        if figures["phases"][name]["rc"]:
            break
        if name == "inference":
            figures["inference"] = inference_losses(work / "inference" / "report.json")
        if name == "round":
            adapter = global_adapter(work)
            figures["site"], figures["adapter"] = site_step_seconds(work), adapter_figures(adapter)
            todo.append(inference_phase(args, work, adapter))
    adapter = figures.get("adapter", {})
    figures["adapter_matches"] = (adapter.get("tensors"), adapter.get("bf16_bytes")) == (LORA_R64_TENSORS,
                                                                                           LORA_R64_BYTES)  # fmt: skip
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    failed = any(f["rc"] for f in figures["phases"].values()) or "inference" not in figures["phases"]
    return 1 if failed or not figures["adapter_matches"] else 0


if __name__ == "__main__":
    sys.exit(main())
