"""--env prod: submit the job to a provisioned NVFlare deployment, follow it, fetch its result (and
the same quiet wait for --env poc).

    python job.py --env prod --startup_kit ./workspace/qwen3vl_fl/prod_00/admin@hospital.org \
        --data_dir /data/pubmedvision --model_name_or_path Qwen/Qwen3-VL-2B-Instruct

The server and each site were started from their own startup kits (``nvflare provision``); this machine
only holds the admin's kit. docs/production.md walks the operator's whole path.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import time
from pathlib import Path

from ..errors import DataError
from .console_view import STATS_GROUP, clock

ADMIN_CONFIG = Path("startup") / "fed_admin.json"
POLL_SECONDS = 5.0
LOGIN_SECONDS = 30.0  # the admin server may still be starting; NVFlare's default, 5 s, is tight for that
COMPLETED = "FINISHED:COMPLETED"


def admin_user(startup_kit: str) -> str:
    """The admin identity the kit was provisioned for (its certificate is that user's)."""
    config_file = Path(startup_kit) / ADMIN_CONFIG
    if not config_file.is_file():
        raise DataError(f"--startup_kit {startup_kit}: no {ADMIN_CONFIG} there; pass the admin's startup kit "
                        "folder that 'nvflare provision' wrote (…/prod_NN/<admin email>)")  # fmt: skip
    try:
        return json.loads(config_file.read_text())["admin"]["username"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"--startup_kit {startup_kit}: {config_file} has no admin.username ({err}); "
                        "provision the kit again") from None  # fmt: skip


def nvflare_command(verb: str, job_id: str, startup_kit: str) -> str:
    return shlex.join(["nvflare", "job", verb, job_id, "--startup-kit", str(Path(startup_kit).resolve())])


def wait_and_fetch(username: str, startup_kit: str, job_id: str, destination: str | None, say=None):
    """Follow the job to its end (``say`` gets a line per change), then download its result; returns the
    result folder. Used instead of NVFlare's monitor, which prints the job's meta dict."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    with contextlib.redirect_stdout(io.StringIO()):  # NVFlare's admin client prints "Connecting to FLARE ..."
        session = new_secure_session(username, startup_kit, timeout=LOGIN_SECONDS)
    try:
        follow_job(session, job_id, POLL_SECONDS, startup_kit, say)
        return session.download_job_result(job_id, destination=destination)
    finally:
        session.close()


def _prod_env_class():
    from nvflare.recipe.prod_env import ProdEnv

    class ProdDeployment(ProdEnv):
        """NVFlare's ProdEnv, following the job in lines (wait_and_fetch) and fetching its result into
        ``result_root`` (not the admin kit's folder)."""

        def __init__(self, startup_kit: str, result_root: str):
            super().__init__(startup_kit, login_timeout=LOGIN_SECONDS, username=admin_user(startup_kit))
            self.result_root = result_root

        def get_job_result(self, job_id: str, timeout: float = 0.0) -> str | None:  # noqa: ARG002 - waits for the end
            return wait_and_fetch(self.username, self.startup_kit_location, job_id, self.result_root)

        def stop(self, clean_up: bool = False) -> None:  # noqa: ARG002 - the deployment is the operator's
            """A deployment outlives its jobs: nothing here to stop or clean."""

    return ProdDeployment


def prod_deployment(startup_kit: str, result_root: str):
    """The execution environment of ``--env prod``."""
    return _prod_env_class()(startup_kit, result_root)


def quiet_poc(**kwargs):
    """NVFlare's PocEnv, waiting for the job without printing (job.py's live view shows it)."""
    from nvflare.recipe.poc_env import PocEnv

    class QuietPoc(PocEnv):
        def get_job_result(self, job_id: str, timeout: float = 0.0) -> str | None:  # noqa: ARG002 - waits for the end
            kit = self._get_admin_startup_kit_path()
            return wait_and_fetch(self.username, kit, job_id, None, say=lambda line: None)

    return QuietPoc(**kwargs)


def follow_job(session, job_id: str, poll_seconds: float, startup_kit: str, say=None) -> str:
    """Say the job's state (and round, as the server reports it) when either changes; its final status."""
    say = say or (lambda line: print(line, flush=True))  # flushed: a pipe (| tee) sees each line as it comes
    start, seen = time.monotonic(), None
    say(
        f"Job {job_id} submitted; follow it elsewhere with: {nvflare_command('monitor', job_id, startup_kit)}"
    )
    while True:
        status = session.get_job_meta(job_id).get("status", "UNKNOWN")
        round_ = current_round(session, job_id) if status == "RUNNING" else None
        if round_ is None and seen and seen[0] == status:
            round_ = seen[1]  # no answer this time (the job is ending): not a change
        now = (status, round_)
        if now != seen:
            where = f", round {now[1]}" if now[1] is not None else ""
            say(f"[{clock(time.monotonic() - start)}] job {job_id}: {status}{where}")
            seen = now
        if status.startswith("FINISHED"):
            return status
        time.sleep(poll_seconds)


def current_round(session, job_id: str) -> int | None:
    """The round the server is in, as its ConsoleRecorder answers the admin's 'show_stats' (None before
    the first round starts)."""
    from nvflare.fuel.flare_api.api_spec import (
        CommandError,
        InternalError,
        JobNotFound,
        JobNotRunning,
        NoReply,
    )

    try:
        stats = session.show_stats(job_id, "server")
    # The job's server process is not up yet (JobNotFound right after submission) or has ended since
    # the status call: the next poll says which.
    except (JobNotFound, JobNotRunning, CommandError, InternalError, NoReply):
        return None
    group = (stats.get("server") or {}).get(STATS_GROUP) or {}
    return group.get("current_round")
