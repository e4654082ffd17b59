"""model.weights: the one mapping of which tensors a site sends, under which names, and how they load
back. Fast: the tiny model on the meta device, and small tensors."""

from __future__ import annotations

import pytest
import torch

from qwen3vl_sft.config import ModelConfig
from qwen3vl_sft.model.weights import (
    WeightsError,
    as_tensors,
    exchanged_names,
    is_lora_state,
    lora_layout,
    message_bytes,
    meta_model,
    name_differences,
    require_weights,
)


def test_the_default_recipe_sends_llm_and_merger_and_not_the_vision_tower(tiny_model_dir):
    names = exchanged_names(meta_model(ModelConfig(model_name_or_path=str(tiny_model_dir))))
    assert any(n.startswith("model.language_model.") for n in names)
    assert any(n.startswith("model.visual.merger.") for n in names)
    assert not any(n.startswith("model.visual.blocks.") for n in names)  # tune_mm_vision False
    assert "lm_head.weight" not in names and len(names) == len(set(names))  # tied: sent once


def test_lora_sends_only_the_adapters(tiny_model_dir):
    config = ModelConfig(model_name_or_path=str(tiny_model_dir), lora=True, lora_r=4)
    names = exchanged_names(meta_model(config))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


def test_an_empty_received_model_is_refused():
    with pytest.raises(WeightsError, match="received an empty model"):
        require_weights({})
    require_weights({"a": torch.zeros(1)})


def test_lora_layout_reads_rank_and_targets_from_names_and_shapes():
    adapters = {
        "base_model.model.x.q_proj.lora_A.weight": torch.zeros(8, 16),
        "base_model.model.x.q_proj.lora_B.weight": torch.zeros(16, 8),
        "base_model.model.x.v_proj.lora_A.weight": torch.zeros(8, 16),
    }
    assert is_lora_state(adapters) and not is_lora_state({"model.x.weight": torch.zeros(1)})
    assert lora_layout(adapters) == (8, ["q_proj", "v_proj"])
    with pytest.raises(WeightsError, match="share one rank"):
        lora_layout({**adapters, "base_model.model.y.k_proj.lora_A.weight": torch.zeros(4, 16)})


def test_names_sizes_and_received_arrays():
    assert name_differences(["a", "b"], ["b", "c"]) == (["a"], ["c"])
    assert message_bytes({"a": torch.zeros(3, 4), "b": torch.zeros(5)}) == (12 + 5) * 2  # bf16
    received = as_tensors({"a": torch.ones(2).numpy()})
    assert isinstance(received["a"], torch.Tensor) and received["a"].tolist() == [1.0, 1.0]
    assert as_tensors(None) == {}
