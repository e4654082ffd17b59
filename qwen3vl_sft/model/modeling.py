"""Loading Qwen3-VL (dense or MoE) and its processor, and choosing what trains.

    python -m qwen3vl_sft.model.modeling --model_name_or_path tiny_models/qwen3-vl-tiny --lora true

prints the trainable parameter count for a configuration without training.

Freezing follows the official recipe's three switches: ``tune_mm_vision`` (vision tower blocks and patch
embedding), ``tune_mm_mlp`` (the merger and deepstack mergers that project vision features into the
language model) and ``tune_mm_llm`` (language model, embeddings and an untied lm_head). With ``lora``,
everything is frozen and PEFT adapters on ``lora_target_modules`` are the only trainable tensors.
"""

from __future__ import annotations

import logging

import torch

from ..config import DataConfig, ModelConfig
from ..train.official_launch import flash_attn_available

logger = logging.getLogger(__name__)
MERGER_PREFIXES = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
VISION_PREFIX = "model.visual."
LLM_PREFIXES = ("model.language_model.", "lm_head.")
QWEN3VL_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


class ModelError(ValueError):
    """The checkpoint is not one this example can fine-tune (message says why and what to do)."""


def resolve_dtype(name: str, cuda: bool) -> torch.dtype:
    """A ``--dtype`` value as a torch dtype: auto = bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def resolve_attention(name: str, cuda: bool, flash_attn: bool | None = None) -> str:
    """An ``--attn_implementation`` value: auto = flash_attention_2 on CUDA with flash-attn installed
    (``flash_attn`` None: importable here), else sdpa."""
    if name != "auto":
        return name
    if flash_attn is None:
        flash_attn = flash_attn_available()
    return "flash_attention_2" if cuda and flash_attn else "sdpa"


def from_pretrained(path: str, dtype: torch.dtype, attention: str, trust_remote_code: bool = False):
    """The checkpoint at ``path`` in its Qwen3-VL class (refused with ModelError if it is not one)."""
    cls = model_class(path, trust_remote_code)
    logger.info("Loading %s (%s, %s, attention=%s)", path, cls.__name__, dtype, attention)
    return cls.from_pretrained(
        path, dtype=dtype, attn_implementation=attention, trust_remote_code=trust_remote_code
    )


def model_class(model_name_or_path: str, trust_remote_code: bool = False):
    """Qwen3-VL or Qwen3-VL-MoE class for a checkpoint, chosen from its config (not its path)."""
    return class_for(checkpoint_config(model_name_or_path, trust_remote_code))


def class_for(config):
    """The transformers class of a config :func:`checkpoint_config` accepted."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    moe = config.model_type == "qwen3_vl_moe"
    return Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration


def checkpoint_config(model_name_or_path: str, trust_remote_code: bool = False):
    """The checkpoint's config; ModelError (naming the flag) unless it reads and is Qwen3-VL."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"--model_name_or_path {model_name_or_path}: cannot read a model config ({err}). "
            "Pass a Qwen3-VL directory or hub id (offline: build one with python -m qwen3vl_sft.model.tiny)."
        ) from err
    if config.model_type not in QWEN3VL_MODEL_TYPES:
        raise ModelError(
            f"--model_name_or_path {model_name_or_path}: model_type {config.model_type!r} is not Qwen3-VL "
            "(expected qwen3_vl or qwen3_vl_moe)."
        )
    return config


def load_processor(model_name_or_path: str, data: DataConfig, trust_remote_code: bool = False):
    """The checkpoint's processor, with images resized into [min_pixels, max_pixels]."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    processor.image_processor.size = {"shortest_edge": data.min_pixels, "longest_edge": data.max_pixels}
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = "<|endoftext|>"
    return processor


def load_model(config: ModelConfig):
    """The model in the configured dtype and attention, with ``set_trainable`` applied."""
    cuda = torch.cuda.is_available()
    model = from_pretrained(
        config.model_name_or_path,
        resolve_dtype(config.dtype, cuda),
        resolve_attention(config.attn_implementation, cuda),
        config.trust_remote_code,
    )
    model.config.use_cache = False
    model = set_trainable(model, config)
    if config.fp32_master_weights:
        keep_trained_in_fp32(model)
    return model


def keep_trained_in_fp32(model) -> int:
    """Trained parameters in fp32 (frozen ones keep their dtype); returns how many were cast.

    A bf16 weight cannot hold a change below half its bf16 step (~0.4 % of it), so pure-bf16 training
    rounds most small-lr steps away; with fp32 weights, bf16 autocast still does the compute (the
    Trainer's ``bf16`` and :func:`compute_autocast` for evaluation). LoRA adapters are fp32 already.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def compute_autocast(model):
    """The autocast that runs a model whose weights mix fp32 (trained) with bf16/fp16 (frozen) in the
    low dtype, as training does; a no-op context for a model of one dtype."""
    import contextlib

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    if not low or torch.float32 not in dtypes:
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=low[0])


def is_trainable_name(name: str, config: ModelConfig) -> bool:
    """Whether a (non-LoRA) parameter trains under the tune flags."""
    if name.startswith(MERGER_PREFIXES):
        return config.tune_mm_mlp
    if name.startswith(VISION_PREFIX):
        return config.tune_mm_vision
    if name.startswith(LLM_PREFIXES):
        return config.tune_mm_llm
    raise ModelError(f"parameter {name!r} belongs to no known Qwen3-VL part; cannot apply tune flags")


def lora_config(config: ModelConfig, **extra):
    """PEFT LoraConfig from our ModelConfig (training and the server's adapter files use the same)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets(),
        bias="none",
        **extra,
    )


def set_trainable(model, config: ModelConfig):
    """Freeze by the tune flags, or wrap in PEFT LoRA (then only the adapters train)."""
    if config.lora:
        from peft import get_peft_model

        for param in model.parameters():
            param.requires_grad_(False)
        model = get_peft_model(model, lora_config(config))
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(is_trainable_name(name, config))
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("nothing to train: set --tune_mm_llm, --tune_mm_mlp, --tune_mm_vision or --lora")
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> None:
    from ..config import parse

    (model_config,) = parse((ModelConfig,), argv, description="Show what trains for a configuration.")
    model = load_model(model_config)
    trainable, total = count_parameters(model)
    print(f"{type(model).__name__}: {trainable:,} of {total:,} parameters trainable")


if __name__ == "__main__":
    main()
