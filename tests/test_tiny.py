"""The offline tiny Qwen3-VL: loads with the real classes, trains, has the promised token ids."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

from qwen3vl_sft.model import tiny

QWEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_loads_offline_and_runs_forward_backward_with_an_image(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the lesion?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "upper left"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where")
    assert text.endswith("<|im_start|>assistant\nupper left<|im_end|>\n")
    enc = processor(text=[text], images=[Image.new("RGB", (64, 64), (200, 10, 10))], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64 px / patch 16, merged 2x2 -> 4 tokens
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 4
    out = model(**enc, labels=enc["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.visual.merger.linear_fc1.weight.grad.abs().sum() > 0
    assert model.model.language_model.embed_tokens.weight.grad.abs().sum() > 0


def test_generation_prompt_and_eos(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.tie_word_embeddings


def test_compact_variant_is_small_and_has_the_special_tokens(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) < 2000
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_IDS]
    assert len(set(ids)) == len(ids) and tok.unk_token_id not in ids


@pytest.mark.slow
def test_qwen_ids_variant_matches_the_real_qwen_ids(tmp_path):
    out = tiny.build(tmp_path / "qwen-ids", variant="qwen-ids")
    tok = AutoTokenizer.from_pretrained(out)
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN_IDS} == QWEN_IDS
    assert tok.encode("assistant", add_special_tokens=False) == [tiny.QWEN_ASSISTANT_ID]
    assert tok.encode("\n", add_special_tokens=False) == [tiny.QWEN_NEWLINE_ID]
    model = Qwen3VLForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.vocab_size == 151936
    assert model.config.image_token_id == 151655
    files = {p.name for p in out.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= files
    import json

    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["rope_scaling"]["mrope_section"] == [8, 4, 4]


def test_two_builds_with_one_seed_are_byte_identical(tmp_path, tiny_model_dir):
    again = tiny.build(tmp_path / "again")
    assert digest(again) == digest(tiny_model_dir)
    other = tiny.build(tmp_path / "other", seed=1)
    assert digest(other)["model.safetensors"] != digest(tiny_model_dir)["model.safetensors"]


def test_gpt2_byte_order_puts_newline_at_198():
    order = tiny.gpt2_byte_order()
    assert len(order) == len(set(order)) == 256
    assert order[198] == "\u010a"  # byte 10 ("\n") in the byte-level alphabet
    assert order[0] == "!"


def test_real_dims_depth_flags_are_checked_and_deepstack_taps_follow_a_cut_vision_tower(tmp_path, capsys):
    assert tiny.qwen3vl_2b_config().vision_config.deepstack_visual_indexes == [5, 11, 17]
    assert tiny.qwen3vl_2b_config(vision_depth=8).vision_config.deepstack_visual_indexes == [5, 7]
    assert tiny.qwen3vl_2b_config(text_layers=2).text_config.num_hidden_layers == 2

    with pytest.raises(SystemExit) as exit_info:
        tiny.main(["--output", str(tmp_path / "m"), "--variant", "real-dims", "--text_layers", "0"])
    assert exit_info.value.code == 2
    assert "--text_layers and --vision_depth must be >= 1, got 0, 24" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # refused before anything was written
