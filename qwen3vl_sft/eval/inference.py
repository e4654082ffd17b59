"""Checkpoint comparison for run_inference.py: what each path is, how it loads, and the report files.

Accepted checkpoints, detected from the path itself (see :func:`detect`):

* ``hf``: an HF hub id or a directory with ``config.json`` (our HF global-model directory included);
  refused unless its ``model_type`` is Qwen3-VL.
* ``adapter``: a PEFT LoRA adapter directory (``adapter_config.json``), e.g. the LoRA job's
  ``global_model_hf/``.
* ``pt-full`` / ``pt-lora``: a ``torch.save`` file such as NVFlare's ``FL_global_model.pt``
  (``{"model": {name: tensor}, "meta": {...}}``), read with ``weights_only=True`` so no code is
  unpickled. LoRA when ``meta["lora"]`` says so or the names hold ``lora_A`` / ``lora_B``; rank and
  targets then come from the meta or the tensors themselves. Names are mapped only by :mod:`.weights`.

The base (architecture and processor of adapters and .pt files, and the "base" row) is ``--base_model``,
else what the checkpoint records: the .pt's ``meta["base_model"]``, the ``fl_checkpoint.json`` the
federated server writes into its HF directories, an adapter's ``base_model_name_or_path``. Nothing is
assumed: a checkpoint that records no base is evaluated alone, so an offline run never waits on the hub.

Every checkpoint answers the same records (screened once for defective images); models are loaded one
at a time and freed after use.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DataConfig, InferenceConfig, ModelConfig, check_data_flags, refuse
from ..data.records import PLACEHOLDER
from ..data.samples import RecordDataset, SampleBuilder, build_dataset, resolve_image_root
from ..errors import DataError
from ..fileio import check_writable
from ..model.checkpoints import read_fl_record, usable_base
from ..model.modeling import (
    ModelError,
    from_pretrained,
    load_processor,
    model_class,
    resolve_attention,
    resolve_dtype,
    set_trainable,
)
from ..model.weights import WeightsError, is_lora_state, load_exchanged, load_state_subset, lora_layout
from .evaluate import evaluate_answers, first_answer, first_question

logger = logging.getLogger(__name__)
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
PROCESSOR_MARKERS = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
SHOWN_CHARS = 200
METRIC_COLUMNS = ("loss", "rouge_l", "token_f1", "exact_match")


class CheckpointError(ValueError):
    """A checkpoint path that cannot be compared (the message says which and why)."""


USER_ERRORS = (CheckpointError, ModelError, WeightsError, DataError)


@dataclass
class Checkpoint:
    label: str
    path: str
    kind: str = ""  # hf | adapter | pt-full | pt-lora
    base: str = ""  # architecture + processor source for adapter / pt kinds
    meta: dict = field(default_factory=dict)  # the .pt's "meta" (lora config, round)

    def describe(self) -> str:
        uses_base = self.kind in ("adapter", "pt-full", "pt-lora")
        return f"{self.label}: {self.path} ({self.kind}{', base ' + self.base if uses_base else ''})"


@dataclass
class Evaluation:
    checkpoint: Checkpoint
    metrics: dict
    answers: list[str]


# --------------------------------------------------------------------------- which checkpoints


def parse_spec(spec: str) -> Checkpoint:
    """``LABEL=PATH`` or ``PATH`` (labelled by its last path component)."""
    label, sep, path = spec.partition("=")
    if not sep or "/" in label or os.sep in label or not label:
        path = spec
        label = Path(spec.rstrip("/\\")).stem or spec
    return Checkpoint(label=label, path=path)


def requested_checkpoints(cfg: InferenceConfig) -> list[Checkpoint]:
    """The checkpoints named by --model and --model_path, detected, with the base row in front.

    The base row is --base_model, else the base the checkpoints record; when none does, the
    checkpoints are evaluated alone and one printed line says so.
    """
    checkpoints = [parse_spec(s) for s in cfg.model]
    if cfg.model_path:
        checkpoints.append(Checkpoint(label="fine-tuned", path=cfg.model_path))
    checkpoints = [detect(c, cfg) for c in checkpoints]
    if cfg.compare_base and "base" not in {c.label for c in checkpoints}:
        base = cfg.base_model or next((c.base for c in checkpoints if c.base), "")
        if not base and checkpoints:
            print(
                f"No base row: {', '.join(c.path for c in checkpoints)} records no base model and "
                "--base_model is not set, so it is evaluated alone."
            )
        elif base and _same_path_key(base) not in {_same_path_key(c.path) for c in checkpoints}:
            checkpoints.insert(0, detect(Checkpoint(label="base", path=base), cfg))
    if not checkpoints:
        raise CheckpointError("nothing to evaluate: pass --model_path, --model LABEL=PATH or --base_model")
    labels = [c.label for c in checkpoints]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise CheckpointError(f"checkpoint labels must be unique; repeated: {duplicates} (use LABEL=PATH)")
    return checkpoints


def _same_path_key(path: str) -> str:
    return os.path.realpath(path) if os.path.exists(path) else path


def detect(ckpt: Checkpoint, cfg: InferenceConfig) -> Checkpoint:
    """``ckpt`` with ``kind`` (and ``base``/``meta``) filled in from what is at its path.

    The architecture is checked here, from the config alone, so that a wrong path fails before the
    first model spends minutes answering.
    """
    found = _detect_kind(ckpt, cfg.base_model)
    try:
        model_class(found.path if found.kind == "hf" else found.base, cfg.trust_remote_code)
    except ModelError as err:
        hint = " [the 'base' row: set --base_model, or --compare_base false]" if found.label == "base" else ""
        raise CheckpointError(f"{found.label} ({found.path}): {err}{hint}") from err
    return found


def _detect_kind(ckpt: Checkpoint, base_flag: str) -> Checkpoint:
    path = Path(ckpt.path)
    if path.is_dir():
        recorded = _recorded_base(path)
        if (path / "adapter_config.json").is_file():
            base = _needs_base(
                ckpt, base_flag or recorded, "adapter_config.json names no base_model_name_or_path"
            )
            return Checkpoint(ckpt.label, ckpt.path, "adapter", base)
        if (path / "config.json").is_file():
            return Checkpoint(ckpt.label, ckpt.path, "hf", base_flag or recorded)
        raise CheckpointError(
            f"{ckpt.label}: {path} has neither config.json (HF model) nor adapter_config.json (LoRA adapter)"
        )
    if path.is_file():
        tensors, meta = read_weights_file(path)
        lora = bool(meta.get("lora")) or is_lora_state(tensors)
        recorded = usable_base(meta.get("base_model") or "", meta.get("base_model_id"))
        base = _needs_base(ckpt, base_flag or recorded, 'its meta names no "base_model"')
        return Checkpoint(ckpt.label, ckpt.path, "pt-lora" if lora else "pt-full", base, meta)
    if HUB_ID.match(ckpt.path) and not ckpt.path.startswith("."):
        return Checkpoint(ckpt.label, ckpt.path, "hf", base_flag)
    raise CheckpointError(f"{ckpt.label}: {ckpt.path} does not exist (and is not an HF hub id)")


def _recorded_base(folder: Path) -> str:
    """The base a directory records: the server's fl_checkpoint.json, else an adapter's config."""
    try:
        record = read_fl_record(folder)
        base = usable_base(record.get("base_model") or "", record.get("base_model_id"))
        if not base and (folder / "adapter_config.json").is_file():
            adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            base = adapter.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{folder}: unreadable checkpoint record ({_first_line(err)})") from err
    return base if isinstance(base, str) else ""


def _needs_base(ckpt: Checkpoint, base: str, why: str) -> str:
    if not base:
        raise CheckpointError(
            f"{ckpt.label}: {ckpt.path} holds only the trained part of a model and {why}; "
            "pass --base_model <the model it was fine-tuned from>"
        )
    return base


def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and meta of a ``torch.save`` weights file; never unpickles code (``weights_only``)."""
    try:
        # mmap: detection reads only names and shapes, not gigabytes (needs the zip format).
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{path}: not a weights file that torch.load(weights_only=True) accepts ({_first_line(err)})"
        ) from err
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        found = (
            f"a dict with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else type(obj).__name__
        )
        raise CheckpointError(
            f"{path}: not a weights file: expected {{'model': {{name: tensor}}}}, found {found}"
        )
    if not state:
        raise CheckpointError(f"{path}: holds no tensors (did every site fail the round?)")
    meta = obj.get("meta") if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) else {}
    return state, meta


# --------------------------------------------------------------------------- loading


def resolve_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _pretrained(path: str, cfg: InferenceConfig, dtype: torch.dtype, device: torch.device):
    attention = resolve_attention("auto", cuda=device.type == "cuda")
    return from_pretrained(path, dtype, attention, cfg.trust_remote_code)


def _with_lora_pt(model, ckpt: Checkpoint, cfg: InferenceConfig):
    """Base model + the .pt's LoRA adapters (PEFT-wrapped as in training, loaded strictly by name)."""
    tensors, _ = read_weights_file(ckpt.path)
    lora = ckpt.meta.get("lora") or {}
    rank, targets = lora_layout(tensors)
    alpha = cfg.lora_alpha or lora.get("lora_alpha") or ModelConfig().lora_alpha
    config = ModelConfig(
        lora=True,
        lora_r=lora.get("r", rank),
        lora_alpha=alpha,
        lora_target_modules=",".join(lora.get("target_modules") or targets),
    )
    misfit = f"LoRA adapters (r={config.lora_r}, targets {config.lora_targets()}) do not fit {ckpt.base}"
    try:
        model = set_trainable(model, config)
    except ValueError as err:  # PEFT: a target module the base model lacks
        raise WeightsError(f"{misfit}: {_first_line(err)}") from err
    try:
        load_exchanged(model, tensors)  # strict by name; WeightsError names unknown / missing keys
    except RuntimeError as err:  # torch: adapter shapes of another base model
        raise WeightsError(f"{misfit}: {_first_line(err)}") from err
    return model.merge_and_unload()  # plain model: faster generation, same outputs


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def load_checkpoint(
    ckpt: Checkpoint, cfg: InferenceConfig, device: torch.device, data: DataConfig | None = None
):
    """(model in eval mode on ``device``, processor) for a detected checkpoint; the processor's pixel
    limits come from ``data`` (default: :func:`data_config`)."""
    dtype = resolve_dtype(cfg.dtype, cuda=device.type == "cuda")
    data = data or data_config(cfg)
    try:
        if ckpt.kind == "hf":
            model = _pretrained(ckpt.path, cfg, dtype, device)
        else:
            model = _pretrained(ckpt.base, cfg, dtype, device)
            if ckpt.kind == "adapter":
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, ckpt.path).merge_and_unload()
            elif ckpt.kind == "pt-lora":
                model = _with_lora_pt(model, ckpt, cfg)
            else:
                applied = load_state_subset(model, read_weights_file(ckpt.path)[0])
                logger.info("%s: applied %d saved tensors to %s", ckpt.label, applied, ckpt.base)
    except (ModelError, WeightsError) as err:
        raise CheckpointError(f"{ckpt.label} ({ckpt.path}): {err}") from err
    processor = load_processor(_processor_source(ckpt, cfg), data, cfg.trust_remote_code)
    return model.to(device).eval(), processor


def _processor_source(ckpt: Checkpoint, cfg: InferenceConfig) -> str:
    """The checkpoint's own processor when it ships one, else its base's."""
    path = Path(ckpt.path)
    if ckpt.kind in ("hf", "adapter") and (
        not path.is_dir() or any((path / name).is_file() for name in PROCESSOR_MARKERS)
    ):
        return ckpt.path
    if not (ckpt.base or cfg.base_model):
        raise CheckpointError(
            f"{ckpt.label}: {ckpt.path} has no processor files ({', '.join(PROCESSOR_MARKERS)}) and records "
            "no base model; pass --base_model <the model it was fine-tuned from>"
        )
    return ckpt.base or cfg.base_model


# --------------------------------------------------------------------------- evaluating


def data_config(cfg: InferenceConfig) -> DataConfig:
    """The data settings evaluation shares with training (processor pixel limits, image rule, root)."""
    return DataConfig(
        data_path=cfg.data_file,
        image_root=cfg.image_root,
        max_image_side=cfg.max_image_side,
        max_image_pixels=cfg.max_image_pixels,
    )


def check_flags(cfg: InferenceConfig) -> None:
    """Refuse flags that cannot work before any model loads (DataError: one line naming the flag)."""
    problems = [
        (cfg.max_samples < 0, f"--max_samples {cfg.max_samples}: must be >= 0 (0 = every record)"),
        (cfg.batch_size < 1, f"--batch_size {cfg.batch_size}: must be >= 1"),
        (cfg.max_new_tokens < 1, f"--max_new_tokens {cfg.max_new_tokens}: must be >= 1"),
        (cfg.show_samples < -1, f"--show_samples {cfg.show_samples}: must be >= -1 (-1 = all, 0 = none)"),
        (cfg.lora_alpha is not None and cfg.lora_alpha <= 0, f"--lora_alpha {cfg.lora_alpha}: must be > 0"),
        (
            cfg.do_sample and cfg.temperature <= 0,
            f"--temperature {cfg.temperature}: must be > 0 with --do_sample true (or sample not at all)",
        ),
        (
            cfg.do_sample and not 0 < cfg.top_p <= 1,
            f"--top_p {cfg.top_p}: must be in (0, 1] with --do_sample",
        ),
        (
            not os.path.isfile(cfg.data_file),
            f"--data_file {cfg.data_file} does not exist; pass a PubMedVision-format file "
            "(prepare_data.py writes data/test.json and data/site-N/train.json)",
        ),
    ]
    refuse(problems)
    data = data_config(cfg)
    check_data_flags(data)  # the image limits, as training checks them
    _check_device(cfg.device)
    resolve_image_root(data, Path(cfg.data_file))  # DataError naming a root that is missing


def _check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DataError(f"--device {name}: not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: CUDA is not available on this machine; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"--device {name}: MPS is not available on this machine; use --device cpu (or auto)")


def screened_dataset(processor, cfg: InferenceConfig) -> RecordDataset:
    """The data file's first ``max_samples`` records whose images pass the image rule."""
    dataset = build_dataset(processor, data_config(cfg), cfg.data_file)
    skips = dataset.screen(cfg.max_samples)
    if not dataset.records:
        first = f"; first: {skips[0]}" if skips else ""
        raise DataError(
            f"no record of {cfg.data_file} has usable images under {dataset.builder.image_root} "
            f"({len(skips)} skipped{first})"
        )
    return dataset


def evaluate_checkpoints(checkpoints: list[Checkpoint], cfg: InferenceConfig) -> tuple[RecordDataset, list]:
    """Each checkpoint's metrics and answers on the same records; one model in memory at a time."""
    device = resolve_device(cfg.device)
    generation = {"do_sample": cfg.do_sample}
    if cfg.do_sample:
        generation |= {"temperature": cfg.temperature, "top_p": cfg.top_p}
    data, results, dataset = data_config(cfg), [], None
    for ckpt in checkpoints:
        logger.info("Loading %s: %s (%s)", ckpt.label, ckpt.path, ckpt.kind)
        model, processor = load_checkpoint(ckpt, cfg, device)
        if dataset is None:  # read and screen the data file once; every checkpoint answers these records
            dataset = screened_dataset(processor, cfg)
        else:  # the same records, prompts built with this checkpoint's processor
            dataset.builder = SampleBuilder(processor, data, dataset.builder.image_root)
        torch.manual_seed(cfg.seed)  # the same sampling stream for every checkpoint
        metrics, answers = evaluate_answers(
            model,
            processor,
            dataset,
            cfg.max_new_tokens,
            cfg.batch_size,
            progress=ckpt.label if cfg.progress else None,
            **generation,
        )
        results.append(Evaluation(ckpt, metrics, answers))
        del model
        gc.collect()  # free this model before the next one loads (several 2B models do not fit at once)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dataset, results


# --------------------------------------------------------------------------- printing and report


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
