"""qwen3vl_sft.fl.watch: the reason a site or the job stopped, read and reported in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from qwen3vl_sft.fl.watch import (
    FAILURE_FILE,
    describe_site_failure,
    ending_a_hung_simulator,
    failure_line,
    last_exception_line,
    read_failure,
    simulator_processes,
)

TORCHRUN_EADDRINUSE_LOG = """\
2026-12-02 00:59:41,403 - INFO -   File ".../torch/distributed/elastic/multiprocessing/errors/__init__.py", line 380
2026-12-02 00:59:41,417 - INFO - torch.distributed.DistNetworkError: The server socket has failed to listen on any \
local network address. port: 29500, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use
2026-12-02 00:59:42,500 - ERROR - RuntimeError: trainer process group exited (rc=1) before completing the HELLO handshake
2026-12-02 00:59:42,583 - ERROR - Stopped ClientRunner due to FATAL_SYSTEM_ERROR: ClientAPIExecutor cannot start: \
backend for execution_mode 'external_process' failed to initialize: RuntimeError: trainer process group exited (rc=1)
"""


def test_the_cause_is_the_trainers_exception_not_nvflares_wrapper(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(TORCHRUN_EADDRINUSE_LOG)
    cause = last_exception_line(log)
    assert cause.startswith("torch.distributed.DistNetworkError: The server socket has failed")
    assert cause.endswith("name: EADDRINUSE, message: address already in use")


def test_a_busy_port_says_what_to_do(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(TORCHRUN_EADDRINUSE_LOG)
    line = describe_site_failure({"site": "site-2", "cause": last_exception_line(log), "log": str(log)})
    assert line.startswith("site-2 stopped: torch.distributed.DistNetworkError: ")
    assert line.endswith("; another process listens on port 29500: run again (job.py picks free ports for "
                         f"sites on this machine) or pass another --master_port_base (log: {log})")  # fmt: skip
    # other failures get no advice
    assert describe_site_failure({"site": "s", "cause": "ValueError: port: 5", "log": "/l"}) == (
        "s stopped: ValueError: port: 5 (log: /l)"
    )


class FlakyServer:
    """A site engine whose aux requests get the replies in ``codes``, one per request."""

    def __init__(self, *codes: str):
        self.codes, self.sent = list(codes), []

    def send_aux_request(self, targets, topic, request, timeout, fl_ctx):
        from nvflare.apis.shareable import make_reply

        self.sent.append((topic, request["site"]))
        return {"server": make_reply(self.codes.pop(0))}

    def fire_event(self, event_type, fl_ctx):  # log_error announces each error line as an event
        pass


def test_a_lost_report_is_sent_again_and_one_never_taken_is_logged(caplog):
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.shareable import Shareable

    from qwen3vl_sft.fl.watch import REPORT_ATTEMPTS, TOPIC, SiteFailureReporter

    for codes, taken in [((ReturnCode.COMMUNICATION_ERROR, ReturnCode.OK), True),
                         ((ReturnCode.TIMEOUT,) * REPORT_ATTEMPTS, False)]:  # fmt: skip
        server, fl_ctx = FlakyServer(*codes), FLContext()
        fl_ctx.get_engine = lambda server=server: server
        assert SiteFailureReporter().report(Shareable({"site": "site-2"}), fl_ctx) is taken
        assert server.sent == [(TOPIC, "site-2")] * len(codes)
    assert f"the server did not take the report after {REPORT_ATTEMPTS} tries" in caplog.text
    assert "the job may wait for this site: stop it with Ctrl-C" in caplog.text


def test_rank_prefixed_lines_and_a_missing_log(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "[rank0]: Traceback (most recent call last):\n[rank0]: ValueError: bad --lora_r 0\nother\n"
    )
    assert last_exception_line(log) == "ValueError: bad --lora_r 0"
    assert last_exception_line(tmp_path / "absent.txt") == ""


def test_failure_line_names_round_reason_sites_and_log(tmp_path):
    report = {
        "site": "site-1",
        "reason": "ClientAPIExecutor cannot start",
        "cause": "OSError: boom",
        "log": "/l",
    }
    assert describe_site_failure(report) == "site-1 stopped: OSError: boom (log: /l)"
    failure = {"reason": "only 1 site(s) returned a model", "round": 2,
               "site_errors": {"site-3": "round 2: DataError: x", "site-2": "round 2: OSError: y"}}  # fmt: skip
    line = failure_line(failure, "/ws/server/log.txt")
    assert line == (
        "the federated job stopped in round 2: only 1 site(s) returned a model; site-2 failed round 2: OSError: y; "
        "site-3 failed round 2: DataError: x (server log: /ws/server/log.txt)"
    )
    assert "\n" not in line
    assert failure_line({"reason": "r", "round": None}, "L").startswith(
        "the federated job stopped at start-up: r"
    )


def test_read_failure_finds_the_servers_file_or_none(tmp_path):
    assert read_failure(tmp_path) is None
    (tmp_path / "server" / "simulate_job").mkdir(parents=True)
    (tmp_path / "server" / "simulate_job" / FAILURE_FILE).write_text(json.dumps({"reason": "r", "round": 0}))
    assert read_failure(tmp_path) == {"reason": "r", "round": 0}


def sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def only(popen: subprocess.Popen):
    """A ``processes`` for the guard: this one child while it runs."""
    return lambda: [psutil.Process(popen.pid)] if popen.poll() is None else []


def test_a_simulator_still_up_after_the_recorded_failure_is_ended(tmp_path, capsys):
    hung = sleeper(600)  # a site process the aborted simulator waits on forever
    start = time.monotonic()
    with ending_a_hung_simulator(tmp_path, grace_s=1.0, poll_s=0.1,
                                 processes=only(hung)) as killed:  # fmt: skip
        (tmp_path / "server" / "run_1").mkdir(parents=True)
        (tmp_path / "server" / "run_1" / FAILURE_FILE).write_text('{"reason": "site-2 stopped"}')
        hung.wait(timeout=60)
    assert hung.returncode == -signal.SIGKILL
    assert killed == [hung.pid]
    assert time.monotonic() - start < 30
    assert (
        "still running 1 s after the server stopped the job; ended its 1 site processes"
        in capsys.readouterr().err
    )


def test_a_healthy_run_and_an_earlier_runs_failure_file_are_left_alone(tmp_path):
    (tmp_path / FAILURE_FILE).write_text('{"reason": "the run before"}')
    old = time.time() - 3600
    os.utime(tmp_path / FAILURE_FILE, (old, old))  # a failed run earlier in this folder, then --resume
    ending = sleeper(2)
    with ending_a_hung_simulator(tmp_path, grace_s=0.2, poll_s=0.05,
                                 processes=only(ending)) as killed:  # fmt: skip
        ending.wait(timeout=60)
    assert ending.returncode == 0
    assert killed == []


def test_left_behind_processes_are_ended_when_the_run_returns_after_a_failure(tmp_path, capsys):
    orphan = sleeper(600)  # the simulator gave up waiting for this site worker and returned
    with ending_a_hung_simulator(tmp_path, grace_s=600, poll_s=0.05,
                                 processes=only(orphan)) as killed:  # fmt: skip
        (tmp_path / FAILURE_FILE).write_text('{"reason": "site-2 stopped"}')
    orphan.wait(timeout=30)
    assert orphan.returncode == -signal.SIGKILL
    assert killed == [orphan.pid]
    assert "ended 1 site processes the simulator left running" in capsys.readouterr().err


def test_the_simulators_processes_are_its_site_workers_and_theirs(tmp_path):
    worker = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "time.sleep(60)", "-m", "nvflare.private.fed.app.simulator.simulator_worker",
                               "--client", "site-1"])  # fmt: skip
    bystander = sleeper(60)  # another child of this process: not the simulator's
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(worker.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = psutil.Process(worker.pid).children()[0].pid
        assert [p.pid for p in simulator_processes()] == [grandchild, worker.pid]
    finally:
        for proc in (worker, bystander):
            proc.kill()
            proc.wait()
