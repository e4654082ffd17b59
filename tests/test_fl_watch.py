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
