"""Fake ``qwenvl/train/argument.py``: the three dataclasses upstream's HfArgumentParser reads.

Field names are the contract (the backend writes them as flags); defaults are illustrative.
"""

from __future__ import annotations

from dataclasses import dataclass

import transformers


@dataclass
class ModelArguments:
    model_name_or_path: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    tune_mm_llm: bool = False
    tune_mm_mlp: bool = False
    tune_mm_vision: bool = False


@dataclass
class DataArguments:
    dataset_use: str = ""
    data_flatten: bool = False
    data_packing: bool = False
    max_pixels: int = 451584
    min_pixels: int = 12544


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = None
    optim: str = "adamw_torch"
    model_max_length: int = 512
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
