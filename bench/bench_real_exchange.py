"""Qwen3-VL-2B-sized messages through a real NVFlare job: transfer rates, server and site memory, timeouts.

    .venv/bin/python bench/bench_real_exchange.py --work_dir /tmp/real_exchange              # sim + PoC
    .venv/bin/python bench/bench_real_exchange.py --work_dir /tmp/real_exchange --env sim --text_layers 2

Runs job.py's FedAvg recipe and persistor (``fl_job.build_recipe`` with the product's timeouts, filters
and ``GlobalModelPersistor``) on a checkpoint of Qwen3-VL-2B-Instruct's exact shapes (``tiny --variant
real-dims``, random bf16 weights; ``--text_layers`` cuts the depth for a quick look), with sites whose
round is "receive, perturb every tensor, send" (``bench/exchange_site.py``), in the simulator and in PoC,
for ``--rounds`` rounds. ``--exchange weights`` sends bf16 weights both ways (3473.8 MiB per message at
28 layers); ``update`` (the product's default) sends coded changes (``--compression``).

Prints, per environment and round: wall time (between the server's "Round N started" lines); NVFlare's
own transfer records (each download transaction's size and seconds, from the server's and the sites' logs)
as MiB/s against a raw loopback TCP copy of the same bytes measured in this run, the physical limit here,
and against NVFlare's own rate for the same message between bare cells, no job (``cell_ceiling.py``);
the server's peak RSS in the round (its processes summed), and divided by the bf16 message; each site's
peak RSS (its processes summed per role); and every log line that mentions a timeout. The goals: memory
that does not grow from round to round, a server peak at most 2.0x the message, transfers at least 50 % of
the loopback rate, no timeout at the defaults.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import cell_ceiling  # this folder: run as a script, bench/ is on sys.path
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the package lives at the repo root

MIB, GIB = 2**20, 2**30
SITE_SCRIPT = Path(__file__).resolve().parent / "exchange_site.py"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ")
ROUND_START = re.compile(r"Round (\d+) started\.")  # on a line of its own, after the stamped log line
TRANSFER = re.compile(r"download tx \S+ done: status=(\w+) elapsed=([\d.]+)s .*\(([\d,]+) bytes\)")
TIMEOUT = re.compile(r"time ?out|timed out", re.IGNORECASE)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="Checkpoint, data, workspaces and reports.")
    parser.add_argument("--env", choices=["sim", "poc", "both"], default="both")
    parser.add_argument("--sites", type=int, default=1, help="Sites (each holds a copy of the message).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--exchange", choices=["weights", "update"], default="weights")
    parser.add_argument("--compression", choices=["none", "bf16", "int8", "nf4"], default="int8")
    parser.add_argument(
        "--text_layers", type=int, default=28, help="Decoder layers of the checkpoint (2B: 28)."
    )
    parser.add_argument("--json", default="", help="Also write the figures to this JSON file.")
    return parser.parse_args(argv)


def checkpoint(work: Path, text_layers: int) -> Path:
    from qwen3vl_sft.model import tiny

    out = work / f"qwen3-vl-2b-random-{text_layers}-layers"
    if not tiny.is_built(out):
        print(f"writing the real-dims checkpoint ({text_layers} layers) to {out} ...", flush=True)
    return tiny.ensure(out, "real-dims", text_layers=text_layers)


def shards(work: Path, sites: int) -> Path:
    """A few synthetic records per site: job.py checks each site's train.json; the bench site reads none."""
    from qwen3vl_sft.config import PrepareDataConfig
    from qwen3vl_sft.data import synthetic
    from qwen3vl_sft.data.prepare import prepare_shards

    out = work / f"shards-{sites}"
    if not (out / "manifest.json").is_file():
        data = synthetic.generate(work / "data", synthetic.SyntheticSpec(num_records=20 * sites))
        prepare_shards(PrepareDataConfig(data_file=str(data), output_dir=str(out), num_sites=sites))
    return out


def message_bytes(model_dir: Path) -> int:
    """The bf16 full-SFT message of this checkpoint, counted on the meta device."""
    from qwen3vl_sft.config import ModelConfig
    from qwen3vl_sft.model.weights import exchanged_tensors, meta_model
    from qwen3vl_sft.model.weights import message_bytes as count

    return count(exchanged_tensors(meta_model(ModelConfig(model_name_or_path=str(model_dir)))))


def loopback_mib_per_s(size: int, chunk: int = 64 * MIB) -> float:
    """A raw TCP copy of ``size`` bytes over 127.0.0.1, from one preallocated buffer into another."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        received = [0]

        def drain():
            conn, _ = server.accept()
            buf = memoryview(bytearray(chunk))
            with conn:
                while received[0] < size:
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    received[0] += n

        reader = threading.Thread(target=drain)
        reader.start()
        data = memoryview(bytearray(chunk))
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as client:
            sent = 0
            while sent < size:
                sent += client.send(data[: min(chunk, size - sent)])
        reader.join()
        return received[0] / MIB / (time.monotonic() - start)


class RoleMemory(threading.Thread):
    """Every 0.5 s, the RSS of each process of the job by role (server, site-N job, site-N trainer): a list
    of (time, role, rss) samples. The job's processes: this one's descendants (the simulator, whose server
    runs in a multiprocessing child with no path on its command line) and those whose command line names
    the work folder (PoC's parties, started detached)."""

    def __init__(self, work: Path):
        super().__init__(daemon=True)
        self.work, self.samples, self._done = str(work), [], threading.Event()

    @staticmethod
    def role(cmdline: str, descendant: bool) -> str:
        site = re.search(r"site-\d+", cmdline)
        name = site.group(0) if site else "site"
        if "exchange_site.py" in cmdline:
            return f"{name} trainer"
        if "simulator_worker" in cmdline or re.search(r"/site-\d+(/|\b)", cmdline):
            return f"{name} job"
        return "server" if descendant or "/server" in cmdline else ""

    def run(self):
        me = psutil.Process()
        while not self._done.wait(0.5):
            now, mine = time.time(), {p.pid for p in me.children(recursive=True)}
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if proc.pid not in mine and self.work not in cmdline:
                    continue
                role = self.role(cmdline, proc.pid in mine)
                if role and proc.info["memory_info"]:
                    self.samples.append((now, role, proc.info["memory_info"].rss))

    def stop(self) -> list:
        self._done.set()
        self.join()
        return self.samples


def log_times(workspace: Path) -> tuple[list[float], list[dict], list[str]]:
    """Round start times, NVFlare's transfer records and timeout lines from the server and site logs."""
    starts, transfers, timeouts = {}, [], []
    for log in sorted(workspace.rglob("log.txt")):
        parts = [p for p in log.relative_to(workspace).parts if p == "server" or re.fullmatch(r"site-\d+", p)]
        party = parts[0] if parts else "server"  # PoC's server job log survives as the admin's copy
        last = 0.0
        for line in log.read_text(errors="replace").splitlines():
            if m := STAMP.match(line):
                last = stamp(m.group(1))
            if m := ROUND_START.search(line):
                starts.setdefault(int(m.group(1)), last)
            elif m := TRANSFER.search(line):
                transfers.append({"at": last, "served_by": party, "status": m.group(1),
                                  "seconds": float(m.group(2)), "bytes": int(m.group(3).replace(",", ""))})  # fmt: skip
            elif TIMEOUT.search(line) and ("WARNING" in line or "ERROR" in line):
                timeouts.append(f"{log.relative_to(workspace)}: {line[:240]}")
    unique = list({(x["at"], x["bytes"], x["seconds"]): x for x in transfers}.values())  # a log and its copy
    return [starts[r] for r in sorted(starts)], unique, timeouts


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timestamp()


def role_totals(samples: list) -> dict[tuple[float, str], int]:
    """(sweep time, role) -> the RSS summed over the role's processes in that sweep: PoC's server is two
    processes (the parent, which relays messages, and the job's), a site's job may be more than one."""
    totals: dict[tuple[float, str], int] = {}
    for t, role, rss in samples:
        totals[(t, role)] = totals.get((t, role), 0) + rss
    return totals


def per_round(samples: list, starts: list[float], end: float, transfers: list[dict], message: int) -> list:
    rows, totals = [], role_totals(samples)
    for r, begin in enumerate(starts):
        stop = starts[r + 1] if r + 1 < len(starts) else end
        peaks: dict[str, int] = {}
        for (t, role), rss in totals.items():
            if begin <= t < stop:
                peaks[role] = max(peaks.get(role, 0), rss)
        # a round's messages only (coded updates are smaller), not the admin's download of the job result
        moved = [
            x for x in transfers if begin <= x["at"] < stop + 1 and message // 4 < x["bytes"] < 2 * message
        ]
        rows.append({"round": r, "seconds": stop - begin, "peaks_gib": {k: v / GIB for k, v in peaks.items()},
                     "server_peak_x_message": peaks.get("server", 0) / message,
                     "transfers": [{"served_by": x["served_by"], "mib": x["bytes"] / MIB,
                                    "mib_per_s": x["bytes"] / MIB / max(x["seconds"], 1e-3)} for x in moved]})  # fmt: skip
    return rows


def run_env(env: str, args, work: Path, model_dir: Path, data_dir: Path, message: int) -> dict:
    from qwen3vl_sft.config import DataConfig, ExchangeConfig, JobConfig, ModelConfig, TrainConfig
    from qwen3vl_sft.fl import job as fl_job

    workspace = work / f"workspace-{env}"
    shutil.rmtree(workspace, ignore_errors=True)  # this bench's own folder: a rerun's logs never mix in
    job = JobConfig(num_sites=args.sites, num_rounds=args.rounds, data_dir=str(data_dir), env=env,
                    workspace=str(workspace), job_name=f"exchange-{env}")  # fmt: skip
    exchange = ExchangeConfig(exchange=args.exchange, compression=args.compression)
    recipe = fl_job.build_recipe(job, ModelConfig(model_name_or_path=str(model_dir)), DataConfig(),
                                 TrainConfig(), exchange=exchange, site_script=SITE_SCRIPT)  # fmt: skip
    memory = RoleMemory(work)
    memory.start()
    start, error = time.time(), ""
    try:
        fl_job.run_job(job, recipe, cuda_devices=0)
    except fl_job.JobFailed as err:
        error = str(err)
    end = time.time()
    samples = memory.stop()
    starts, transfers, timeouts = log_times(workspace)
    rows = per_round(samples, starts, end, transfers, message)
    # The server's RSS over time (JSON only), to lay beside its log when a peak needs explaining.
    server = {t: rss for (t, role), rss in role_totals(samples).items() if role == "server"}
    timeline = [(round(t, 2), round(rss / GIB, 3)) for t, rss in sorted(server.items())]
    return {"env": env, "seconds": end - start, "error": error, "rounds": rows, "timeouts": timeouts,
            "site_lines": site_lines(workspace), "server_rss_gib_timeline": timeline}  # fmt: skip


def site_lines(workspace: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(workspace.rglob("exchange_site.jsonl")) for line in f.open()]


def print_env(result: dict, message: int, loopback: float, bare: float) -> None:
    print(f"\n{result['env']}: {result['seconds']:.0f} s, {len(result['rounds'])} rounds"
          f"{', FAILED: ' + result['error'] if result['error'] else ''}")  # fmt: skip
    for row in result["rounds"]:
        peaks = ", ".join(f"{role} {gib:.2f}" for role, gib in sorted(row["peaks_gib"].items()))
        moves = "; ".join(f"{x['served_by']} served {x['mib']:.0f} MiB at {x['mib_per_s']:.0f} MiB/s "
                          f"({100 * x['mib_per_s'] / loopback:.0f} % of loopback, {100 * x['mib_per_s'] / bare:.0f} % of bare "
                          f"NVFlare)" for x in row["transfers"])  # fmt: skip
        print(
            f"  round {row['round']}: {row['seconds']:.0f} s; peak RSS GiB: {peaks}; "
            f"server {row['server_peak_x_message']:.2f}x the message; {moves or 'no transfer record'}"
        )
    for line in result["site_lines"]:
        print(f"  {line['site']} round {line['round']}: receive wait {line['receive_wait_s']:.1f} s, "
              f"decode {line['decode_s']:.1f} s, encode {line['encode_s']:.1f} s, send {line['send_s']:.1f} s, "
              f"{line['received_mib']:.0f} MiB in, {line['sent_mib']:.0f} MiB out, trainer peak "
              f"{line['peak_rss_gib']:.2f} GiB")  # fmt: skip
    server = [row["peaks_gib"].get("server", 0.0) for row in result["rounds"]]
    if len(server) > 1:
        print(f"  server peak growth, first to last round: {server[-1] - server[0]:+.2f} GiB")
    print(
        f"  timeouts in the logs: {len(result['timeouts'])}"
        + "".join(f"\n    {t}" for t in result["timeouts"][:5])
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = checkpoint(work, args.text_layers), shards(work, args.sites)
    message = message_bytes(model_dir)
    loopback = loopback_mib_per_s(message)
    bare = {t: cell_ceiling.ceiling(model_dir, t, work / "cells" / t) for t in ("direct", "relayed")}
    print(
        f"message (bf16 full SFT): {message / MIB:.1f} MiB; loopback TCP copy: {loopback:.0f} MiB/s; "
        f"bare NVFlare cells: {bare['direct']['mib_per_s']:.0f} MiB/s direct, "
        f"{bare['relayed']['mib_per_s']:.0f} relayed as in a job; "
        f"{args.sites} site(s), {args.rounds} rounds, --exchange {args.exchange}",
        flush=True,
    )
    envs = ["sim", "poc"] if args.env == "both" else [args.env]
    results = [run_env(env, args, work, model_dir, data_dir, message) for env in envs]
    for result in results:
        print_env(result, message, loopback, bare["relayed"]["mib_per_s"])
    if args.json:
        figures = {
            "args": vars(args),
            "message_bytes": message,
            "loopback_mib_per_s": loopback,
            "bare_nvflare": bare,
            "envs": results,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
