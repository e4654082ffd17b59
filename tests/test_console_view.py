"""job.py's console on literal events: the plain lines, the live block, the tail of the events file.

python -m pytest -q tests/test_console_view.py
"""

import io
import json
from pathlib import Path

from qwen3vl_sft.fl.console_view import EVENTS_FILE, ConsoleRunner, JobView, clock


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def metric(site, tag, value, step=0):
    return {"kind": "metric", "site": site, "tag": tag, "value": value, "step": step}


def finished_site(site, loss, val_loss, round_=0):
    return [
        metric(site, "val_loss", val_loss, round_),
        metric(site, "train_loss", loss, round_),
        metric(site, "seconds", 12.4, round_),
        metric(site, "received_mib", 1.25, round_),
        metric(site, "sent_mib", 0.5, round_),
        {"kind": "result", "site": site, "round": round_, "error": None},
    ]


def apply_all(view, events):
    return [line for event in events for line in view.apply(event)]


def test_a_round_in_plain_lines():
    now = FakeClock()
    view = JobView(["site-1", "site-2"], num_rounds=2, now=now)
    lines = apply_all(view, [{"kind": "round", "round": 0}])
    now.t += 30
    lines += apply_all(view, finished_site("site-1", 1.5, 6.0) + finished_site("site-2", 1.7, 6.4))
    lines += view.apply({"kind": "aggregated", "round": 0})
    assert lines == [
        "  site-1 round 0: done, train_loss 1.5000, val_loss 6.0000, sent 0.50 MiB, 12 s training",
        "  site-2 round 0: done, train_loss 1.7000, val_loss 6.4000, sent 0.50 MiB, 12 s training",
        "round 0 (1 of 2): averaged 2 of 2 sites, 2.50 MiB down, 1.00 MiB up; received global: val_loss 6.2000; "
        "elapsed 0:30, ETA 0:30",
    ]


def test_the_results_own_metrics_complete_those_still_on_their_way():
    view = JobView(["site-1"], num_rounds=1, now=FakeClock())
    view.apply({"kind": "round", "round": 0})
    view.apply(metric("site-1", "train_loss", 0.5))
    line = view.apply({"kind": "result", "site": "site-1", "round": 0, "error": None,
                       "metrics": {"train_loss": 0.5, "val_loss": 0.75, "sent_mib": 0.25}})  # fmt: skip
    assert line == ["  site-1 round 0: done, train_loss 0.5000, val_loss 0.7500, sent 0.25 MiB"]


def test_a_failed_site_is_named_with_its_reason_and_left_out_of_the_average():
    view = JobView(["site-1", "site-2"], num_rounds=3, now=FakeClock())
    view.apply({"kind": "round", "round": 1})
    lines = apply_all(view, finished_site("site-1", 0.4, 0.5, 1))
    lines += view.apply({"kind": "result", "site": "site-2", "round": 1, "error": "DataError: bad image"})
    lines += view.apply({"kind": "aggregated", "round": 1})
    assert lines[1] == "  site-2 round 1: failed: DataError: bad image"
    assert lines[2].startswith("round 1 (2 of 3): averaged 1 of 2 sites, 1.25 MiB down, 0.50 MiB up")
    assert "  site-2  failed: DataError: bad image" in view.live_lines()


def test_live_block_follows_each_site_through_its_round():
    now = FakeClock()
    view = JobView(["site-1", "site-2", "site-3"], num_rounds=4, now=now)
    assert view.live_lines() == ["waiting for the sites to start (NVFlare is launching them) ..."]
    view.apply({"kind": "round", "round": 0})
    view.apply(metric("site-1", "console/validating", 0))
    for event in (metric("site-2", "console/max_steps", 100), metric("site-2", "console/step", 40),
                  metric("site-2", "console/loss", 0.3125)):  # fmt: skip
        view.apply(event)
    view.apply(metric("site-3", "sent_mib", 0.62))
    now.t += 60
    assert view.live_lines() == [
        "round 0 (1 of 4)  elapsed 1:00, ETA 7:34",  # sites 0, 0.4 and 1 through round 1 of 4: 11.7 % done
        "  site-1  validating",
        "  site-2  training step 40/100, loss 0.3125",
        "  site-3  sending 0.62 MiB",
    ]


def test_a_new_round_resets_the_sites_and_the_end_stops_the_block():
    view = JobView(["site-1"], num_rounds=2, now=FakeClock())
    apply_all(view, [{"kind": "round", "round": 0}, *finished_site("site-1", 1.0, 2.0)])
    assert view.live_lines()[1] == "  site-1  done"
    view.apply({"kind": "aggregated", "round": 0})
    view.apply({"kind": "round", "round": 1})
    assert view.live_lines()[1] == "  site-1  waiting"
    view.apply({"kind": "end"})
    assert view.finished and view.fraction_done() == 0.5


def test_clock():
    assert (clock(5), clock(75), clock(3725)) == ("0:05", "1:15", "1:02:05")


def test_runner_tails_whole_lines_and_ignores_an_earlier_runs_file(tmp_path):
    run_dir = tmp_path / "server" / "simulate_job"
    run_dir.mkdir(parents=True)
    out = io.StringIO()
    runner = ConsoleRunner(JobView(["site-1"], 1), tmp_path, out, live=False)
    events = [{"kind": "round", "round": 0}, *finished_site("site-1", 1.0, 2.0)]
    text = "".join(json.dumps(e) + "\n" for e in events)
    (run_dir / EVENTS_FILE).write_text(text + '{"kind": "aggreg')  # the last event half written
    runner._step()
    assert (
        out.getvalue()
        == "  site-1 round 0: done, train_loss 1.0000, val_loss 2.0000, sent 0.50 MiB, 12 s training\n"
    )
    with open(run_dir / EVENTS_FILE, "a") as f:
        f.write('ated", "round": 0}\n')
    runner._step()
    assert out.getvalue().splitlines()[-1].startswith("round 0 (1 of 1): averaged 1 of 1 sites")
    runner._file.close()


def test_live_runner_redraws_its_block_under_the_printed_lines(tmp_path):
    out = io.StringIO()
    runner = ConsoleRunner(JobView(["site-1"], 1, now=FakeClock()), tmp_path, out, live=True)
    (tmp_path / EVENTS_FILE).write_text(json.dumps({"kind": "round", "round": 0}) + "\n")
    runner._step()
    assert out.getvalue() == "round 0 (1 of 1)  elapsed 0:00, ETA ?\x1b[K\n  site-1  waiting\x1b[K\n"
    with open(tmp_path / EVENTS_FILE, "a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in finished_site("site-1", 1.0, 2.0)))
    runner._step()
    redraw = out.getvalue().split("waiting\x1b[K\n", 1)[1]
    assert redraw.startswith("\x1b[2F\x1b[J  site-1 round 0: done, train_loss 1.0000")  # up 2 lines, erase
    assert redraw.endswith("  site-1  done\x1b[K\n")
    runner._file.close()


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, global_step=None):
        self.calls.append((tag, value, global_step))


def test_a_sites_progress_goes_out_as_console_tags_of_its_round():
    from transformers import TrainerControl, TrainerState

    from qwen3vl_sft.fl.console import site_progress

    writer = FakeWriter()
    progress = site_progress(writer)
    progress.start_round(3)
    state = TrainerState(max_steps=10)
    progress.on_train_begin(None, state, TrainerControl())
    for step in (1, 2, 10):  # within a second: only the first and the last step are reported
        state.global_step = step
        progress.on_step_end(None, state, TrainerControl())
    progress.on_log(None, state, TrainerControl(), logs={"loss": 0.25, "grad_norm": 1.0})
    progress.on_log(None, state, TrainerControl(), logs={"train_runtime": 5.0})
    assert writer.calls == [("console/validating", 3, 3), ("console/max_steps", 10, 3), ("console/step", 1, 3),
                            ("console/step", 10, 3), ("console/loss", 0.25, 3)]  # fmt: skip


def test_nvflare_logs_to_its_files_only_unless_verbose():
    from qwen3vl_sft.config import JobConfig
    from qwen3vl_sft.fl import job as fl_job

    config = json.loads(Path(fl_job.files_only_log_config()).read_text())
    assert "consoleHandler" not in config["loggers"]["root"]["handlers"]
    assert {"logFileHandler", "errorFileHandler"} <= set(config["loggers"]["root"]["handlers"])
    assert fl_job.execution_env(JobConfig(verbose=True), 0).log_config is None
