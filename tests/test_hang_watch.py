"""The hang watch on a real stuck child: its stack, the process list and its log reach the report.

Each case runs in a fresh interpreter of its own, so the watch sees only the processes the case started
(under pytest it would also signal the session's own helpers, such as multiprocessing's resource tracker).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
STUCK = "import time\nprint('child started', flush=True)\ntime.sleep(120)\n"
DRIVER = """
import io, json, subprocess, sys, time
from pathlib import Path
from hang_watch import watch_for_hang

root, stuck, seconds = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
log = root / "site-1" / "log.txt"
log.parent.mkdir()
with log.open("w") as out:
    child = subprocess.Popen([sys.executable, "-c", stuck], stdout=out, stderr=out)
deadline = time.monotonic() + 60
while "child started" not in log.read_text() and time.monotonic() < deadline:
    time.sleep(0.1)  # armed once the child sleeps on line 3, however loaded the machine is
report = io.StringIO()
with watch_for_hang("tests/x.py::stuck", root, seconds, out=report) as fired:
    returncode = child.wait(timeout=60)
print(json.dumps({"fired": fired, "returncode": returncode, "pid": child.pid, "report": report.getvalue()}))
"""


def run_driver(tmp_path: Path, stuck: str, seconds: float) -> dict:
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), stuck, str(seconds)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return json.loads(done.stdout)


def test_a_stuck_child_is_aborted_with_its_stack_in_its_log_and_named_in_the_report(tmp_path):
    result = run_driver(tmp_path, STUCK, 2.0)  # the child would sleep 120 s; the watch fires after 2

    assert result["fired"] == [True] and result["returncode"] == -signal.SIGABRT
    text = result["report"]
    assert text.startswith("hang watch: tests/x.py::stuck still running after 2 s; 1 processes under it:")
    assert f"  pid {result['pid']} (parent " in text
    assert f"----- {tmp_path / 'site-1' / 'log.txt'} (last" in text
    assert "child started" in text
    assert "Fatal Python error: Aborted" in text  # the child's own stack, printed by its fault handler
    assert 'File "<string>", line 3 in <module>' in text


def test_a_block_that_ends_in_time_leaves_no_report_and_no_signal(tmp_path):
    result = run_driver(tmp_path, "print('child started', flush=True)", 30.0)

    assert result == {"fired": [], "returncode": 0, "pid": result["pid"], "report": ""}
