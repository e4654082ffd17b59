"""The job's console events, carried by NVFlare itself: what job.py's live view (console_view) shows.

    python job.py --demo              # the live view these events drive (--verbose: NVFlare's own stream)

Sites already stream their round metrics to the server through NVFlare's tracking channel (the Client
API ``SummaryWriter`` -> ``fed.analytix_log_stats`` events -> the TensorBoard receiver). Progress rides
the same channel under ``console/*`` tags (:class:`SiteProgress`), so no new connection, port or file
on a site is needed and it works wherever the sites run. On the server three components turn what
NVFlare sees into one line of JSON each in ``console_events.jsonl`` in the server's run folder:

* :class:`ConsoleRecorder` (an NVFlare ``AnalyticsReceiver``): rounds starting and aggregated, the
  sites' tracked values, the end of the run; it also answers the admin's ``show_stats`` with the current
  round, which is how ``--env prod`` (no access to the server's files) follows the rounds;
* :class:`ConsoleResultFilter` (a task-result filter): a site's result arrived, or its error.

A file, not an in-process queue: in the simulator the server runs in job.py's process tree, but in PoC
it is a separate process; both write the file under the workspace job.py already knows.
"""

from __future__ import annotations

import json
import os
import threading
import time

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.streaming import AnalyticsReceiver
from nvflare.widgets.info_collector import InfoCollector

from .console_view import EVENTS_FILE, STATS_GROUP, TAG_PREFIX

STEP_REPORT_SECONDS = 1.0  # a step report at most this often: the view redraws twice a second
_write_lock = threading.Lock()  # the recorder and the filter share the file (threads of one server)


def events_path(fl_ctx) -> str:
    engine = fl_ctx.get_engine()
    return os.path.join(engine.get_workspace().get_run_dir(fl_ctx.get_job_id()), EVENTS_FILE)


def append_event(path: str, event: dict) -> None:
    """One whole line per event, flushed: the reader in job.py never sees half an event."""
    line = json.dumps({**event, "time": time.time()}) + "\n"
    with _write_lock, open(path, "a", encoding="utf-8") as f:
        f.write(line)


class ConsoleRecorder(AnalyticsReceiver):
    """On the server: rounds, the sites' tracked values and the run's end, as console events."""

    def __init__(self):
        super().__init__()
        self._path: str | None = None
        self._round: int | None = None

    def initialize(self, fl_ctx) -> None:
        self._path = events_path(fl_ctx)

    def handle_event(self, event_type: str, fl_ctx) -> None:
        super().handle_event(event_type, fl_ctx)  # START_RUN, the analytics events, END_RUN
        kinds = {AppEventType.ROUND_STARTED: "round", AppEventType.AFTER_AGGREGATION: "aggregated"}
        if self._path and event_type in kinds:
            round_ = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            append_event(self._path, {"kind": kinds[event_type], "round": round_})
            self._round = round_
        elif event_type == InfoCollector.EVENT_TYPE_GET_STATS:  # the admin's show_stats (job.py --env prod)
            collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR)
            if collector is not None and self._round is not None:
                collector.add_info(STATS_GROUP, {"current_round": self._round})

    def save(self, fl_ctx, shareable: Shareable, record_origin: str) -> None:
        data = AnalyticsData.from_dxo(from_shareable(shareable))
        if data.data_type != AnalyticsDataType.SCALAR:
            return
        event = {"kind": "metric", "site": record_origin, "tag": data.tag, "value": float(data.value),
                 "step": data.step}  # fmt: skip
        append_event(self._path, event)

    def finalize(self, fl_ctx) -> None:
        append_event(self._path, {"kind": "end"})


class ConsoleResultFilter(Filter):
    """On the server, before the aggregator: which site's result arrived, and its error if it failed."""

    def process(self, shareable: Shareable, fl_ctx) -> Shareable:
        try:
            meta = from_shareable(shareable).meta or {}
        except ValueError:  # not a DXO: a dead trainer's error reply; fl.watch reports that failure
            meta = {"error": "no result (the site's training process stopped)"}
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else meta.get("site", "?")
        # The metrics come with the result, not only over the tracking channel, whose events may still be
        # on their way when the result is in. The round is the site's: a filter's context has none.
        metrics = meta.get(MetaKey.INITIAL_METRICS) or {}
        event = {
            "kind": "result",
            "site": site,
            "round": meta.get("round"),
            "error": meta.get("error") or None,
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        append_event(events_path(fl_ctx), event)
        return shareable


def site_progress(writer):
    """A Trainer callback reporting a site's round progress through ``writer`` (the Client API tracking
    writer, rank 0); ``start_round(r)`` before validating. The class is built here so the server, which
    imports this module for its components, never imports transformers."""
    from transformers import TrainerCallback

    class SiteProgress(TrainerCallback):
        def __init__(self):
            self.round, self._last = 0, 0.0

        def start_round(self, current_round: int) -> None:
            self.round = current_round
            writer.add_scalar(TAG_PREFIX + "validating", current_round, global_step=current_round)

        def on_train_begin(self, args, state, control, **kwargs):
            writer.add_scalar(TAG_PREFIX + "max_steps", state.max_steps, global_step=self.round)

        def on_step_end(self, args, state, control, **kwargs):
            now = time.monotonic()
            if now - self._last >= STEP_REPORT_SECONDS or state.global_step >= state.max_steps:
                self._last = now
                writer.add_scalar(TAG_PREFIX + "step", state.global_step, global_step=self.round)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                writer.add_scalar(TAG_PREFIX + "loss", float(logs["loss"]), global_step=self.round)

    return SiteProgress()
