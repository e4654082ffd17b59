"""Failures that end the federated job with their reason, instead of a hang or a traceback 100 lines up.

    python job.py --master_port_base 29500 ...   # while something listens on 29500: the job ends with
                                                 # "site-1 stopped: ... EADDRINUSE ...; another process
                                                 # listens on port 29500: run again (...) or pass another
                                                 # --master_port_base (log: .../log.txt)"

Two NVFlare components, added to every job by :func:`qwen3vl_sft.fl.job.build_recipe`:

* :class:`SiteFailureReporter` (each site). NVFlare stops a site's ClientRunner on a fatal error (its
  ``torchrun`` died before the Client API handshake: a busy ``--master_port``, a flag the parser refuses,
  an import error), but in the simulator nothing tells the server, whose round then waits for that site
  forever. The reporter sends the reason, with the
  last exception line of the site's log, to the server over NVFlare's aux channel (again if the server
  did not take it; a report never taken is named in the site's log).
* :class:`JobFailureRecorder` (server, a task-result filter). It turns such a report into a
  ``system_panic`` that ends the job; it logs each site's failed round (the ``error`` meta of the empty
  result a failing site sends); and it writes the reason of any panic (its own, or the persistor's:
  too few sites, every site failed) to ``job_failure.json`` in the server's run folder, which
  ``job.py`` prints as its last line.

And one guard in ``job.py``'s process, :func:`ending_a_hung_simulator`: the simulator can stay up after the
server has stopped the job (a site process left waiting), and then so would ``job.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.shareable import Shareable, make_reply

FAILURE_FILE = "job_failure.json"
TOPIC = "qwen3vl_sft.site_failed"
REPORT_TIMEOUT = 10.0  # seconds the dying site waits for the server to take its report
REPORT_ATTEMPTS = 3
# "torch.distributed.DistNetworkError: The server socket ...", "[rank0]: ValueError: ..." in a log line
EXCEPTION_LINE = re.compile(r"((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit)): (\S.*)$")
# NVFlare's own wrappers around the trainer's death: they say that it died, not why
# torch's "... port: 29500, useIpv6: false, code: -98, name: EADDRINUSE, ..." (the port its store wanted)
EADDRINUSE_PORT = re.compile(r"\bport: (\d+)\b")
WRAPPER_MESSAGES = ("before completing the HELLO handshake", "failed to initialize", "FATAL_SYSTEM_ERROR")
LOG_TAIL_BYTES = 256 * 1024
# An aborted simulator ends in seconds (its sites leave at their next poll); one still up after this is hung.
SIMULATOR_END_GRACE_S = 180.0


def last_exception_line(log_file: str | os.PathLike) -> str:
    """The last ``SomeError: message`` line of a log that is not one of NVFlare's wrappers, or ''."""
    try:
        with open(log_file, "rb") as f:
            f.seek(max(0, os.path.getsize(log_file) - LOG_TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""  # no log to read (yet): the reason then is NVFlare's own message alone
    for line in reversed(lines):
        match = EXCEPTION_LINE.search(line)
        if match and not any(w in line for w in WRAPPER_MESSAGES):
            return f"{match.group(1)}: {match.group(2).strip()}"
    return ""


def site_log_file(fl_ctx) -> str:
    """This site's NVFlare log (the trainer's output is relayed into it)."""
    workspace = fl_ctx.get_engine().get_workspace()
    job_id = fl_ctx.get_job_id()
    candidates = [Path(workspace.get_run_dir(job_id)) / "log.txt"] if job_id else []
    candidates.append(Path(workspace.get_root_dir()) / "log.txt")
    return str(next((c for c in candidates if c.is_file()), candidates[-1]))


class SiteFailureReporter(FLComponent):
    """On a site: forwards the reason of a fatal error that stops this site's runner to the server."""

    def __init__(self):
        super().__init__()
        self._reported = False

    def handle_event(self, event_type: str, fl_ctx) -> None:
        if event_type != EventType.FATAL_SYSTEM_ERROR or self._reported:
            return
        self._reported = True  # once: the report itself must not start a loop of reports
        log_file = site_log_file(fl_ctx)
        cause = last_exception_line(log_file)
        reason = str(fl_ctx.get_prop(FLContextKey.EVENT_DATA, "") or "fatal error")
        request = Shareable({"site": fl_ctx.get_identity_name(), "reason": reason, "cause": cause,
                             "log": log_file})  # fmt: skip
        self.log_error(fl_ctx, f"reporting to the server: {cause or reason}")
        self.report(request, fl_ctx)

    def report(self, request: Shareable, fl_ctx) -> bool:
        """Send ``request`` until the server takes it. This report is the server's only news that the site
        died (the simulator's server would wait for it forever), so a report lost to a dropped connection
        is sent again, and one that never arrives is named in this site's log."""
        codes: list[str] = []
        for _ in range(REPORT_ATTEMPTS):
            replies = fl_ctx.get_engine().send_aux_request(
                targets=None, topic=TOPIC, request=request, timeout=REPORT_TIMEOUT, fl_ctx=fl_ctx
            )
            codes = [reply.get_return_code() for reply in (replies or {}).values()]
            if ReturnCode.OK in codes:
                return True
        self.log_error(fl_ctx, f"the server did not take the report after {REPORT_ATTEMPTS} tries (replies: "
                       f"{codes or 'none'}); the job may wait for this site: stop it with Ctrl-C")  # fmt: skip
        return False


def remedy(cause: str) -> str:
    """What to do about a start-up failure whose fix is known, as a clause to append, or ''."""
    busy = EADDRINUSE_PORT.search(cause) if "EADDRINUSE" in cause else None
    if busy:
        # For sites on this machine job.py found the port free, so it was taken in between (another job, a
        # listener NVFlare opened): a new run picks free ports again. On a site's own machine (an exported
        # or provisioned job, where job.py checks nothing) the port is simply busy there.
        return (f"; another process listens on port {busy.group(1)}: run again (job.py picks free ports for "
                "sites on this machine) or pass another --master_port_base")  # fmt: skip
    return ""


def describe_site_failure(report: dict) -> str:
    cause = report.get("cause") or report.get("reason") or "unknown reason"
    site = report.get("site", "a site")
    return f"{site} stopped: {cause}{remedy(cause)} (log: {report.get('log', 'its log.txt')})"


class JobFailureRecorder(Filter):
    """On the server: ends the job on a site's fatal report; records per-round site errors and why
    the job stopped (``job_failure.json``)."""

    def __init__(self):
        super().__init__()
        self.site_errors: dict[str, str] = {}  # site -> "round R: error" of its last failed round
        self._failure_path: str | None = None

    def handle_event(self, event_type: str, fl_ctx) -> None:
        if event_type == EventType.START_RUN:
            engine = fl_ctx.get_engine()
            engine.register_aux_message_handler(topic=TOPIC, message_handle_func=self._on_site_failure)
            self._failure_path = os.path.join(engine.get_workspace().get_run_dir(fl_ctx.get_job_id()),
                                              FAILURE_FILE)  # fmt: skip
        elif event_type == EventType.FATAL_SYSTEM_ERROR:
            self._write_failure(str(fl_ctx.get_prop(FLContextKey.EVENT_DATA, "") or "fatal error"), fl_ctx)

    def _on_site_failure(self, topic: str, request: Shareable, fl_ctx) -> Shareable:  # noqa: ARG002
        self.system_panic(describe_site_failure(dict(request)), fl_ctx)
        return make_reply("OK")

    def _write_failure(self, reason: str, fl_ctx) -> None:
        from nvflare.app_common.app_constant import AppConstants

        from ..fileio import atomic_write_json

        if self._failure_path is None or os.path.isfile(self._failure_path):
            return  # the first reason is the cause; later panics are its consequences
        record = {"reason": reason, "round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
                  "site_errors": dict(self.site_errors)}  # fmt: skip
        atomic_write_json(self._failure_path, record)

    def process(self, shareable: Shareable, fl_ctx) -> Shareable:
        """A task result on its way to the aggregator: note the error of a site that failed its round."""
        from nvflare.apis.dxo import from_shareable

        try:
            meta = from_shareable(shareable).meta or {}
        except ValueError:  # not a DXO (an error reply of a dead trainer): NVFlare logs those itself
            return shareable
        if meta.get("error"):
            site = fl_ctx.get_peer_context().get_identity_name() if fl_ctx.get_peer_context() else "?"
            self.site_errors[site] = f"round {meta.get('round', '?')}: {meta['error']}"
            self.log_warning(fl_ctx, f"{site} failed {self.site_errors[site]}")
        return shareable


def read_failure(result_dir: str | os.PathLike) -> dict | None:
    """The ``job_failure.json`` the server wrote under ``result_dir``, or None when the job did not fail."""
    found = sorted(Path(result_dir).glob(f"**/{FAILURE_FILE}")) if result_dir else []
    if not found:
        return None
    return json.loads(found[0].read_text(encoding="utf-8"))


def failure_line(failure: dict, server_log: str) -> str:
    """One line: in which round the job stopped, why, which sites failed how, and the server log."""
    when = "at start-up" if failure.get("round") is None else f"in round {failure['round']}"
    parts = [f"the federated job stopped {when}: {failure['reason']}"]
    parts += [f"{site} failed {error}" for site, error in sorted((failure.get("site_errors") or {}).items())]
    return "; ".join(parts) + f" (server log: {server_log})"


def failure_recorded_since(result_dir: str | os.PathLike, since: float) -> bool:
    """Whether the server wrote a ``job_failure.json`` under ``result_dir`` at or after ``since`` (epoch s):
    a file left by an earlier run of the same job folder does not count."""
    found = Path(result_dir).glob(f"**/{FAILURE_FILE}")
    return any(path.stat().st_mtime >= since for path in found)


SIMULATOR_WORKER = "nvflare.private.fed.app.simulator.simulator_worker"


def simulator_processes() -> list:
    """The simulator's site workers under this process, each after its own descendants (torchrun, trainer)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # it ended while being listed
            if SIMULATOR_WORKER in " ".join(proc.cmdline()):
                found += [*proc.children(recursive=True), proc]
    return found


def kill_all(processes: list) -> list[int]:
    """SIGKILL each process; the pids of those that were still there."""
    import psutil

    killed = []
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # it ended on its own meanwhile
            proc.kill()
            killed.append(proc.pid)
    return killed


@contextlib.contextmanager
def ending_a_hung_simulator(
    result_dir: str | os.PathLike,
    grace_s: float | None = None,
    poll_s: float = 2.0,
    processes: Callable[[], list] = simulator_processes,
):
    """Around the simulator's run in this process, once the server has recorded why it stopped the job
    (``job_failure.json``): if the run is still going ``grace_s`` later (default ``SIMULATOR_END_GRACE_S``),
    SIGKILL the simulator's site processes so that it returns and job.py reports the recorded reason
    instead of waiting forever; and when the run returns, end any it left behind (NVFlare 2.9's
    simulator stops waiting for a site worker after its ``simulator_worker_timeout`` and leaves it up).
    Seen with NVFlare 2.9: after two of its workers had started the same site, the aborted job's site
    processes stayed up. Yields the list of the pids it killed."""
    grace_s = SIMULATOR_END_GRACE_S if grace_s is None else grace_s
    started, done, killed = time.time() - 1.0, threading.Event(), []  # mtimes may be whole seconds

    def watch():
        failed_at = None
        while not done.wait(poll_s):
            if failed_at is None:
                failed_at = time.monotonic() if failure_recorded_since(result_dir, started) else None
            elif time.monotonic() - failed_at >= grace_s:
                killed.extend(kill_all(processes()))
                print(f"job.py: the simulator was still running {grace_s:.0f} s after the server stopped the "
                      f"job; ended its {len(killed)} site processes", file=sys.stderr, flush=True)  # fmt: skip
                return

    thread = threading.Thread(target=watch, name="hung-simulator-watch", daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        done.set()
        thread.join()
        if failure_recorded_since(result_dir, started):
            left = kill_all(processes())
            if left:
                killed.extend(left)
                print(f"job.py: ended {len(left)} site processes the simulator left running after the job "
                      "stopped", file=sys.stderr, flush=True)  # fmt: skip
