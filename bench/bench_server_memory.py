"""Server peak RSS while it builds the global model, aggregates site results and writes the HF directory.

    .venv/bin/python bench/bench_server_memory.py                           # ~370 MB exchanged, 5 rounds
    .venv/bin/python bench/bench_server_memory.py --vocab 151936 --layers 3   # real vocab: ~390 MB exchanged

Target: server peak RSS during aggregation at most 2x the exchanged bytes.

The script builds a Qwen3-VL checkpoint large enough for the ratio to mean something (text hidden 1024,
12 layers, a 32,768-token vocabulary, a small vision tower; bf16 safetensors), then measures in a fresh
child process, after its imports (the baseline). The vocabulary is cut so that the largest tensor (the
embedding) is 18 % of the message, as in Qwen3-VL-2B (593.5 of 3473.8 MiB): peaks that read results one
tensor at a time depend on that share; with the real vocabulary at this width it is 80 %.

1. ``GlobalModel(...)``: the server's global model, read from the safetensors without building the model;
2. per round: NVFlare's ``WeightedAggregationHelper`` over ``--sites`` simulated results (fresh bf16
   tensors, one result alive at a time, as FedAvg's in-time aggregation receives them), then
   ``write_hf_directory`` and ``torch.save`` of ``{"model": global}`` (what the persistor writes).

Peaks come from the kernel's high-water mark (VmHWM), reset before each phase through
``/proc/self/clear_refs``, so every phase and every round has its own peak. RSS counts file-backed
pages too: GlobalModel's tensors are mmaps of the base safetensors (safetensors hands them out without
a copy), resident once read. Four server variants run:

* ``as is``: the GlobalModel object keeps the tensors it was built with, as GlobalModelPersistor's
  ``self.model`` does for the whole job;
* ``initial released``: the GlobalModel's tensors are dropped once handed over (proposed fix);
* ``released + cleanup``: also NVFlare's ``cleanup_memory()`` (gc + malloc_trim) after every round, what
  ``FedAvgRecipe(server_memory_gc_rounds=1)`` does: glibc keeps freed tensors of a few MB in its heap;
* ``released + cleanup + per-tensor results``: also, each site result is read one tensor at a time
  inside the helper (``materialize()``), as NVFlare's ``enable_tensor_disk_offload`` delivers results
  (simulated: the memory effect of reading one tensor from disk, without NVFlare's streaming stack).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: the package lives at the repo root
MB = 10**6
TARGET_RATIO = 2.0
SITE_STEPS = (10, 20, 30)  # NUM_STEPS_CURRENT_ROUND of each simulated site: FedAvg's weights


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="Text hidden size.")
    parser.add_argument("--layers", type=int, default=12, help="Text decoder layers.")
    parser.add_argument("--vocab", type=int, default=32768, help="Vocabulary (Qwen3-VL: 151936).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--work_dir", default="", help="Where the checkpoint is built (default: temp)")
    parser.add_argument(
        "--child", default="", help=argparse.SUPPRESS
    )  # variant name: measure in this process
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- memory readings (Linux /proc)


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024 / MB


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next reading is this phase's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# --------------------------------------------------------------------------- the checkpoint


def checkpoint_dir(args) -> Path:
    return Path(args.work_dir) / f"checkpoint-h{args.hidden}-l{args.layers}-v{args.vocab}"


def build_checkpoint(args, out: Path) -> Path:
    """A bf16 Qwen3-VL checkpoint whose exchanged tensors weigh a few hundred MB."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if (out / "config.json").is_file():
        return out
    heads = args.hidden // 128
    text = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=128, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20]},
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=args.hidden, num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )  # fmt: skip
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- child: the measured server

VARIANTS = ("as is", "initial released", "released + cleanup", "released + cleanup + per-tensor results")


class LazyTensor:
    """A received tensor that is read on demand, one at a time (NVFlare's enable_tensor_disk_offload hands
    WeightedAggregationHelper such refs; ``materialize()`` reads one tensor from disk into fresh memory)."""

    def __init__(self, source, offset: float):
        self.source, self.offset = source, offset

    def materialize(self):
        return self.source.clone().add_(self.offset)


def received(global_state: dict, site: int, lazy: bool) -> dict:
    """A site's result as the server holds it after decoding: fresh bf16 tensors (global + an offset)."""
    offset = 0.01 * (site + 1)
    if lazy:
        return {name: LazyTensor(t, offset) for name, t in global_state.items()}
    return {name: t.clone().add_(offset) for name, t in global_state.items()}


def aggregate(global_state: dict, num_sites: int, round_index: int, lazy: bool) -> dict:
    """FedAvg's in-time aggregation: each result is added, then dropped, before the next arrives."""
    from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

    helper = WeightedAggregationHelper()
    for site in range(num_sites):
        result = received(global_state, site, lazy)
        helper.add(result, SITE_STEPS[site % len(SITE_STEPS)], f"site-{site + 1}", round_index)
        del result
    return helper.get_result()


def check_average(name: str, before, after: dict, num_sites: int) -> None:
    """Sanity: the aggregate is the step-weighted mean of the sites' offsets (bf16 tolerance)."""
    weights = [SITE_STEPS[s % len(SITE_STEPS)] for s in range(num_sites)]
    offset = sum(w * 0.01 * (s + 1) for s, w in enumerate(weights)) / sum(weights)
    delta = (after[name].float() - before.float()).mean().item()
    assert abs(delta - offset) < 0.01, f"{name}: mean change {delta:.4f}, expected {offset:.4f}"


def write_outputs(state: dict, model_config, out: Path) -> None:
    """What GlobalModelPersistor.save_model writes every round."""
    import torch

    from qwen3vl_sft.model.checkpoints import write_hf_directory

    torch.save({"model": state}, out / "FL_global_model.pt")
    write_hf_directory(state, model_config, out / "global_model_hf")


def warm_imports() -> None:
    """Everything the measured code imports lazily, so that the baseline holds the code, not the data."""
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper  # noqa: F401
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration  # noqa: F401

    import qwen3vl_sft.fl.server  # noqa: F401
    import qwen3vl_sft.model.checkpoints  # noqa: F401
    import qwen3vl_sft.model.modeling  # noqa: F401


def emit(**row) -> None:
    row.update(rss=status_mb("VmRSS"), anon=status_mb("RssAnon"))
    print(json.dumps(row), flush=True)


def run_rounds(args, server_model, model_config, out: Path) -> None:
    from nvflare.fuel.utils.memory_utils import cleanup_memory

    current = server_model.state_dict()  # the round loop's global model (the same tensors, no copy)
    if args.child != "as is":
        server_model.load_state_dict({})  # the persistor would drop its copy once the round loop owns it
    lazy = "per-tensor" in args.child
    probe = min(current, key=lambda n: current[n].numel())
    for round_index in range(args.rounds):
        before = current[probe].clone()
        reset_peak()
        current = aggregate(current, args.sites, round_index, lazy)  # the old global is dropped here,
        aggregation_peak = status_mb("VmHWM")  # as FedAvg's update_model drops it
        check_average(probe, before, current, args.sites)
        reset_peak()
        write_outputs(current, model_config, out)
        if "cleanup" in args.child:
            cleanup_memory()  # gc.collect + malloc_trim: what FedAvgRecipe(server_memory_gc_rounds=1) runs
        emit(phase=f"round {round_index + 1}", aggregate=aggregation_peak, write=status_mb("VmHWM"))


def child(args) -> None:
    """Runs in a fresh process: prints one JSON line per phase for the parent."""
    warm_imports()
    from qwen3vl_sft.config import ModelConfig
    from qwen3vl_sft.fl.server import GlobalModel
    from qwen3vl_sft.model.weights import message_bytes

    ckpt = checkpoint_dir(args)
    emit(phase="baseline")
    reset_peak()
    server_model = GlobalModel({"model_name_or_path": str(ckpt)})
    emit(phase="GlobalModel", peak=status_mb("VmHWM"), bytes=message_bytes(server_model.state_dict()))
    with tempfile.TemporaryDirectory(dir=args.work_dir) as out:  # ~2x the checkpoint per variant
        run_rounds(args, server_model, ModelConfig(model_name_or_path=str(ckpt)), Path(out))


# --------------------------------------------------------------------------- parent: run and report


def run_child(args, variant: str) -> list[dict]:
    command = [sys.executable, os.path.abspath(__file__), "--child", variant, "--work_dir", args.work_dir]
    for flag in ("hidden", "layers", "vocab", "rounds", "sites"):
        command += [f"--{flag}", str(getattr(args, flag))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{variant}: child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def print_variant(variant: str, rows: list[dict]) -> None:
    base, built = rows[0], rows[1]
    size = built["bytes"] / MB

    def ratio(mb: float, key: str = "rss") -> str:
        return f"{(mb - base[key]) / size:>6.2f}"

    print(f"\n[{variant}] baseline after imports: RSS {base['rss']:.0f} MB (anon {base['anon']:.0f} MB); "
          f"exchanged tensors {size:.1f} MB (bf16)")  # fmt: skip
    print(f"{'phase':<12} {'peak MB':>8} {'ratio':>6} | {'agg':>6} {'write':>6} | {'held MB':>8} {'ratio':>6} "
          f"{'anon':>6}")  # fmt: skip
    print(f"{'GlobalModel':<12} {built['peak']:>8.0f} {ratio(built['peak'])} | {'':>6} {'':>6} | "
          f"{built['rss']:>8.0f} {ratio(built['rss'])} {ratio(built['anon'], 'anon')}")  # fmt: skip
    for row in rows[2:]:
        peak = max(row["aggregate"], row["write"])
        print(f"{row['phase']:<12} {peak:>8.0f} {ratio(peak)} | {ratio(row['aggregate'])} {ratio(row['write'])} | "
              f"{row['rss']:>8.0f} {ratio(row['rss'])} {ratio(row['anon'], 'anon')}")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        args.work_dir = args.work_dir or tmp
        build_checkpoint(args, checkpoint_dir(args))
        results = {variant: run_child(args, variant) for variant in VARIANTS}
    print(f"Qwen3-VL text hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.sites} sites, "
          f"{args.rounds} rounds; target: peak ratio <= {TARGET_RATIO:.0f}")  # fmt: skip
    for variant, rows in results.items():
        print_variant(variant, rows)
    print("\nratio = (MB - baseline) / exchanged MB; agg / write = the peak's ratio while aggregating / while "
          "writing FL_global_model.pt + global_model_hf; held = RSS between rounds (anon: its anonymous part, "
          "i.e. without file-backed pages such as safetensors mmaps)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
