"""Fake ``qwenvl/data/data_processor.py``: records -> model inputs, with upstream's record format.

Contract reproduced: ``make_supervised_data_module(processor, data_args)`` returns ``train_dataset``,
``eval_dataset`` (None) and ``data_collator``; data sets come from ``data_list(dataset_use.split(","))``;
a record has ``image`` (a path or a list, relative to the entry's ``data_path``) and ``conversations``
(``from`` human/gpt, ``value``), each ``<image>`` in a human turn taking the next image; labels supervise
the tokens after ``assistant`` + newline up to and including ``<|im_end|>`` and the newline after it,
found by the token ids Qwen's tokenizer gives them (hard-coded, as upstream does).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from . import data_list

ASSISTANT_ID, IM_END_ID, IGNORE_INDEX = 77091, 151645, -100


def supervised_labels(input_ids: list[int]) -> list[int]:
    labels = [IGNORE_INDEX] * len(input_ids)
    pos = 0
    while pos < len(input_ids):
        if input_ids[pos] == ASSISTANT_ID:
            start = end = pos + 2  # skip the newline after the role name
            while end < len(input_ids) and input_ids[end] != IM_END_ID:
                end += 1
            if end < len(input_ids):
                labels[start : end + 2] = input_ids[start : end + 2]
            pos = end
        pos += 1
    return labels


def to_messages(record: dict, base: Path) -> list[dict]:
    images = record.get("image") or []
    pool = [str((base / path).resolve()) for path in ([images] if isinstance(images, str) else images)]
    messages = []
    for turn in record["conversations"]:
        if turn["from"] != "human":
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"]}]})
            continue
        content = []
        for piece in re.split(r"(<image>)", turn["value"]):
            if piece == "<image>":
                content.append({"type": "image", "image": pool.pop(0)})
            elif piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": "user", "content": content})
    if pool:
        raise ValueError(f"record {record.get('id')}: {len(pool)} images without an <image> placeholder")
    return messages


def load_annotations(entry: dict) -> list[dict]:
    path = Path(entry["annotation_path"])
    text = path.read_text(encoding="utf-8")
    records = (
        [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix == ".jsonl"
        else json.loads(text)
    )
    if entry["sampling_rate"] < 1.0:
        records = random.sample(records, int(len(records) * entry["sampling_rate"]))
    return [{**record, "data_path": entry["data_path"]} for record in records]


class SupervisedDataset(Dataset):
    def __init__(self, processor, data_args):
        if getattr(data_args, "model_type", None) != "qwen3vl":
            raise ValueError(
                f"fake clone: model_type {getattr(data_args, 'model_type', None)!r} not supported"
            )
        self.processor = processor
        self.records = [
            r for entry in data_list(data_args.dataset_use.split(",")) for r in load_annotations(entry)
        ]
        processor.image_processor.size = {
            "shortest_edge": data_args.min_pixels,
            "longest_edge": data_args.max_pixels,
        }

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        inputs = self.processor.apply_chat_template(
            to_messages(record, Path(record["data_path"])),
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        ids = inputs["input_ids"][0]
        return {**inputs, "labels": torch.tensor(supervised_labels(ids.tolist())).unsqueeze(0)}


class Collator:
    """Right-pads the text tensors of a batch and concatenates the image tensors."""

    PAD_VALUES = {"input_ids": None, "labels": IGNORE_INDEX, "attention_mask": 0, "mm_token_type_ids": 0}

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict:
        length = max(s["input_ids"].shape[1] for s in samples)
        batch = {}
        for key, pad in self.PAD_VALUES.items():
            if key in samples[0]:
                value = self.pad_token_id if pad is None else pad
                rows = [
                    torch.nn.functional.pad(s[key][0], (0, length - s[key].shape[1]), value=value)
                    for s in samples
                ]
                batch[key] = torch.stack(rows)
        for key in ("pixel_values", "image_grid_thw"):
            if key in samples[0]:
                batch[key] = torch.cat([s[key] for s in samples])
        return batch


def make_supervised_data_module(processor, data_args) -> dict:
    if data_args.data_flatten or data_args.data_packing:
        raise NotImplementedError("fake clone: flattened / packed batches are not reproduced")
    dataset = SupervisedDataset(processor, data_args)
    return {
        "train_dataset": dataset,
        "eval_dataset": None,
        "data_collator": Collator(processor.tokenizer.pad_token_id),
    }
