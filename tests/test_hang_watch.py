"""The hang watch on a real stuck child: its stack, the process list and its log reach the report."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

from hang_watch import watch_for_hang

STUCK = "import time\nprint('child started', flush=True)\ntime.sleep(120)\n"


def test_a_stuck_child_is_aborted_with_its_stack_in_its_log_and_named_in_the_report(tmp_path):
    log = tmp_path / "site-1" / "log.txt"
    log.parent.mkdir()
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-c", STUCK], stdout=out, stderr=out, env=env)
    deadline = time.monotonic() + 60
    while "child started" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # armed once the child sleeps on line 3, however loaded the machine is
    report = io.StringIO()

    with watch_for_hang("tests/x.py::stuck", tmp_path, 2.0, out=report) as fired:
        returncode = child.wait(timeout=60)  # returns only because the watch ended the child

    assert fired == [True] and returncode == -signal.SIGABRT
    text = report.getvalue()
    assert text.startswith("hang watch: tests/x.py::stuck still running after 2 s; 1 processes under it:")
    assert f"pid {child.pid} (parent {os.getpid()}" in text
    assert f"----- {log} (last" in text
    assert "child started" in text
    assert "Fatal Python error: Aborted" in text  # the child's own stack, printed by its fault handler
    assert 'File "<string>", line 3 in <module>' in text


def test_a_block_that_ends_in_time_leaves_no_report_and_no_signal(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    report = io.StringIO()

    with watch_for_hang("tests/x.py::quick", tmp_path, 5.0, out=report) as fired:
        assert child.wait(timeout=30) == 0

    assert fired == [] and report.getvalue() == ""
