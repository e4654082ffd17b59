"""Held-out evaluation on the tiny model: batched greedy generation, answer loss, scores.

.venv/bin/python -m pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
import torch
from PIL import Image

from qwen3vl_sft.config import DataConfig, ModelConfig
from qwen3vl_sft.data.samples import SampleBuilder, build_dataset
from qwen3vl_sft.eval import evaluate
from qwen3vl_sft.eval.evaluate import (
    evaluate_answers,
    evaluate_file,
    evaluate_model_dir,
    first_answer,
    generate_answers,
)
from qwen3vl_sft.eval.metrics import score_answers
from qwen3vl_sft.model.modeling import load_model, load_processor


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
    assert set(scores) == {
        "loss", "accuracy", "rouge_l", "token_f1", "samples", "scored_answers", "skipped_images"
    }  # fmt: skip
    assert scores["samples"] == 8 and scores["scored_answers"] == 8  # synthetic answers are all short
    assert scores["skipped_images"] == 0
    assert math.isfinite(scores["loss"]) and 0.0 <= scores["accuracy"] <= 1.0
    assert 0.0 <= scores["rouge_l"] <= 1.0 and 0.0 <= scores["token_f1"] <= 1.0
    assert model.training is True  # evaluation restores the training mode it found


# --------------------------------------------------------------------------- defective images, long answers


def write_val(tmp_path, synth_dir, synth_split, bad: dict[str, bytes]) -> tuple:
    """(clean file, file with one record per defective image spliced in, the image root)."""
    root = tmp_path / "root"
    shutil.copytree(synth_dir, root)
    good = json.loads(synth_split[1].read_text())[:6]
    spliced = list(good)
    for n, (name, content) in enumerate(bad.items()):
        (root / "images" / name).write_bytes(content)
        spliced.insert(2 * n + 1, {**good[0], "id": f"bad-{name}", "image": [f"images/{name}"]})
    clean, dirty = tmp_path / "clean.json", tmp_path / "dirty.json"
    clean.write_text(json.dumps(good))
    dirty.write_text(json.dumps(spliced))
    return clean, dirty, root


def wide_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (10000, 3)).save(out, "PNG")
    return out.getvalue()


def test_validation_skips_defective_images_and_scores_the_same_records(
    finetuned, tmp_path, synth_dir, synth_split
):
    """A 0-byte, truncated, non-image or 10000x3 file is a counted skip in validation, not a crash."""
    model, processor = finetuned
    jpeg = (synth_dir / json.loads(synth_split[1].read_text())[0]["image"][0]).read_bytes()
    bad = {"empty.jpg": b"", "cut.jpg": jpeg[: len(jpeg) // 2], "text.jpg": b"hello", "wide.png": wide_png()}
    clean, dirty, root = write_val(tmp_path, synth_dir, synth_split, bad)
    data = DataConfig(image_root=str(root))
    expected = evaluate_file(model, processor, data, clean, batch_size=4)
    scores = evaluate_file(model, processor, data, dirty, batch_size=4)
    assert scores["skipped_images"] == 4 and expected["skipped_images"] == 0
    assert scores["samples"] == expected["samples"] == 6 and scores["scored_answers"] == 6
    assert scores["loss"] == pytest.approx(expected["loss"], rel=1e-5)  # batches differ, records do not
    for key in ("accuracy", "rouge_l", "token_f1"):
        assert scores[key] == expected[key], key


PARAGRAPH = "The scan shows a well defined hypodense lesion in the upper left quadrant of the organ."


def long_answer(record: dict) -> dict:
    turns = [dict(t) for t in record["conversations"]]
    turns[1]["value"] = PARAGRAPH
    return {**record, "conversations": turns}


def test_long_answers_get_rouge_and_f1_from_a_bounded_number_of_generations(
    finetuned, tmp_path, synth_dir, synth_split, monkeypatch
):
    """Paragraph answers have no accuracy; validation still scores them (ROUGE-L, token F1)."""
    model, processor = finetuned
    records = json.loads(synth_split[1].read_text())[:8]
    records = records[:3] + [long_answer(r) for r in records[3:]]  # 3 short answers, 5 paragraphs
    path = tmp_path / "val.json"
    path.write_text(json.dumps(records))
    calls = []

    def fake_generate(model, builder, records, max_new_tokens=16, batch_size=8, **kw):
        calls.append(([r["id"] for r in records], max_new_tokens))
        # short answers all wrong, long answers exactly right: accuracy 0, ROUGE-L / F1 = 2 of 5
        return [first_answer(r) if len(first_answer(r).split()) > 4 else "no answer" for r in records]

    monkeypatch.setattr(evaluate, "generate_answers", fake_generate)
    data = DataConfig(image_root=str(synth_dir), val_generate_samples=2, val_max_new_tokens=40)
    scores = evaluate_file(model, processor, data, path)
    assert calls == [([r["id"] for r in records[:3]], 16), ([r["id"] for r in records[3:5]], 40)]
    assert scores["samples"] == 8 and scores["scored_answers"] == 5
    assert scores["accuracy"] == 0.0
    assert scores["rouge_l"] == pytest.approx(2 / 5) and scores["token_f1"] == pytest.approx(2 / 5)

    only_long = tmp_path / "long.json"
    only_long.write_text(json.dumps(records[3:]))
    scores = evaluate_file(model, processor, data, only_long)
    assert math.isnan(scores["accuracy"]) and scores["rouge_l"] == 1.0 and scores["token_f1"] == 1.0
    assert math.isfinite(scores["loss"]) and scores["scored_answers"] == 2


# --------------------------------------------------------------------------- evaluate_model_dir: the server's HF dirs


def test_evaluate_model_dir_loads_the_servers_lora_adapter_dir_like_run_inference(
    tiny_model_dir, synth_dir, synth_split, tmp_path
):
    """The LoRA global model (an adapter directory, no config.json) loads for the demo's report."""
    from peft import PeftModel

    from qwen3vl_sft.model.checkpoints import write_hf_directory
    from qwen3vl_sft.model.weights import exchanged_state

    lora_cfg = ModelConfig(model_name_or_path=str(tiny_model_dir), lora=True, lora_r=4, lora_alpha=8)
    peft_model = load_model(lora_cfg)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero adapters, so that a loader ignoring them would score differently
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    adapter_dir = write_hf_directory(exchanged_state(peft_model), lora_cfg, tmp_path / "global_model_hf")
    assert not (adapter_dir / "config.json").exists() and (adapter_dir / "adapter_config.json").is_file()

    data = DataConfig(image_root=str(synth_dir))
    scores = evaluate_model_dir(str(adapter_dir), data, synth_split[1], max_samples=6)
    base = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    reference = evaluate_file(merged, load_processor(str(tiny_model_dir), data), data, synth_split[1], 6)
    assert scores["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    untouched = evaluate_model_dir(str(tiny_model_dir), data, synth_split[1], max_samples=6)
    assert abs(untouched["loss"] - scores["loss"]) > 1e-3  # the adapters were applied
