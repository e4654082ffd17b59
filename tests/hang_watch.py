"""Tests only: a stuck test leaves a report that says where it was stuck, then fails instead of hanging.

    TEST_HANG_SECONDS=60 .venv/bin/python -m pytest -q tests/test_faults.py   # a shorter watch

A CI machine is thrown away after its run, and with it every log a simulator or PoC job wrote under the
test's tmp_path; pytest-timeout alone then leaves one line, "Timeout (>900.0s)", and a stack that ends in
``waitpid``. :func:`watch_for_hang` (armed by conftest.py around each test's setup, call and teardown, so
module fixtures that run a job are watched too) waits ``seconds``; if the phase is still running then, it:

1. sends SIGABRT to each process under pytest's (the test's, and any helper of the session), deepest
   first. conftest sets ``PYTHONFAULTHANDLER`` for the whole session, so every Python among them (the
   NVFlare server, simulator workers, torchrun and its trainer) prints the stack of each of its threads
   to its stderr, which lands in its log file or in the test's captured output;
2. writes to stderr (captured and shown with the failure): the process tree it found, and the tails of
   the newest logs under pytest's base temp folder (the stuck run's);
3. SIGKILLs what it signalled, so the test's blocked wait returns and the test fails now, with the report.
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
NEWEST_LOGS = 12  # the stuck run's logs are the newest under the folder; older tests' are left out
TAIL_LINES = 150  # a fault handler's stacks of a dozen threads, with the lines before them


def descendants_deepest_first(pid: int) -> list[psutil.Process]:
    """The processes under ``pid``, children after their own children (so leaves dump their stacks first)."""
    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []

    def depth(proc: psutil.Process) -> int:
        try:
            return len(proc.parents())
        except psutil.Error:
            return 0

    return sorted(found, key=depth, reverse=True)


def describe(procs: list[psutil.Process]) -> list[str]:
    lines = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            cpu = proc.cpu_times()
            cmd = " ".join(proc.cmdline())[:300]
            lines.append(f"  pid {proc.pid} (parent {proc.ppid()}, {proc.status()}, "
                         f"cpu {cpu.user + cpu.system:.0f} s): {cmd}")  # fmt: skip
    return lines


def newest_logs(root: Path) -> list[Path]:
    found = []
    for path in {p for pattern in LOG_PATTERNS for p in root.rglob(pattern)}:
        with contextlib.suppress(OSError):  # a log removed while the folder is walked
            found.append((path.stat().st_mtime, path))
    return [path for _, path in sorted(found)[-NEWEST_LOGS:]]


def log_tails(root: Path) -> list[str]:
    """The last TAIL_LINES lines of the NEWEST_LOGS most recently written logs under ``root``, oldest first."""
    lines = []
    for log in newest_logs(root):
        try:
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-TAIL_LINES:]
        except OSError as err:
            tail = [f"(unreadable: {err})"]
        lines += [f"----- {log} (last {len(tail)} lines)", *tail]
    return lines


def report_and_end(test: str, root: Path, seconds: float, out) -> None:
    """Steps 1-3 of the module docstring, for the processes under this one when the watch fired (only
    those: the kill must never reach a process the next test started)."""
    procs = descendants_deepest_first(os.getpid())
    try:
        header = [f"hang watch: {test} still running after {seconds:.0f} s; {len(procs)} processes under it:"]
        header += describe(procs)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGABRT)
                time.sleep(
                    0.5
                )  # one at a time: a parent relaying a child's stderr is still alive to relay it
        time.sleep(3)  # the fault handlers write their stacks
        print("\n".join(header + log_tails(root)), file=out, flush=True)
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()


@contextlib.contextmanager
def watch_for_hang(test: str, root: Path, seconds: float, out=None):
    """Run the block; if it outlasts ``seconds``, :func:`report_and_end` from a watcher thread. Yields a
    list that holds True once the watch fired (the caller fails the test then: ended processes can leave
    a test that expected a failure passing).

    The report goes to ``out``, by default the stderr of the moment the watch is armed: pytest's capture
    of this test, which the block may swap for a file of its own and close before the report is written.
    """
    out = out or sys.stderr
    done, fired = threading.Event(), []

    def watch():
        if not done.wait(seconds):
            fired.append(True)
            report_and_end(test, root, seconds, out)

    watcher = threading.Thread(target=watch, name="hang-watch", daemon=True)
    watcher.start()
    try:
        yield fired
    finally:
        done.set()
        watcher.join()  # a report under way finishes before the next test starts processes of its own
