"""qwen3vl_sft.fl.prod: following a job on a deployment, on a scripted admin session. Fast
(test_production runs the real deployment)."""

from __future__ import annotations

import pytest

from qwen3vl_sft.errors import DataError
from qwen3vl_sft.fl import prod as fl_prod
from qwen3vl_sft.fl.console_view import STATS_GROUP


class ScriptedSession:
    """Answers get_job_meta and show_stats from a list of (status, round or None or an exception)."""

    def __init__(self, script):
        self.script = list(script)
        self.now = None

    def get_job_meta(self, job_id):
        self.now = self.script.pop(0)
        return {"status": self.now[0], "job_id": job_id}

    def show_stats(self, job_id, target_type):
        assert target_type == "server"
        answer = self.now[1]
        if isinstance(answer, Exception):
            raise answer
        return {"server": {"ServerRunner": {"job_id": job_id}, **({STATS_GROUP: {"current_round": answer}}
                                                                   if answer is not None else {})}}  # fmt: skip


def test_follow_job_prints_a_line_per_change_of_status_or_round(capsys):
    from nvflare.fuel.flare_api.api_spec import JobNotFound, JobNotRunning

    script = [("SUBMITTED", None), ("RUNNING", JobNotFound("no such job")), ("RUNNING", 0), ("RUNNING", 0),
              ("RUNNING", 1), ("RUNNING", JobNotRunning("ended")), ("FINISHED:COMPLETED", None)]  # fmt: skip
    final = fl_prod.follow_job(ScriptedSession(script), "j-1", poll_seconds=0, startup_kit="/kits/admin")
    assert final == "FINISHED:COMPLETED"
    lines = [line.split("] ", 1)[-1] for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        "Job j-1 submitted; follow it elsewhere with: nvflare job monitor j-1 --startup-kit /kits/admin",
        "job j-1: SUBMITTED",
        "job j-1: RUNNING",
        "job j-1: RUNNING, round 0",
        "job j-1: RUNNING, round 1",  # the unanswered poll after it is no change
        "job j-1: FINISHED:COMPLETED",
    ]


def test_the_admin_kit_must_hold_its_admin_config(tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "startup" / "fed_admin.json").write_text('{"admin": {}}')
    with pytest.raises(DataError, match=r"fed_admin.json has no admin.username .*provision the kit again"):
        fl_prod.admin_user(str(tmp_path))
    (tmp_path / "startup" / "fed_admin.json").write_text('{"admin": {"username": "lead@hospital.org"}}')
    assert fl_prod.admin_user(str(tmp_path)) == "lead@hospital.org"
