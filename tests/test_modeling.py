"""model.modeling: which checkpoints load, which parts train under the tune flags, dtype and attention
choices. Fast: configs and the tiny model on the meta device."""

from __future__ import annotations

import json

import pytest
import torch

from qwen3vl_sft.config import ModelConfig
from qwen3vl_sft.model.modeling import (
    ModelError,
    is_trainable_name,
    model_class,
    resolve_attention,
    resolve_dtype,
)
from qwen3vl_sft.model.weights import meta_model


def test_dtype_and_attention_auto():
    assert resolve_dtype("auto", cuda=True) is torch.bfloat16
    assert resolve_dtype("auto", cuda=False) is torch.float32
    assert resolve_dtype("float16", cuda=False) is torch.float16
    assert resolve_attention("auto", cuda=True, flash_attn=True) == "flash_attention_2"
    assert resolve_attention("auto", cuda=True, flash_attn=False) == "sdpa"
    assert resolve_attention("auto", cuda=False, flash_attn=True) == "sdpa"
    assert resolve_attention("eager", cuda=True, flash_attn=True) == "eager"


def test_a_checkpoint_that_is_not_qwen3vl_is_refused_naming_the_flag(tmp_path, tiny_model_dir):
    assert model_class(str(tiny_model_dir)).__name__ == "Qwen3VLForConditionalGeneration"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match=r"--model_name_or_path .*'llama' is not Qwen3-VL"):
        model_class(str(tmp_path))
    with pytest.raises(ModelError, match="cannot read a model config"):
        model_class(str(tmp_path / "absent"))


def test_tune_flags_pick_the_parts():
    recipe = ModelConfig()  # the official recipe: merger and LLM train, vision tower frozen
    assert is_trainable_name("model.visual.merger.linear_fc1.weight", recipe)
    assert is_trainable_name("model.language_model.layers.0.mlp.up_proj.weight", recipe)
    assert not is_trainable_name("model.visual.blocks.0.attn.qkv.weight", recipe)
    assert is_trainable_name("model.visual.blocks.0.attn.qkv.weight", ModelConfig(tune_mm_vision=True))
    with pytest.raises(ModelError, match="belongs to no known Qwen3-VL part"):
        is_trainable_name("something.else.weight", recipe)


def test_nothing_to_train_is_refused(tiny_model_dir):
    frozen = ModelConfig(
        model_name_or_path=str(tiny_model_dir), tune_mm_llm=False, tune_mm_mlp=False, tune_mm_vision=False
    )
    with pytest.raises(ModelError, match="nothing to train"):
        meta_model(frozen)
