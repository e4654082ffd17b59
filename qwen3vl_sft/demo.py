"""The CPU demo behind ``python job.py --demo``: everything offline, a few minutes on 2 cores.

1. builds the tiny Qwen3-VL (``demo/qwen3-vl-tiny``) and the synthetic PubMedVision-format data
   (``demo/PubMedVision_synth``) unless they exist;
2. shards it into ``demo/data/site-1..3`` with prepare_data's logic;
3. (job.py runs the federated job);
4. evaluates the base model and the final global model on the held-out ``test.json``, prints the
   table and writes ``demo/report/`` (metrics JSON + a PNG of per-round metrics per site).

Flags the user sets explicitly win; only values still at their defaults are replaced by the demo's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import DataConfig, JobConfig, ModelConfig, PrepareDataConfig, TrainConfig, with_defaults
from .data import synthetic
from .fileio import json_safe
from .model import tiny

DEMO_DIR = Path("demo")
# Measured on 2 CPU cores: 3 sites x 5 rounds x 100 steps reach 96 % held-out accuracy in under 3 minutes.
DEMO_JOB = {"num_sites": 3, "num_rounds": 5, "job_name": "qwen3-vl-fedavg-demo"}
DEMO_TRAIN = {
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 16,
    "max_steps": 100,
    "logging_steps": 20,
    "disable_progress_bar": True,
}
DEMO_DATA = {"dataloader_num_workers": 0, "cache_samples": True}
DEMO_RECORDS = 1500


def prepare_demo(job: JobConfig, model: ModelConfig, data: DataConfig, train: TrainConfig):
    """Build the tiny model and data if missing, shard the data, return the demo's configs."""
    from .data.prepare import prepare_shards

    model_dir = tiny.ensure(DEMO_DIR / "qwen3-vl-tiny")
    data_file = synthetic.ensure(
        DEMO_DIR / "PubMedVision_synth", synthetic.SyntheticSpec(num_records=DEMO_RECORDS)
    )
    job = with_defaults(job, {**DEMO_JOB, "data_dir": str(DEMO_DIR / "data")})
    prepare_shards(
        PrepareDataConfig(data_file=str(data_file), output_dir=job.data_dir, num_sites=job.num_sites),
    )
    model = with_defaults(model, {"model_name_or_path": str(model_dir)})
    return job, model, with_defaults(data, DEMO_DATA), with_defaults(train, DEMO_TRAIN)


def plot_rounds(rows: list[dict], path: Path) -> None:
    """Per-round training loss and validation accuracy, one line per site."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(
        axes,
        ("train_loss", "val_accuracy"),
        ("training loss", "validation accuracy (received global model)"),
        strict=True,
    ):
        for site in sorted({r["site"] for r in rows}):
            points = [(r["round"], r[key]) for r in rows if r["site"] == site and key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=site)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_demo(job: JobConfig, model: ModelConfig, data: DataConfig, summary) -> dict:
    """Before/after table on the held-out test set, plus the report files."""
    from transformers.utils import logging as hf_logging

    from .eval.evaluate import evaluate_model_dir

    test_file = Path(job.data_dir) / "test.json"
    hf_logging.disable_progress_bar()  # a weight-loading bar per tiny model is noise below the job's view
    try:
        before = evaluate_model_dir(model.model_name_or_path, data, test_file)
        after = evaluate_model_dir(summary.global_model_dir, data, test_file)
    finally:
        hf_logging.enable_progress_bar()
    out = DEMO_DIR / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot_rounds(summary.rows, out / "fl_metrics.png")
    result = {
        "base": before,
        "global": after,
        "rounds": summary.rows,
        "global_model_dir": summary.global_model_dir,
    }
    (out / "demo_results.json").write_text(json.dumps(json_safe(result), indent=2) + "\n")
    print(f"\nHeld-out test set ({test_file}, {after['samples']} samples)")
    print(f"{'model':<22}{'loss':>10}{'accuracy':>10}{'ROUGE-L':>10}")
    for label, scores in (("base (before FL)", before), (f"global (round {job.num_rounds - 1})", after)):
        accuracy = (
            "n/a" if math.isnan(scores["accuracy"]) else f"{scores['accuracy']:.1%}"
        )  # no short answers
        print(f"{label:<22}{scores['loss']:>10.4f}{accuracy:>10}{scores['rouge_l']:>10.4f}")
    print(f"Per-round metrics plot: {out / 'fl_metrics.png'}")
    return result
