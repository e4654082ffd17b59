# ruff: noqa: E402 - refuse_foreign_site_packages() must run before the imports it guards
"""Fake ``qwenvl/train/train_qwen.py`` (tests only; runs on CPU under transformers 5).

Contract reproduced from the official Qwen3-VL fine-tuning entry point:

* ``train(attn_implementation=...)`` takes its arguments from ``sys.argv`` through
  ``HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))``;
* it imports its sibling as ``from trainer import ...`` (resolves only with ``qwenvl/train`` on sys.path);
* the model class comes from the *path*: "qwen3" in it and the letter "a" in its last component -> the
  MoE class, "qwen3" -> Qwen3-VL, "qwen2.5" -> Qwen2.5-VL, anything else -> Qwen2-VL;
* it resumes when ``output_dir`` holds a ``checkpoint-*`` folder;
* it calls ``torch.distributed.get_rank()`` unconditionally (so it needs torchrun's process group);
* it trains with HF Trainer, calls ``save_state()`` (``trainer_state.json``), then
  ``Trainer._save(output_dir, state_dict=...)`` (safetensors) and ``processor.save_pretrained``.

Differences, on purpose: where upstream would load the wrong class, resume from a leftover
checkpoint or import packages of an environment other than its interpreter's own (another venv's
site-packages on ``sys.path``, as when a parent's ``PYTHONPATH`` leaks in), the fake raises (a test
must fail); it freezes parts through ``model.model`` (the
transformers 5 layout); before training it writes ``fake_run.json`` into ``output_dir`` with the class,
path, argv, resolved data sets and a float64 sum of every loaded parameter, so tests can check what it saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def refuse_foreign_site_packages() -> None:
    """Upstream imports whichever transformers comes first on sys.path; the fake refuses any but its own."""
    own = os.path.abspath(sys.prefix) + os.sep
    foreign = [p for p in sys.path if "-packages" in p and not os.path.abspath(p).startswith(own)]
    if foreign:
        raise ImportError(
            f"fake clone: sys.path of {sys.executable} holds another environment's {foreign[0]}"
        )


refuse_foreign_site_packages()

import torch
import transformers
from qwenvl.data import data_list
from qwenvl.data.data_processor import make_supervised_data_module
from qwenvl.train.argument import DataArguments, ModelArguments, TrainingArguments
from trainer import replace_qwen2_vl_attention_class
from transformers import (
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
    Trainer,
)

RUN_RECORD = "fake_run.json"
CLASS_FOR_MODEL_TYPE = {
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}


def class_for_path(path: str) -> tuple[type, str]:
    """(model class, data model_type) chosen from the path name, as upstream chooses them."""
    text, last = path.lower(), Path(path.rstrip("/")).name.lower()
    if "qwen3" in text and "a" in last:
        return Qwen3VLMoeForConditionalGeneration, "qwen3vl"
    if "qwen3" in text:
        return Qwen3VLForConditionalGeneration, "qwen3vl"
    if "qwen2.5" in text:
        return Qwen2_5_VLForConditionalGeneration, "qwen2.5vl"
    return Qwen2VLForConditionalGeneration, "qwen2vl"


def check_class(cls: type, path: str) -> None:
    model_type = transformers.AutoConfig.from_pretrained(path).model_type
    if CLASS_FOR_MODEL_TYPE.get(model_type) is not cls:
        raise RuntimeError(
            f"fake clone: the path {path} makes upstream load {cls.__name__} for a {model_type} checkpoint"
        )


def set_trainable(model, model_args: ModelArguments) -> None:
    inner = model.model  # transformers 5: visual and language_model live under model.model
    for param in inner.visual.parameters():
        param.requires_grad_(model_args.tune_mm_vision)
    for param in inner.visual.merger.parameters():
        param.requires_grad_(model_args.tune_mm_mlp)
    for param in inner.language_model.parameters():
        param.requires_grad_(model_args.tune_mm_llm)


def write_run_record(output_dir: str, model, data_args: DataArguments, attn_implementation: str) -> None:
    record = {
        "model_class": type(model).__name__,
        "model_name_or_path": model.name_or_path,
        "attn_implementation": attn_implementation,
        "argv": sys.argv[1:],
        "datasets": data_list(data_args.dataset_use.split(",")),
        "world_size": torch.distributed.get_world_size(),
        "python_prefix": sys.prefix,
        "param_sums": {name: float(p.detach().double().sum()) for name, p in model.named_parameters()},
    }
    Path(output_dir, RUN_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")


def train(attn_implementation: str = "flash_attention_2") -> None:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    if (data_args.data_flatten or data_args.data_packing) and attn_implementation != "flash_attention_2":
        raise AssertionError(f"fake clone: data_flatten needs flash_attention_2, got {attn_implementation}")
    os.makedirs(training_args.output_dir, exist_ok=True)
    stale = sorted(Path(training_args.output_dir).glob("checkpoint-*"))
    if stale:
        raise RuntimeError(f"fake clone: upstream would resume from the stale {stale[0]}")
    path = model_args.model_name_or_path
    cls, data_args.model_type = class_for_path(path)
    check_class(cls, path)
    dtype = torch.bfloat16 if training_args.bf16 else None
    model = cls.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path)
    if data_args.data_flatten or data_args.data_packing:
        replace_qwen2_vl_attention_class()
    model.config.use_cache = False
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, model_max_length=training_args.model_max_length, padding_side="right", use_fast=False
    )
    if training_args.lora_enable:
        raise NotImplementedError("fake clone: LoRA is not reproduced")
    set_trainable(model, model_args)
    if torch.distributed.get_rank() == 0:
        write_run_record(training_args.output_dir, model, data_args, attn_implementation)
    trainer = Trainer(
        model=model,
        processing_class=tokenizer,
        args=training_args,
        **make_supervised_data_module(processor, data_args),
    )
    trainer.train()
    trainer.save_state()
    model.config.use_cache = True
    state = {name: tensor.cpu() for name, tensor in trainer.model.state_dict().items()}
    trainer._save(training_args.output_dir, state_dict=state)
    processor.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    train(attn_implementation="flash_attention_2")
