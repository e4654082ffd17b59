"""job.py's console: one live view of the federated job, or one line per event when stdout is no terminal.

    python job.py --demo              # in a terminal: the live view; `| tee demo.log`: the plain lines
    python job.py --demo --verbose    # NVFlare's and the sites' full stream instead

It reads the events the server writes (qwen3vl_sft.fl.console, ``console_events.jsonl``): rounds,
each site's progress and tracked metrics, each result, each aggregation. :class:`JobView` turns events
into text and holds no I/O, so tests feed it literal events; :class:`ConsoleRunner` tails the file in a
thread and draws. NVFlare's and the sites' full logs stay in their files, which the view names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
import time
from pathlib import Path

EVENTS_FILE = "console_events.jsonl"  # in the server's run folder (written by qwen3vl_sft.fl.console)
STATS_GROUP = "qwen3vl_round"  # the server's show_stats group holding the current round (--env prod)
TAG_PREFIX = "console/"  # tracked values that are progress, not metrics (kept out of the summary table)
REDRAW_SECONDS = 0.5
VAL_KEYS = ("val_loss", "val_accuracy", "val_rouge_l")


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclasses.dataclass
class SiteState:
    state: str = "waiting"  # waiting, validating, training, sending, done, failed
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    error: str = ""
    metrics: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        if self.state == "training":
            loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
            return f"training step {self.step}/{self.max_steps or '?'}{loss}"
        if self.state == "sending":
            return f"sending {self.metrics.get('sent_mib', 0.0):.2f} MiB"
        if self.state == "failed":
            return f"failed: {self.error}"
        return self.state

    def progress(self) -> float:
        """The share of this site's round done, for the ETA."""
        if self.state in ("sending", "done", "failed"):
            return 1.0
        return self.step / self.max_steps if self.state == "training" and self.max_steps else 0.0


class JobView:
    """The job's state from console events; ``apply`` returns the plain lines an event produces."""

    def __init__(self, sites: list[str], num_rounds: int, start_round: int = 0, now=time.monotonic):
        self.sites = {site: SiteState() for site in sites}
        self.num_rounds, self.start_round, self.now = num_rounds, start_round, now
        self.round: int | None = None
        self.started: float | None = None  # when the first round started
        self.rounds_done = 0
        self.aggregated: int | None = None  # the last round aggregated
        self.finished = False

    def apply(self, event: dict) -> list[str]:
        handler = getattr(self, f"_on_{event.get('kind')}", None)
        return handler(event) if handler else []

    def _on_round(self, event: dict) -> list[str]:
        self.round = event["round"]
        self.started = self.started if self.started is not None else self.now()
        self.sites = {site: SiteState() for site in self.sites}
        return []

    def _on_metric(self, event: dict) -> list[str]:
        site = self.sites.setdefault(event["site"], SiteState())
        tag, value = event["tag"], event["value"]
        if not tag.startswith(TAG_PREFIX):
            site.metrics[tag.rsplit("/", 1)[-1]] = value
            site.state = "sending" if tag.endswith("sent_mib") and site.state != "done" else site.state
            return []
        name = tag[len(TAG_PREFIX) :]
        if name == "validating":
            site.state = "validating"
        elif name in ("max_steps", "step"):
            site.state = "training"
            setattr(site, name, int(value))
        elif name == "loss":
            site.loss = value
        return []

    def _on_result(self, event: dict) -> list[str]:
        site = self.sites.setdefault(event["site"], SiteState())
        round_ = event["round"] if event.get("round") is not None else self.round
        site.metrics.update(event.get("metrics") or {})
        if event.get("error"):
            site.state, site.error = "failed", event["error"]
            return [f"  {event['site']} round {round_}: failed: {site.error}"]
        site.state = "done"
        return [f"  {event['site']} round {round_}: done, {self._site_summary(site)}"]

    @staticmethod
    def _site_summary(site: SiteState) -> str:
        m = site.metrics
        parts = [f"train_loss {m['train_loss']:.4f}"] if "train_loss" in m else []
        parts += [f"val_loss {m['val_loss']:.4f}"] if "val_loss" in m else []  # the rest: the round's line
        if "sent_mib" in m:
            parts.append(f"sent {m['sent_mib']:.2f} MiB")
        if "seconds" in m:
            parts.append(f"{m['seconds']:.0f} s training")
        return ", ".join(parts) or "no metrics"

    def _on_aggregated(self, event: dict) -> list[str]:
        self.rounds_done += 1
        self.aggregated = event["round"]
        return [self.aggregate_line(event["round"])]

    def _on_end(self, event: dict) -> list[str]:
        self.finished = True
        return []

    def aggregate_line(self, round_index: int) -> str:
        """Round r: sites averaged, MiB each way, the mean validation of the global the sites received."""
        done = [s for s in self.sites.values() if s.state == "done"]
        down = sum(s.metrics.get("received_mib", 0.0) for s in done)
        up = sum(s.metrics.get("sent_mib", 0.0) for s in done)
        line = (f"{self.round_name(round_index)}: averaged {len(done)} of {len(self.sites)} sites, "
                f"{down:.2f} MiB down, {up:.2f} MiB up")  # fmt: skip
        vals = [f"{k} {mean(s.metrics[k] for s in done if k in s.metrics):.4f}" for k in VAL_KEYS
                if any(k in s.metrics for s in done)]  # fmt: skip
        if vals:  # validation scores the model each site received: the global of the round before
            line += "; received global: " + ", ".join(vals)
        return f"{line}; {self.timing()}"

    def round_name(self, round_index: int) -> str:
        """NVFlare's round number (the summary table's, from 0), and how far through the job it is."""
        return f"round {round_index} ({round_index + 1} of {self.num_rounds})"

    def fraction_done(self) -> float:
        """Rounds of this run done, the running round counted by its sites' progress."""
        running = 0.0
        if self.round is not None and self.round != self.aggregated and not self.finished and self.sites:
            running = mean(s.progress() for s in self.sites.values())
        total = max(1, self.num_rounds - self.start_round)
        return min(1.0, (self.rounds_done + running) / total)

    def timing(self) -> str:
        if self.started is None:
            return "starting"
        elapsed, share = self.now() - self.started, self.fraction_done()
        eta = clock(elapsed * (1 - share) / share) if share > 0 else "?"
        return f"elapsed {clock(elapsed)}, ETA {eta}"

    def live_lines(self) -> list[str]:
        """The live block: the round, each site's state, elapsed time and ETA."""
        if self.round is None:
            return ["waiting for the sites to start (NVFlare is launching them) ..."]
        head = f"{self.round_name(self.round)}  {self.timing()}"
        width = max(len(site) for site in self.sites)
        return [head, *(f"  {site:<{width}}  {state.describe()}" for site, state in self.sites.items())]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


class ConsoleRunner:
    """Tails ``console_events.jsonl`` under ``search_dir`` in a thread and draws ``view``: live (ANSI
    redraw of the block under the lines already printed) on a terminal, plain lines otherwise."""

    def __init__(self, view: JobView, search_dir: str | Path, stream, live: bool):
        self.view, self.search_dir, self.stream, self.live = view, Path(search_dir), stream, live
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-console", daemon=True)
        self._file = None
        self._drawn = 0  # lines of the live block now on screen
        self._since = time.time()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self._step()  # what arrived since the last poll, then the block is left as it stands
        if self._file:
            self._file.close()

    def _run(self) -> None:
        while not self._stop.wait(REDRAW_SECONDS):
            self._step()

    def _step(self) -> None:
        lines = [line for event in self._read_events() for line in self.view.apply(event)]
        if self.live:
            self._clear()
        for line in lines:
            self.stream.write(line + "\n")
        if self.live and not self.view.finished:
            block = self.view.live_lines()
            # Cut to the terminal's width: a wrapped line would make the next redraw climb too few lines.
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("".join(line[:width] + "\x1b[K\n" for line in block))
            self._drawn = len(block)
        self.stream.flush()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the block's first line, erase below
            self._drawn = 0

    def _read_events(self) -> list[dict]:
        if self._file is None:
            # Files older than this console are an earlier run's (the simulator clears them later).
            found = [p for p in self.search_dir.glob(f"**/{EVENTS_FILE}") if p.stat().st_mtime >= self._since]
            if not found:
                return []
            self._file = open(max(found, key=lambda p: p.stat().st_mtime), "rb")  # noqa: SIM115 - kept open
        events = []
        while (line := self._file.readline()).endswith(b"\n"):
            events.append(json.loads(line))
        if line:  # a line still being written: read it whole next time
            self._file.seek(-len(line), 1)
        return events
