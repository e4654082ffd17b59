"""NVFlare's own transfer ceiling here: the server's first global between bare NVFlare cells, no job.

    .venv/bin/python bench/cell_ceiling.py --model_dir /tmp/real_exchange/qwen3-vl-2b-random-2-layers

One process holds the message a job's server sends first (``checkpoints.initial_exchanged``, bf16) and
offers it with NVFlare's tensor downloader (``add_tensors``, NVFlare's default 2 MiB item batches); another
downloads it (``download_tensors``), both over TCP on 127.0.0.1 with NVFlare's default streaming settings.
``direct``: the receiver's cell connects to the sender's. ``relayed``: as in PoC and production, both are
job cells (``server.job``, ``site-1.job``) under their parties' cells, so every byte passes two relays.
Nothing else runs, so this is the rate NVFlare's transport reaches on this machine: the figure a job's
transfers can approach, next to the raw loopback copy of ``bench_real_exchange.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the package lives at the repo root

MIB = 2**20
TIMEOUT_S = 900
SENDER, RECEIVER = "server", "site-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def put(path: Path, text: str) -> None:
    """Write whole or not at all: the other processes poll for the file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def wait_for(path: Path) -> str:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {TIMEOUT_S} s")
        time.sleep(0.05)
    return path.read_text()


def start_cell(name: str, port: int, folder: Path):
    """A started cell; a party's cell (no dot) listens for its job cell, a job cell connects through it."""
    from nvflare.fuel.f3.cellnet.cell import Cell

    url, parent = f"tcp://127.0.0.1:{port}", name.split(".")[0]
    if "." not in name:
        cell = Cell(name, url, secure=False, credentials={}, create_internal_listener=True)
        cell.start()
        put(folder / f"{name}.url", cell.get_internal_listener_url())
        return cell
    cell = Cell(name, url, secure=False, credentials={}, parent_url=wait_for(folder / f"{parent}.url"))
    cell.start()
    return cell


def serve(name: str, port: int, folder: Path, model_dir: str) -> None:
    from nvflare.app_opt.pt.tensor_downloader import add_tensors
    from nvflare.fuel.f3.streaming.obj_downloader import ObjectDownloader

    from qwen3vl_sft.config import ModelConfig
    from qwen3vl_sft.model.checkpoints import initial_exchanged

    cell = start_cell(name, port, folder)
    message = initial_exchanged(ModelConfig(model_name_or_path=model_dir))
    downloader = ObjectDownloader(cell, timeout=TIMEOUT_S, num_receivers=1)
    put(folder / "ref", add_tensors(downloader, message))
    downloader.get_waiter().wait(TIMEOUT_S)
    wait_for(folder / "result.json")


def fetch(name: str, port: int, folder: Path, source: str) -> None:
    from nvflare.app_opt.pt.tensor_downloader import download_tensors

    cell = start_cell(name, port, folder)
    ref = wait_for(folder / "ref")
    time.sleep(1.0)  # let the cells finish connecting: the first request would otherwise pay for it
    start = time.monotonic()
    error, tensors = download_tensors(source, ref, per_request_timeout=TIMEOUT_S, cell=cell)
    seconds = time.monotonic() - start
    size = sum(t.numel() * t.element_size() for t in (tensors or {}).values())
    result = {"error": error, "mib": size / MIB, "seconds": seconds, "mib_per_s": size / MIB / seconds}
    put(folder / "result.json", json.dumps(result))


def ceiling(model_dir: Path, topology: str, folder: Path) -> dict:
    """Run one download in fresh processes; its size, seconds and MiB/s (or an error)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    port = free_port()
    sender, receiver = (SENDER, RECEIVER) if topology == "direct" else (f"{SENDER}.job", f"{RECEIVER}.job")
    roles = [("serve", sender), ("fetch", receiver)]
    if topology == "relayed":
        roles += [("party", SENDER), ("party", RECEIVER)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                role,
                "--name",
                name,
                "--port",
                str(port),
                "--folder",
                str(folder),
                "--model_dir",
                str(model_dir),
                "--source",
                sender,
            ],
            stderr=(folder / f"{name}.log").open("w"),
        )  # fmt: skip
        for role, name in roles
    ]
    try:
        return {"topology": topology, **json.loads(wait_for(folder / "result.json"))}
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="A checkpoint, e.g. tiny --variant real-dims.")
    parser.add_argument("--topology", choices=["direct", "relayed", "both"], default="both")
    parser.add_argument("--folder", default="", help="Scratch folder (default: <model_dir>-cells).")
    # one process of a measurement (this script runs itself in each role)
    parser.add_argument("--role", choices=["serve", "fetch", "party"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = Path(args.folder or f"{Path(args.model_dir).resolve()}-cells")
    if args.role:
        if args.role == "serve":
            serve(args.name, args.port, folder, args.model_dir)
        elif args.role == "fetch":
            fetch(args.name, args.port, folder, args.source)
        else:
            start_cell(args.name, args.port, folder)
            wait_for(folder / "result.json")
        os._exit(0)  # NVFlare's cell threads would keep the process up; the result is on disk
    for topology in ["direct", "relayed"] if args.topology == "both" else [args.topology]:
        result = ceiling(Path(args.model_dir).resolve(), topology, folder / topology)
        print(json.dumps(result), flush=True)
        if result["error"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
