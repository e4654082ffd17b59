"""Global-model files: initial exchanged tensors from the base checkpoint, and HF directories.

    python -m qwen3vl_sft.model.checkpoints --global_model FL_global_model.pt \\
        --model_name_or_path tiny_models/qwen3-vl-tiny --output global_hf

turns an NVFlare ``FL_global_model.pt`` into an HF directory that ``from_pretrained`` loads.

The server never instantiates the model: initial tensors are read from the base checkpoint's
safetensors by name, shapes come from a meta-device model, and the HF directory is written shard by
shard (base shard + exchanged tensors replacing theirs), so the server holds at most one shard
beyond the exchanged tensors.  LoRA global models become PEFT adapter directories.

Each HF directory also holds ``fl_checkpoint.json`` (:data:`FL_RECORD`), which ``from_pretrained`` and
PEFT ignore: the base model it was fine-tuned from and the LoRA settings, so that run_inference.py
can put the right base beside it without assuming one::

    {"format": 1, "kind": "full" | "lora", "base_model": "/abs/base/dir" or "hub/id",
     "lora": null | {"r": 64, "lora_alpha": 128, "lora_dropout": 0.05, "target_modules": [...]}}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..fileio import atomic_dir
from .weights import EXCHANGE_DTYPE, WeightsError, checkpoint_name, exchanged_tensors, is_peft, meta_model

FL_RECORD = "fl_checkpoint.json"
SHARD_INDEX = "model.safetensors.index.json"
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # what a hub download fetches
PROCESSOR_FILES = (
    "config.json", "generation_config.json", "chat_template.jinja", "chat_template.json", "tokenizer.json",
    "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
)  # fmt: skip


def base_model_dir(model_name_or_path: str) -> Path:
    """Local directory of a checkpoint: a directory as given (``~`` expanded), a hub id through the local
    HF cache or a download of its :data:`CHECKPOINT_FILES`."""
    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_name_or_path, allow_patterns=CHECKPOINT_FILES))


def safetensors_shards(model_dir: Path) -> dict[str, list[str]]:
    """Shard file -> tensor names, from the index file or the single model.safetensors."""
    index = model_dir / SHARD_INDEX
    if index.is_file():
        shards: dict[str, list[str]] = {}
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            shards.setdefault(shard, []).append(name)
        return shards
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return {"model.safetensors": list(f.keys())}


def init_lora_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """PEFT's default LoRA init (A: Kaiming-uniform, B: zeros), without building the model.

    Written by hand because PEFT only initialises adapters inside a materialised model, which the
    server must not build; B = 0 makes the initial adapter a no-op whatever A is.
    """
    if ".lora_B." in name:
        return torch.zeros(shape, dtype=EXCHANGE_DTYPE)
    generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on a (r, in_features) matrix
    return (torch.rand(shape, generator=generator) * 2 - 1).mul_(bound).to(EXCHANGE_DTYPE)


def initial_exchanged(model_config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The exchanged tensors of the base model (bf16), read by name; no model is materialised."""
    model = meta_model(model_config)
    wanted = exchanged_tensors(model)
    if is_peft(model):
        return {name: init_lora_tensor(name, t.shape, seed) for name, t in wanted.items()}
    model_dir = base_model_dir(model_config.model_name_or_path)
    shards = [model_dir / shard for shard in safetensors_shards(model_dir)]
    found = read_tensors(shards, {checkpoint_name(n): n for n in wanted})
    out = {name: t.to(EXCHANGE_DTYPE) for name, t in found.items()}
    missing = sorted(set(wanted) - set(out))
    if missing:
        raise KeyError(f"{model_dir}: exchanged tensors missing from the checkpoint: {missing[:5]}")
    return out


def read_tensors(files: Iterable[Path], wanted: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The tensors ``wanted`` names (checkpoint name -> our name) found in the safetensors ``files``,
    keyed by our name, on CPU in their saved dtype; no model is loaded. Names not found are left out."""
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in wanted.keys() & set(f.keys()):
                found[wanted[key]] = f.get_tensor(key).contiguous()
    return found


def write_merged_shards(
    base: Path, out: Path, tensors: Mapping[str, torch.Tensor], link_unchanged: bool = False
) -> None:
    """``base``'s safetensors shards (and shard index) in ``out``, with ``tensors`` (keyed by checkpoint
    name) in place of theirs; one shard in memory at a time.

    Every tensor must replace one of the checkpoint with the same shape (else :class:`WeightsError`) and
    takes that one's dtype. A shard no tensor touches is copied, or symlinked with ``link_unchanged``
    (a working copy that lives as long as its base: the official backend's round input).
    """
    shards = safetensors_shards(base)
    unknown = set(tensors) - {name for names in shards.values() for name in names}
    if unknown:
        raise WeightsError(
            f"{len(unknown)} tensors are not in the base checkpoint {base} (e.g. {sorted(unknown)[:3]})"
        )
    for shard, names in shards.items():
        replaced = {name: tensors[name] for name in names if name in tensors}
        if replaced:
            _write_shard(base / shard, out / shard, replaced)
        elif link_unchanged:
            os.symlink((base / shard).resolve(), out / shard)  # untouched shard: no need to copy gigabytes
        else:
            shutil.copy2(base / shard, out / shard)
    if (base / SHARD_INDEX).is_file():
        shutil.copy2(base / SHARD_INDEX, out / SHARD_INDEX)


def _write_shard(src: Path, dst: Path, replaced: Mapping[str, torch.Tensor]) -> None:
    with safe_open(str(src), framework="pt") as f:
        keys, data = list(f.keys()), {}
        for key in keys:
            tensor = f.get_tensor(key)
            if key in replaced:
                new = replaced[key]
                if tuple(new.shape) != tuple(tensor.shape):
                    raise WeightsError(
                        f"{key}: received shape {tuple(new.shape)}, checkpoint has {tuple(tensor.shape)}"
                    )
                tensor = new.to(dtype=tensor.dtype)  # keep the checkpoint's dtype, lossless
            data[key] = tensor.contiguous()
        metadata = {**(f.metadata() or {}), "format": "pt"}
    save_file(data, str(dst), metadata=metadata)


def _copy_processor_files(src: Path, dst: Path) -> None:
    for name in PROCESSOR_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _write_adapter(tensors: dict[str, torch.Tensor], model_config: ModelConfig, out: Path) -> None:
    from .modeling import lora_config

    lora_config(model_config, base_model_name_or_path=recorded_base(model_config)).save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "adapter_model.safetensors")


def recorded_base(model_config: ModelConfig) -> str:
    """The base as it is recorded: a local directory absolute (readers run from other folders); a hub id
    as the local snapshot the server already holds, so that loading it never waits on the hub."""
    name = model_config.model_name_or_path
    if os.path.isdir(name):
        return os.path.abspath(name)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True, allow_patterns=["*.json"])
    except (OSError, ValueError):  # not in the local cache: the hub id is all there is to record
        return name


def usable_base(recorded: str, hub_id: str | None) -> str:
    """The recorded base if it is here (the server's snapshot), else its hub id (another machine)."""
    return recorded if not hub_id or os.path.isdir(recorded) else hub_id


def fl_record(model_config: ModelConfig) -> dict:
    """The content of :data:`FL_RECORD` for a global model of ``model_config``."""
    lora = None
    if model_config.lora:
        lora = {
            "r": model_config.lora_r,
            "lora_alpha": model_config.lora_alpha,
            "lora_dropout": model_config.lora_dropout,
            "target_modules": model_config.lora_targets(),
        }
    kind = "lora" if model_config.lora else "full"
    name = model_config.model_name_or_path
    hub_id = None if os.path.isdir(name) else name
    return {"format": 1, "kind": kind, "base_model": recorded_base(model_config), "base_model_id": hub_id,
            "lora": lora}  # fmt: skip


def read_fl_record(folder: str | os.PathLike) -> dict:
    """:data:`FL_RECORD` of an HF directory ({} when it has none: not written by the server)."""
    path = Path(folder) / FL_RECORD
    if not path.is_file():
        return {}
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return record


def write_hf_directory(
    tensors: dict[str, torch.Tensor], model_config: ModelConfig, out: str | os.PathLike
) -> Path:
    """Write the global model as an HF model directory (full) or PEFT adapter directory (LoRA), atomically,
    with :data:`FL_RECORD` naming its base."""
    base = base_model_dir(model_config.model_name_or_path)
    with atomic_dir(out) as tmp:
        tmp_path = Path(tmp)
        _copy_processor_files(base, tmp_path)
        if model_config.lora:
            (tmp_path / "config.json").unlink(
                missing_ok=True
            )  # an adapter dir must not look like a full model
            _write_adapter(tensors, model_config, tmp_path)
        else:
            write_merged_shards(base, tmp_path, {checkpoint_name(n): t for n, t in tensors.items()})
        (tmp_path / FL_RECORD).write_text(json.dumps(fl_record(model_config), indent=2) + "\n")
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    from ..config import parse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--global_model", required=True)
    parser.add_argument("--output", required=True)
    args, rest = parser.parse_known_args(argv)
    from ..eval.loading import read_weights_file  # the one safe reader of weights files (weights_only)

    (model_config,) = parse((ModelConfig,), rest, description=__doc__)
    tensors, _ = read_weights_file(args.global_model)
    out = write_hf_directory(tensors, model_config, args.output)
    print(f"HF directory written to {out}")


if __name__ == "__main__":
    main()
