"""Record -> messages -> input_ids / labels / pixels, and batching, on literal samples."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from qwen3vl_sft.config import DataConfig
from qwen3vl_sft.data.samples import (
    IGNORE_INDEX,
    Collator,
    SampleBuilder,
    SkipSample,
    TokenIds,
    build_dataset,
    mask_labels,
    to_messages,
    truncation_point,
)

# Literal ids: 1 <|im_start|>, 2 <|im_end|>, 5 "user", 6 "assistant", 9 "\n",
# 3 vision_start, 4 vision_end, 7 image_pad, 0 pad.
IDS = TokenIds(
    im_start=1, im_end=2, assistant_header=(1, 6, 9), vision_start=3, vision_end=4, image_pad=7, pad=0
)
X = IGNORE_INDEX


def test_mask_labels_supervises_each_assistant_answer_and_its_im_end():
    #           <s> user \n  vs  img img ve  Q   </s> \n  <s> asst \n  A1  A2  </s> \n
    ids = [1, 5, 9, 3, 7, 7, 4, 40, 2, 9, 1, 6, 9, 50, 51, 2, 9]
    assert mask_labels(ids, IDS) == [X, X, X, X, X, X, X, X, X, X, X, X, X, 50, 51, 2, X]


def test_mask_labels_multi_turn_and_system():
    ids = (
        [1, 8, 9, 30, 2, 9]
        + [1, 5, 9, 40, 2, 9]
        + [1, 6, 9, 50, 2, 9]
        + [1, 5, 9, 41, 2, 9]
        + [1, 6, 9, 60, 61, 2, 9]
    )
    expected = [X] * 6 + [X] * 6 + [X, X, X, 50, 2, X] + [X] * 6 + [X, X, X, 60, 61, 2, X]
    assert mask_labels(ids, IDS) == expected


def test_mask_labels_answer_cut_by_truncation_keeps_what_is_left():
    assert mask_labels([1, 5, 9, 40, 2, 9, 1, 6, 9, 50, 51], IDS) == [X] * 9 + [50, 51]


def test_truncation_never_cuts_through_image_tokens():
    ids = [1, 5, 9, 3, 7, 7, 7, 7, 4, 40, 2]
    assert truncation_point(ids, 100, IDS) == len(ids)
    assert truncation_point(ids, 6, IDS) == 3  # the cut would split vision_start..vision_end: cut before it
    assert truncation_point(ids, 9, IDS) == 9  # right after vision_end is fine
    assert truncation_point(ids, 10, IDS) == 10


def test_to_messages_places_images_at_their_placeholders_in_order():
    record = {
        "id": "r1",
        "image": ["images/a.jpg", "images/b.jpg"],
        "conversations": [
            {"from": "human", "value": "Compare <image> with <image>."},
            {"from": "gpt", "value": "They differ."},
        ],
    }
    user, assistant = to_messages(record)
    assert [c["type"] for c in user["content"]] == ["text", "image", "text", "image", "text"]
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]}


def test_to_messages_adds_missing_placeholders_first():
    record = {"id": "r", "image": ["a.jpg", "b.jpg", "c.jpg"], "conversations": [
        {"from": "human", "value": "Which shows it?"}, {"from": "gpt", "value": "the first image"}]}  # fmt: skip
    user = to_messages(record)[0]
    assert [c["type"] for c in user["content"]] == ["image", "image", "image", "text"]


def image_file(folder, name, color=(10, 200, 10), size=(64, 64)):
    path = folder / name
    Image.new("RGB", size, color).save(path)
    return name


def decode_supervised(processor, sample):
    ids = [
        t for t, lab in zip(sample["input_ids"].tolist(), sample["labels"].tolist(), strict=True) if lab != X
    ]
    return processor.tokenizer.decode(ids)


def test_builder_single_image(processor, tmp_path):
    record = {"id": "s", "image": [image_file(tmp_path, "a.png")], "conversations": [
        {"from": "human", "value": "<image>\nWhere is the lesion?"}, {"from": "gpt", "value": "upper left"}]}  # fmt: skip
    sample = SampleBuilder(processor, DataConfig(), tmp_path)(record)
    assert decode_supervised(processor, sample) == "upper left<|im_end|>"
    assert sample["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert sample["pixel_values"].shape[0] == 16
    image_positions = (sample["input_ids"] == processor.image_token_id).nonzero().flatten().tolist()
    assert len(image_positions) == 4 and all(sample["labels"][image_positions] == X)
    assert (sample["mm_token_type_ids"] == 1).sum() == 4


def test_builder_multi_image_multi_turn(processor, tmp_path):
    names = [image_file(tmp_path, f"{i}.png", (i * 60, 0, 0)) for i in range(3)]
    record = {"id": "m", "image": names, "conversations": [
        {"from": "human", "value": "Which image shows the lesion?"}, {"from": "gpt", "value": "the second image"},
        {"from": "human", "value": "Which imaging modality is this?"}, {"from": "gpt", "value": "CT"}]}  # fmt: skip
    sample = SampleBuilder(processor, DataConfig(), tmp_path)(record)
    assert decode_supervised(processor, sample) == "the second image<|im_end|>CT<|im_end|>"
    assert sample["image_grid_thw"].shape == (3, 3) and sample["pixel_values"].shape[0] == 48


def test_generation_prompt_is_rendered_as_in_training_up_to_the_first_question(processor, tmp_path):
    """Bug fixed here: evaluation prompts dropped --system_prompt and ignored --max_image_side."""
    names = [image_file(tmp_path, "a.png"), image_file(tmp_path, "b.png", size=(300, 20))]
    record = {"id": "p", "image": names, "conversations": [
        {"from": "human", "value": "<image><image>\nWhich image?"}, {"from": "gpt", "value": "the first image"},
        {"from": "human", "value": "Modality?"}, {"from": "gpt", "value": "CT"}]}  # fmt: skip
    builder = SampleBuilder(processor, DataConfig(system_prompt="You are a radiologist."), tmp_path)
    messages, images = builder.prompt(record)
    assert messages == [
        {"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which image?"}]},
    ]  # fmt: skip
    assert [im.size for im in images] == [(64, 64), (300, 20)]
    assert builder.image_paths(record) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    with pytest.raises(
        SkipSample, match="record 'p': image .*b.png: 300x20 pixels exceeds max_image_side 200"
    ):
        SampleBuilder(processor, DataConfig(max_image_side=200), tmp_path).prompt(record)


def test_truncated_sample_keeps_whole_images_or_is_dropped(processor, tmp_path):
    record = {"id": "t", "image": [image_file(tmp_path, "a.png")], "conversations": [
        {"from": "human", "value": "<image>\nWhere is the lesion?"}, {"from": "gpt", "value": "upper left"}]}  # fmt: skip
    with pytest.raises(SkipSample, match="no answer token"):
        SampleBuilder(processor, DataConfig(model_max_length=6), tmp_path)(record)
    full = SampleBuilder(processor, DataConfig(), tmp_path)(record)
    cut = SampleBuilder(processor, DataConfig(model_max_length=len(full["input_ids"]) - 3), tmp_path)(record)
    assert len(cut["input_ids"]) == len(full["input_ids"]) - 3
    assert cut["pixel_values"].shape == full["pixel_values"].shape


def test_missing_or_corrupt_image_is_a_skip_naming_the_record(processor, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    builder = SampleBuilder(processor, DataConfig(), tmp_path)
    for name in ("missing.jpg", "bad.jpg"):
        record = {"id": f"rec-{name}", "image": [name], "conversations": [
            {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}  # fmt: skip
        with pytest.raises(SkipSample, match=f"rec-{name}"):
            builder(record)


def test_oversized_image_is_refused_before_decoding(processor, tmp_path):
    name = image_file(tmp_path, "big.png", size=(300, 20))
    record = {"id": "big", "image": [name], "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}  # fmt: skip
    with pytest.raises(SkipSample, match="max_image_side"):
        SampleBuilder(processor, DataConfig(max_image_side=256), tmp_path)(record)


def test_collator_pads_right_and_counts_skips():
    a = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([X, 2, 3]), "mm_token_type_ids": torch.tensor([0, 1, 0]),
         "pixel_values": torch.ones(4, 2), "image_grid_thw": torch.tensor([[1, 2, 2]])}  # fmt: skip
    b = {
        "input_ids": torch.tensor([4, 5]),
        "labels": torch.tensor([X, 5]),
        "mm_token_type_ids": torch.tensor([0, 0]),
    }
    batch = Collator(pad_token_id=0)([a, {"skipped": "image"}, b, {"skipped": "no_answer"}])
    assert batch["num_skipped"].item() == 1 and batch["num_dropped"].item() == 1
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["labels"].tolist() == [[X, 2, 3], [X, 5, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert batch["pixel_values"].shape == (4, 2) and batch["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert set(Collator(0)([{"skipped": "image"}])) == {"num_skipped", "num_dropped"}


def test_dataset_reads_a_synthetic_file_lazily(processor, synth_file):
    dataset = build_dataset(processor, DataConfig(), str(synth_file))
    assert len(dataset) == 200
    sample = dataset[0]
    assert "input_ids" in sample and (sample["labels"] != X).any()


def test_cached_dataset_builds_each_sample_once(processor, synth_file):
    dataset = build_dataset(processor, DataConfig(cache_samples=True), str(synth_file))
    fresh = dataset[7]
    dataset.fill_cache(num_workers=0)
    assert len(dataset.cache) == len(dataset) == 200
    dataset.builder = None  # a rebuild would now fail: every sample must come from the cache
    cached = dataset[7]
    assert set(cached) == set(fresh)
    assert all(torch.equal(cached[k], fresh[k]) for k in fresh)
