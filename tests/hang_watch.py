"""Tests only: a stuck test leaves a report that says where it was stuck, then fails instead of hanging.

A CI machine is thrown away after its run, and with it every log a simulator or PoC job wrote under the
test's tmp_path; pytest-timeout alone then leaves one line, "Timeout (>900.0s)", and a stack that ends in
``waitpid``. :func:`watch_for_hang` (armed for every test by conftest.py) waits ``seconds``; if the test
is still running then, it:

1. sends SIGABRT to each process the test started, deepest first. conftest sets ``PYTHONFAULTHANDLER``
   for the whole session, so every Python among them (the NVFlare server, simulator workers, torchrun and
   its trainer) prints the stack of each of its threads to its stderr, which lands in its log file or in
   the test's captured output;
2. writes to stderr (captured and shown with the failure): the process tree it found, and the tail of
   every log under the test's folder;
3. SIGKILLs whatever is left, so the test's blocked wait returns and the test fails now, with the report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

LOG_PATTERNS = ("log.txt", "*.log")
TAIL_LINES = 150  # a fault handler's stacks of a dozen threads, with the lines before them


def descendants_deepest_first(pid: int) -> list[psutil.Process]:
    """The processes under ``pid``, children after their own children (so leaves dump their stacks first)."""
    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []

    def depth(proc: psutil.Process) -> int:
        try:
            return len(proc.parents())
        except psutil.NoSuchProcess:
            return 0

    return sorted(found, key=depth, reverse=True)


def describe(procs: list[psutil.Process]) -> list[str]:
    lines = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            cpu = proc.cpu_times()
            cmd = " ".join(proc.cmdline())[:300]
            lines.append(f"  pid {proc.pid} (parent {proc.ppid()}, {proc.status()}, "
                         f"cpu {cpu.user + cpu.system:.0f} s): {cmd}")  # fmt: skip
    return lines


def log_tails(root: Path) -> list[str]:
    """The last TAIL_LINES lines of every log file under ``root``, oldest change first."""
    logs = {p for pattern in LOG_PATTERNS for p in root.rglob(pattern) if p.is_file()}
    lines = []
    for log in sorted(logs, key=lambda p: p.stat().st_mtime):
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-TAIL_LINES:]
        lines += [f"----- {log} (last {len(tail)} lines)", *tail]
    return lines


def report_and_end(test: str, root: Path, seconds: float, out) -> None:
    """Steps 1-3 of the module docstring, for the processes under this one."""
    procs = descendants_deepest_first(os.getpid())
    header = [f"hang watch: {test} still running after {seconds:.0f} s; {len(procs)} processes under it:"]
    header += describe(procs)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGABRT)
            time.sleep(0.5)  # one at a time: a parent relaying a child's stderr is still alive to relay it
    time.sleep(3)  # the fault handlers write their stacks
    print("\n".join(header + log_tails(root)), file=out, flush=True)
    for proc in descendants_deepest_first(os.getpid()):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@contextlib.contextmanager
def watch_for_hang(test: str, root: Path, seconds: float, out=None):
    """Run the block; if it outlasts ``seconds``, :func:`report_and_end` from a watcher thread.

    The report goes to ``out``, by default the stderr of the moment the watch is armed: pytest's capture
    of this test, which the block may swap for a file of its own and close before the report is written.
    """
    out = out or sys.stderr
    done = threading.Event()

    def watch():
        if not done.wait(seconds):
            report_and_end(test, root, seconds, out)

    watcher = threading.Thread(target=watch, name="hang-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(timeout=30)
