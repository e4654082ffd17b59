"""Held-out evaluation on the tiny model: batched greedy generation, answer loss, scores.

.venv/bin/python -m pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from qwen3vl_sft.config import DataConfig, ModelConfig
from qwen3vl_sft.data import SampleBuilder, build_dataset
from qwen3vl_sft.evaluate import evaluate_answers, evaluate_file, first_answer, generate_answers
from qwen3vl_sft.metrics import score_answers
from qwen3vl_sft.modeling import load_model, load_processor


@pytest.fixture(scope="module")
def finetuned(tiny_finetuned_dir):
    model = load_model(ModelConfig(model_name_or_path=str(tiny_finetuned_dir))).eval()
    return model, load_processor(str(tiny_finetuned_dir), DataConfig())


@pytest.fixture(scope="module")
def held_out(finetuned, synth_dir, synth_split):
    """The held-out dataset (40 records, single- and multi-image) built with the fine-tuned processor."""
    return build_dataset(finetuned[1], DataConfig(image_root=str(synth_dir)), str(synth_split[1]))


@pytest.fixture(scope="module")
def scrambled(tiny_model_dir):
    """The tiny model with its matrices redrawn at std 0.1: answers are gibberish, but gibberish that
    depends on every input token and pixel, so a padding or ordering mistake changes them (the
    untrained model answers every prompt with the same special tokens, hiding such mistakes)."""
    model = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir))).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model, load_processor(str(tiny_model_dir), DataConfig())


def test_batched_greedy_answers_equal_one_at_a_time_in_record_order(scrambled, held_out):
    model, processor = scrambled
    records = held_out.records[:16]
    builder = SampleBuilder(processor, held_out.builder.config, held_out.builder.image_root)
    assert {len(r["image"]) for r in records} > {1}, "the records should mix single and multi-image prompts"
    # One record per call: no padding and no reordering, the reference for both.
    single = [generate_answers(model, builder, [r], max_new_tokens=5)[0] for r in records]
    batched = generate_answers(model, builder, records, max_new_tokens=5, batch_size=8)
    assert batched == single
    assert len(set(single)) > len(records) // 2, "answers must differ between prompts for this test to bite"
    assert processor.tokenizer.padding_side == "right"  # restored after generation (training pads right)


def test_evaluate_answers_scores_its_own_answers(finetuned, held_out):
    model, processor = finetuned
    metrics, answers = evaluate_answers(model, processor, held_out, max_new_tokens=6, batch_size=16)
    truths = [first_answer(r) for r in held_out.records]
    assert len(answers) == len(truths) == metrics["samples"] == 40
    expected = score_answers(answers, truths)
    for key in ("rouge_l", "token_f1", "exact_match", "short_answers"):
        assert metrics[key] == expected[key]
    assert 0 < metrics["loss"] < 5 and metrics["samples_per_second"] > 0
    assert model.training is False


def test_evaluate_file_keeps_its_contract(finetuned, synth_dir, synth_split):
    model, processor = finetuned
    data = DataConfig(image_root=str(synth_dir))
    model.train()
    scores = evaluate_file(model, processor, data, synth_split[1], max_samples=8, batch_size=8)
    assert set(scores) == {"loss", "accuracy", "samples", "scored_answers"}
    assert scores["samples"] == 8 and scores["scored_answers"] == 8  # synthetic answers are all short
    assert math.isfinite(scores["loss"]) and 0.0 <= scores["accuracy"] <= 1.0
    assert model.training is True  # evaluation restores the training mode it found
