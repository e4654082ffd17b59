"""bench/gpu_check.py's CPU-checkable parts: the synthetic batch trains the tiny model, FLOP and peak tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from qwen3vl_sft.config import ModelConfig
from qwen3vl_sft.model.modeling import checkpoint_config, load_model

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_batch_trains_the_model(bench, tiny_model_dir):
    config = checkpoint_config(str(tiny_model_dir))
    batch = bench.synthetic_batch(config, 96, torch.device("cpu"))
    assert batch["input_ids"].shape == (1, 96)
    # The image's merged tokens must match its patch grid, or the model refuses the batch.
    merge = config.vision_config.spatial_merge_size**2
    assert int((batch["input_ids"] == config.image_token_id).sum()) * merge == batch["pixel_values"].shape[0]
    model = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    seconds = bench.run_steps(model, batch, 2, torch.device("cpu"))
    assert len(seconds) == 2 and all(s > 0 for s in seconds)


@pytest.mark.parametrize("lora", [False, True])
def test_flops_follow_the_stated_formula(bench, tiny_model_dir, lora):
    model = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir), lora=lora))
    text = checkpoint_config(str(tiny_model_dir)).text_config
    counts = bench.flop_counts(model, text)
    lm_head = text.vocab_size * text.hidden_size
    assert counts["n_fwd"] > lm_head  # the decoder's linears and the tied lm_head, counted once
    attention = 12 * text.num_hidden_layers * text.num_attention_heads * text.head_dim * 128
    if lora:
        assert counts["n_trained_matmul"] == 0 and counts["n_lora"] > 0
        expected = 4 * counts["n_fwd"] + 6 * counts["n_lora"] + attention
    else:
        assert counts["n_trained_matmul"] == counts["n_fwd"] and counts["n_lora"] == 0  # recipe: LLM trains
        expected = 6 * counts["n_fwd"] + attention
    assert bench.flops_per_token(counts, 128) == expected


@pytest.mark.parametrize(
    ("name", "tflops"),
    [("NVIDIA H200", 989.4), ("NVIDIA H20", 148.0), ("NVIDIA GH200 480GB", 989.4),
     ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.4), ("Tesla T4", None)],
)  # fmt: skip
def test_peak_is_matched_on_the_longest_name(bench, name, tflops):
    assert bench.peak_tflops(name) == tflops


def test_qwen_ids_tokenizer_matches_the_exact_2b_config():
    from qwen3vl_sft.model import tiny

    config = tiny.qwen3vl_2b_config()
    tiny.check_token_ids(tiny.build_tokenizer("qwen-ids"), config)  # raises on a mismatch
    with pytest.raises(RuntimeError, match="image_pad"):
        tiny.check_token_ids(tiny.build_tokenizer("compact"), config)
