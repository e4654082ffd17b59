"""The end-of-job report: per-round, per-site metrics read back from the server's TensorBoard events,
where the global model is, and the command that evaluates it."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path

from ..config import JobConfig
from .console_view import TAG_PREFIX
from .job import REPO_DIR, local_path


@dataclasses.dataclass
class Summary:
    """Per-round, per-site metrics read back from the server's TensorBoard events."""

    result_dir: str
    rows: list[dict]
    global_model_dir: str
    text: str


SUMMARY_COLUMNS = (
    "train_loss", "samples", "seconds", "received_mib", "sent_mib", "update_cosine", "val_loss", "val_accuracy",
    "val_rouge_l",
)  # fmt: skip
COLUMN_WIDTH = 11


def read_site_metrics(result_dir: str) -> list[dict]:
    """One row per (round, site) from ``tb_events/<site>/`` written by the TensorBoard receiver."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows: dict[tuple[int, str], dict] = {}
    for site_dir in sorted(Path(result_dir).glob("**/tb_events/site-*")):
        acc = EventAccumulator(str(site_dir), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(TAG_PREFIX):
                continue  # the live view's progress, not a round metric
            for event in acc.Scalars(tag):
                key = tag.rsplit("/", 1)[-1]
                rows.setdefault((event.step, site_dir.name), {"round": event.step, "site": site_dir.name})[
                    key
                ] = event.value
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], int(k[1].split("-")[1])))]


def format_rows(rows: list[dict]) -> str:
    widths = {c: max(COLUMN_WIDTH, len(c) + 2) for c in SUMMARY_COLUMNS}
    header = f"{'round':>5} {'site':<8}" + "".join(f"{c:>{w}}" for c, w in widths.items())
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(f"{row[c]:>{w}.4g}" if c in row else f"{'-':>{w}}" for c, w in widths.items())
        lines.append(f"{row['round']:>5} {row['site']:<8}{cells}")
    return "\n".join(lines)


def traffic_line(rows: list[dict]) -> str:
    """Cumulative MiB both ways over all sites and rounds, as the sites counted their packets."""
    down = sum(row.get("received_mib", 0.0) for row in rows)
    up = sum(row.get("sent_mib", 0.0) for row in rows)
    rounds = len({row["round"] for row in rows})
    return f"Traffic over {rounds} round(s), all sites: {down:.2f} MiB server -> sites, {up:.2f} MiB sites -> server"


def evaluate_command(job: JobConfig, global_dir: str, image_root: str = "") -> str:
    """The run_inference.py command for the global model, quoted for a POSIX shell and runnable as
    printed from any folder (absolute paths; the base model is recorded in the global model itself)."""
    data_dir = local_path(job.data_dir).resolve()
    test_file = data_dir / "test.json"
    script = REPO_DIR / "run_inference.py"
    args = [sys.executable, str(script), "--model_path", global_dir or "<global_model_hf>"]
    if image_root:  # the job's own --image_root; without it run_inference reads the shards' manifest
        args += ["--image_root", os.path.abspath(image_root)]
    if job.env == "prod" and not data_dir.is_dir():  # the data is the sites'
        return shlex.join(args) + f" --data_file <a held-out file> ({job.data_dir} is not on this machine)"
    if not test_file.is_file():  # prepared with --test_fraction 0: the user has a held-out file of their own
        return shlex.join(args) + " --data_file <your held-out file> (no test.json: --test_fraction was 0)"
    return shlex.join([*args, "--data_file", str(test_file)])


def summarize(job: JobConfig, result_dir: str | None, image_root: str = "") -> Summary:
    """The end-of-job report: metrics table, where the global model is, how to evaluate it."""
    # Absolute: the printed model path and evaluation command must work from any folder.
    result_dir = str(Path(result_dir or Path(job.workspace) / job.job_name).resolve())
    rows = read_site_metrics(result_dir)
    found = sorted(Path(result_dir).glob("**/global_model_hf"))
    global_dir = str(found[0]) if found else ""
    text = "\n".join(
        [
            f"Job finished. Results: {result_dir}",
            format_rows(rows) if rows else "(no per-site metrics were recorded)",
            traffic_line(rows),
            f"Global model (HF directory): {global_dir or 'not written'}",
            f"Evaluate it: {evaluate_command(job, global_dir, image_root)}",
        ]
    )
    return Summary(result_dir=result_dir, rows=rows, global_model_dir=global_dir, text=text)
