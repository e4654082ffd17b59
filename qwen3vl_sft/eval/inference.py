"""Checkpoint comparison for run_inference.py: the checkpoints asked for, the base row, and each one's
answers and scores on the same records (screened once for defective images); models are loaded one at
a time (:mod:`.loading`) and freed after use; :mod:`.report` prints and writes the result.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import torch

from ..config import InferenceConfig, check_data_flags, refuse
from ..data.samples import RecordDataset, SampleBuilder, build_dataset, resolve_image_root
from ..errors import DataError
from ..model.modeling import ModelError
from ..model.weights import WeightsError
from .evaluate import evaluate_answers
from .loading import Checkpoint, CheckpointError, data_config, detect, load_checkpoint, resolve_device
from .report import Evaluation

logger = logging.getLogger(__name__)


USER_ERRORS = (CheckpointError, ModelError, WeightsError, DataError)


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
