"""qwen3vl_sft.fl.watch: the reason a site or the job stopped, read and reported in one line."""

from __future__ import annotations

import json

from qwen3vl_sft.fl.watch import (
    FAILURE_FILE,
    describe_site_failure,
    failure_line,
    last_exception_line,
    read_failure,
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
