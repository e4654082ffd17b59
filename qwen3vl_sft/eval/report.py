"""run_inference.py's output: each sample with every checkpoint's answer, the metrics table, and the
report files (report.json, report.csv, report.png, answers.jsonl).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import InferenceConfig
from ..data.records import PLACEHOLDER
from ..data.samples import RecordDataset
from ..fileio import check_writable
from .evaluate import first_answer, first_question
from .loading import Checkpoint

SHOWN_CHARS = 200

METRIC_COLUMNS = ("loss", "rouge_l", "token_f1", "exact_match")


@dataclass
class Evaluation:
    checkpoint: Checkpoint
    metrics: dict
    answers: list[str]


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    return text[:limit] + ("..." if len(text) > limit else "")


def question_text(record: dict) -> str:
    """The first question without its ``<image>`` placeholders (the image paths are shown apart)."""
    return re.sub(r"\s+", " ", first_question(record).replace(PLACEHOLDER, " ")).strip()


def format_sample(index: int, record: dict, image_paths: list[str], answers: dict[str, str]) -> str:
    """One sample in the seed's layout, with one labelled ``Model`` line per checkpoint (one model: the
    seed's unlabelled line)."""
    width = max(len(label) for label in answers)
    lines = [
        f"--- Sample {index} ---",
        f"Image: {', '.join(image_paths)}",
        f"Q: {shorten(question_text(record))}",
        f"Ground truth: {shorten(first_answer(record))}",
    ]
    if len(answers) == 1:  # one model: exactly the seed's line
        (answer,) = answers.values()
        lines.append(f"Model:        {shorten(answer) or '(empty answer)'}")
    else:
        for label, answer in answers.items():
            lines.append(
                f"Model [{label}]:{' ' * (width - len(label))} {shorten(answer) or '(empty answer)'}"
            )
    return "\n".join(lines) + "\n"


def _cell(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(results: list[Evaluation]) -> str:
    """Per-checkpoint metrics as an aligned text table."""
    header = ["checkpoint", "kind", *METRIC_COLUMNS, "samples", "short", "skipped", "samples/s"]
    rows = [header]
    for r in results:
        m = r.metrics
        metrics = [_cell(m[c]) for c in METRIC_COLUMNS]
        extra = [str(m["samples"]), str(m["short_answers"]), str(m["skipped_images"])]
        extra.append(_cell(m["samples_per_second"], 2))
        rows.append([r.checkpoint.label, r.checkpoint.kind, *metrics, *extra])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def report_rows(results: list[Evaluation]) -> list[dict]:
    """One flat row per checkpoint; NaN becomes None (JSON has no NaN)."""
    rows = []
    for r in results:
        metrics = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.metrics.items()}
        rows.append(
            {"label": r.checkpoint.label, "path": r.checkpoint.path, "kind": r.checkpoint.kind, **metrics}
        )
    return rows


def ensure_output_dir(path: str | os.PathLike) -> None:
    """Fail before minutes of evaluation, not after, when the report folder cannot be written."""
    check_writable(path, "--output_dir")


def write_report(output_dir, dataset: RecordDataset, results: list[Evaluation], cfg: InferenceConfig) -> dict:
    """report.json, report.csv, report.png and answers.jsonl in ``output_dir``; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = report_rows(results)
    paths = {name: out / name for name in ("report.json", "report.csv", "report.png", "answers.jsonl")}
    summary = {"data_file": str(cfg.data_file), "max_new_tokens": cfg.max_new_tokens, "checkpoints": rows}
    paths["report.json"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with paths["report.csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with paths["answers.jsonl"].open("w", encoding="utf-8") as f:
        for i, record in enumerate(dataset.records):
            answers = {r.checkpoint.label: r.answers[i] for r in results}
            item = {
                "id": record.get("id"),
                "question": question_text(record),
                "ground_truth": first_answer(record),
            }
            f.write(json.dumps({**item, "answers": answers}) + "\n")
    plot_report(rows, paths["report.png"])
    return paths


def plot_report(rows: list[dict], path: Path) -> None:
    """Bar chart: the [0, 1] scores side by side per checkpoint, and the answer loss apart (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in rows]
    scores = [("rouge_l", "ROUGE-L"), ("token_f1", "token F1"), ("exact_match", "exact match")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 4), width_ratios=[3, 1.4])
    width = 0.8 / len(scores)
    for i, (key, name) in enumerate(scores):
        values = [row[key] if row[key] is not None else 0.0 for row in rows]
        left.bar([x + i * width for x in range(len(rows))], values, width, label=name)
    left.set_xticks([x + width for x in range(len(rows))], labels, rotation=15)
    left.set_ylim(0, 1)
    left.set_title("answer scores (higher is better)")
    left.legend()
    right.bar(labels, [row["loss"] if row["loss"] is not None else 0.0 for row in rows], color="gray")
    right.set_title("answer loss (lower = better)")
    right.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
