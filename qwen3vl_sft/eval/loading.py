"""What a checkpoint path holds and how it loads for evaluation (run_inference.py, eval.evaluate).

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
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DataConfig, InferenceConfig, ModelConfig
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

logger = logging.getLogger(__name__)


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

PROCESSOR_MARKERS = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


class CheckpointError(ValueError):
    """A checkpoint path that cannot be compared (the message says which and why)."""


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


def data_config(cfg: InferenceConfig) -> DataConfig:
    """The data settings evaluation shares with training (processor pixel limits, image rule, root)."""
    return DataConfig(
        data_path=cfg.data_file,
        image_root=cfg.image_root,
        max_image_side=cfg.max_image_side,
        max_image_pixels=cfg.max_image_pixels,
    )
