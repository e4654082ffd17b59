"""Communication experiment: accuracy against bytes for each way of exchanging the model, on CPU.

    python experiments/communication.py                                  # 16 jobs, ~40 min on 2 idle cores
    python experiments/communication.py --modes int8,nf4 --learning_rates 1e-3 --num_rounds 3   # quicker
    python experiments/communication.py --help

Rows of an earlier run in the same ``--work_dir`` (same job settings) are kept, so the experiment can
grow one mode or learning rate at a time.

For every mode and learning rate, the same 3-site FedAvg job of job.py (tiny Qwen3-VL, synthetic
PubMedVision-format data, NVFlare simulator) runs ``num_rounds`` rounds; the modes are

* ``bf16-weights``: ``--exchange weights`` (trained weights in bf16 both ways: NVFlare's example);
* ``fp32-diff``: ``--exchange update --compression none`` (fp32 master, fp32 changes both ways);
* ``int8``, ``nf4``: the update exchange with that codec (error feedback on); ``int8-no-ef``,
  ``nf4-no-ef``: the same without error feedback;
* ``lora``, ``lora-int8``: LoRA adapters (r 16) with fp32 / int8 changes.

Per round the sites validate the global model they receive on their own held-out ``val.json``
(``val_accuracy``: exact match on short answers), so round r's mean is the accuracy after r rounds;
the final global model is also scored on ``test.json``. The traffic is what the sites counted
(``received_mib`` + ``sent_mib``, all sites, both ways), and the same messages are counted again at
Qwen3-VL-2B's dimensions (``compression.coded_bytes`` on the meta device). Writes ``results.json``,
``communication.png`` (accuracy against cumulative MiB, one line per mode, a panel per learning
rate) and ``experiment.log`` to ``--work_dir``, and prints one table.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the package lives at the repo root
sys.path.insert(0, str(REPO / "bench"))

from qwen3vl_sft.config import (  # noqa: E402
    DataConfig,
    ExchangeConfig,
    JobConfig,
    ModelConfig,
    PrepareDataConfig,
    TrainConfig,
    option,
    parse,
)

TARGET_ACCURACY = 0.90
MODES: dict[str, tuple[dict, dict]] = {  # name -> (ModelConfig changes, ExchangeConfig changes)
    "bf16-weights": ({}, {"exchange": "weights"}),
    "fp32-diff": ({}, {"compression": "none"}),
    "int8": ({}, {"compression": "int8"}),
    "nf4": ({}, {"compression": "nf4"}),
    "int8-no-ef": ({}, {"compression": "int8", "error_feedback": False}),
    "nf4-no-ef": ({}, {"compression": "nf4", "error_feedback": False}),
    "lora": ({"lora": True, "lora_r": 16, "lora_alpha": 32}, {"compression": "none"}),
    "lora-int8": ({"lora": True, "lora_r": 16, "lora_alpha": 32}, {"compression": "int8"}),
}


@dataclass
class CommunicationConfig:
    work_dir: str = option("/tmp/qwen3vl_communication", "Where data, jobs, results.json and the PNG go.")
    modes: str = option(",".join(MODES), f"Comma-separated modes out of {', '.join(MODES)}.")
    learning_rates: str = option(
        "1e-5,1e-3", "Comma-separated learning rates (1e-5: where bf16 weights break)."
    )
    num_sites: int = option(3, "Sites (IID shards).")
    num_rounds: int = option(6, "FedAvg rounds per job.")
    max_steps: int = option(40, "Steps per site per round.")
    batch_size: int = option(8, "Samples per step.")
    num_records: int = option(1500, "Synthetic records (as the demo).")
    master_port_base: int = option(31500, "torchrun ports of the sites (site-i: base + i - 1).")


def build_data(exp: CommunicationConfig, work: Path) -> tuple[Path, Path]:
    """(tiny model dir, shard dir): built once, reused by every job."""
    from qwen3vl_sft.data import synthetic
    from qwen3vl_sft.data.prepare import prepare_shards
    from qwen3vl_sft.model import tiny

    model_dir = tiny.ensure(work / "qwen3-vl-tiny")
    data_file = synthetic.ensure(work / "synth", synthetic.SyntheticSpec(num_records=exp.num_records))
    data_dir = work / "data"
    if not (data_dir / "test.json").is_file():
        prepare_shards(
            PrepareDataConfig(data_file=str(data_file), output_dir=str(data_dir), num_sites=exp.num_sites)
        )
    return model_dir, data_dir


def run_mode(exp, mode: str, lr: float, model_dir: Path, data_dir: Path, work: Path) -> dict:
    """One FedAvg job; returns its per-round rows, test accuracy and loss."""
    from federated_benefit import quiet

    from qwen3vl_sft.demo import DEMO_DATA
    from qwen3vl_sft.eval.evaluate import evaluate_model_dir
    from qwen3vl_sft.fl import job as fl_job
    from qwen3vl_sft.fl.summary import summarize

    model_changes, exchange_changes = MODES[mode]
    name = f"{mode}-lr{lr:g}"
    job = JobConfig(num_sites=exp.num_sites, num_rounds=exp.num_rounds, data_dir=str(data_dir),
                    workspace=str(work / "jobs"), job_name=name, master_port_base=exp.master_port_base)  # fmt: skip
    model = ModelConfig(model_name_or_path=str(model_dir), **model_changes)
    train = TrainConfig(learning_rate=lr, max_steps=exp.max_steps, per_device_train_batch_size=exp.batch_size,
                        logging_steps=1000, disable_progress_bar=True)  # fmt: skip
    data = DataConfig(**DEMO_DATA)
    exchange = ExchangeConfig(**exchange_changes)
    start = time.monotonic()
    with quiet(work / "experiment.log"):
        recipe = fl_job.build_recipe(job, model, data, train, exchange=exchange)
        summary = summarize(job, recipe.run(fl_job.execution_env(job, 0)).get_result())
        scores = evaluate_model_dir(
            summary.global_model_dir, data, data_dir / "test.json", base_model=str(model_dir)
        )
    return {"mode": mode, "lr": lr, "rows": summary.rows, "test_accuracy": scores["accuracy"],
            "test_loss": scores["loss"], "seconds": time.monotonic() - start}  # fmt: skip


def curve(result: dict, num_rounds: int) -> list[tuple[float, float | None]]:
    """(cumulative MiB, mean site val accuracy) after 0..R rounds; the last point is test.json's."""
    by_round: dict[int, list[dict]] = {}
    for row in result["rows"]:
        by_round.setdefault(int(row["round"]), []).append(row)
    points, spent = [], 0.0
    for r in range(num_rounds):
        rows = by_round.get(r, [])
        accuracies = [row["val_accuracy"] for row in rows if "val_accuracy" in row]
        points.append((spent, sum(accuracies) / len(accuracies) if accuracies else None))
        spent += sum(row.get("received_mib", 0.0) + row.get("sent_mib", 0.0) for row in rows)
    points.append((spent, result["test_accuracy"]))
    return points


def scaled_to_2b(result: dict, shapes_2b: dict, exp: CommunicationConfig) -> float:
    """MiB the same messages take at Qwen3-VL-2B's dimensions (full SFT or LoRA r 16), all sites."""
    from qwen3vl_sft.fl.compression import coded_bytes
    from qwen3vl_sft.fl.exchange import full_codec

    model_changes, exchange_changes = MODES[result["mode"]]
    shapes = shapes_2b["lora" if model_changes.get("lora") else "full"]
    exchange = ExchangeConfig(**exchange_changes)
    if exchange.exchange == "weights":
        per_round = [2 * coded_bytes(shapes, "bf16")] * exp.num_rounds
    else:
        codec = exchange.compression
        per_round = [coded_bytes(shapes, full_codec(codec) if r == 0 else codec) + coded_bytes(shapes, codec)
                     for r in range(exp.num_rounds)]  # fmt: skip
    return exp.num_sites * sum(per_round) / 2**20


def shapes_at_2b(work: Path) -> dict[str, dict]:
    from bench_exchange import write_config_dir

    from qwen3vl_sft.model.weights import exchanged_tensors, meta_model

    config_dir = work / "qwen3-vl-2b-config"
    if not (config_dir / "config.json").is_file():
        config_dir.mkdir(parents=True, exist_ok=True)
        write_config_dir(config_dir)
    out = {}
    for kind, changes in {"full": {}, "lora": {"lora": True, "lora_r": 16, "lora_alpha": 32}}.items():
        model = meta_model(ModelConfig(model_name_or_path=str(config_dir), **changes))
        out[kind] = {n: tuple(t.shape) for n, t in exchanged_tensors(model).items()}
    return out


def summary_row(result: dict, exp: CommunicationConfig, shapes_2b: dict) -> dict:
    points = curve(result, exp.num_rounds)
    reached = next(((k, mib) for k, (mib, acc) in enumerate(points) if acc is not None and acc >= TARGET_ACCURACY),
                   None)  # fmt: skip
    return {"mode": result["mode"], "lr": result["lr"], "rounds_to_target": reached[0] if reached else None,
            "mib_to_target": reached[1] if reached else None, "total_mib": points[-1][0],
            "total_mib_2b": scaled_to_2b(result, shapes_2b, exp), "test_accuracy": result["test_accuracy"],
            "test_loss": result["test_loss"], "seconds": result["seconds"], "curve": points}  # fmt: skip


def format_table(rows: list[dict]) -> str:
    header = (f"{'mode':<13}{'lr':>7}{'rounds to 90%':>15}{'MiB to 90%':>12}{'MiB total':>11}"
              f"{'GiB total @2B':>15}{'test acc':>10}{'test loss':>11}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in rows:
        to_target = "-" if r["rounds_to_target"] is None else str(r["rounds_to_target"])
        mib = "-" if r["mib_to_target"] is None else f"{r['mib_to_target']:.1f}"
        lines.append(f"{r['mode']:<13}{r['lr']:>7g}{to_target:>15}{mib:>12}{r['total_mib']:>11.1f}"
                     f"{r['total_mib_2b'] / 1024:>15.1f}{100 * r['test_accuracy']:>9.1f}%{r['test_loss']:>11.3f}")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in rows})
    fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4.5), squeeze=False)
    for ax, lr in zip(axes[0], lrs, strict=True):
        for r in (r for r in rows if r["lr"] == lr):
            points = [(mib, acc) for mib, acc in r["curve"] if acc is not None and math.isfinite(acc)]
            ax.plot(
                [max(m, 1e-2) for m, _ in points], [100 * a for _, a in points], marker="o", label=r["mode"]
            )
        ax.set(xscale="log", xlabel="cumulative MiB, all sites, both ways", ylabel="held-out accuracy (%)",
               title=f"lr {lr:g}")  # fmt: skip
        ax.axhline(100 * TARGET_ACCURACY, color="grey", linestyle=":")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def earlier_rows(path: Path, exp: CommunicationConfig) -> list[dict]:
    """Rows of an earlier run in the same --work_dir with the same job settings: the experiment grows
    by mode and learning rate instead of starting over (one table and one plot hold them all)."""
    import json

    if not path.is_file():
        return []
    earlier = json.loads(path.read_text(encoding="utf-8"))
    same = {k: v for k, v in earlier["config"].items() if k not in ("modes", "learning_rates")}
    wanted = {k: v for k, v in dataclasses.asdict(exp).items() if k not in ("modes", "learning_rates")}
    return earlier["rows"] if same == wanted else []


def main(argv: list[str] | None = None) -> int:
    from qwen3vl_sft.fileio import atomic_write_json, json_safe

    (exp,) = parse((CommunicationConfig,), argv, description=__doc__)
    work = Path(exp.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = build_data(exp, work)
    shapes_2b = shapes_at_2b(work)
    rows = earlier_rows(work / "results.json", exp)
    for lr in (float(x) for x in exp.learning_rates.split(",")):
        for mode in exp.modes.split(","):
            if mode not in MODES:
                sys.exit(f"error: --modes: unknown mode {mode!r}; use {', '.join(MODES)}")
            if any(r["mode"] == mode and r["lr"] == lr for r in rows):
                print(f"{mode} at lr {lr:g}: measured already ({work / 'results.json'})", flush=True)
                continue
            print(f"running {mode} at lr {lr:g} ...", flush=True)
            rows.append(summary_row(run_mode(exp, mode, lr, model_dir, data_dir, work), exp, shapes_2b))
            atomic_write_json(
                work / "results.json", json_safe({"config": dataclasses.asdict(exp), "rows": rows})
            )
    plot(rows, work / "communication.png")
    print(format_table(rows))
    print(
        f"results: {work / 'results.json'}, plot: {work / 'communication.png'}, logs: {work / 'experiment.log'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
