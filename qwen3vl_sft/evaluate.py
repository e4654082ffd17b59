"""Held-out evaluation: teacher-forced answer loss and greedy-answer accuracy.

    python -m qwen3vl_sft.evaluate --model tiny_models/qwen3-vl-tiny --data data/test.json

* ``loss``: mean cross-entropy over the supervised (answer) tokens of every turn, exactly the tokens
  training optimises;
* ``accuracy``: for records whose first answer is short (a few words, like the synthetic set's
  "upper left"), the share whose greedy answer to the first question matches it (case and
  punctuation ignored). Long free-text answers are scored by run_inference.py's ROUGE-L / token F1.
"""

from __future__ import annotations

import argparse
import math
import re
import string

import torch

from .config import DataConfig
from .data import IGNORE_INDEX, Collator, build_dataset, open_image, to_messages
from .records import resolve_image_path

SHORT_ANSWER_WORDS = 4


def normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, truth: str) -> bool:
    return normalize(prediction) == normalize(truth)


def first_answer(record: dict) -> str:
    return next(t["value"] for t in record["conversations"] if t["from"] == "gpt").strip()


def is_short_answer(record: dict) -> bool:
    return 0 < len(first_answer(record).split()) <= SHORT_ANSWER_WORDS


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def answer_loss(model, processor, dataset, batch_size: int = 8) -> float:
    """Mean loss per supervised token over a dataset (skipped samples excluded)."""
    collate = Collator(processor.tokenizer.pad_token_id)
    total_loss, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for indices in _batches(list(range(len(dataset))), batch_size):
        batch = collate([dataset[i] for i in indices])
        batch.pop("num_skipped")
        if "input_ids" not in batch:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if batch.get("pixel_values") is not None:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        loss = model(**batch).loss
        total_loss += float(loss) * tokens
        total_tokens += tokens
    return total_loss / total_tokens if total_tokens else math.nan


def prompt_inputs(record: dict, image_root) -> tuple[list[dict], list]:
    """Messages up to the first question (with generation prompt) and its images."""
    messages = to_messages(record)
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    images = [open_image(resolve_image_path(image_root, p), 16384) for p in record["image"]]
    return messages[: first_user + 1], images


@torch.no_grad()
def generate_answers(model, processor, records, image_root, max_new_tokens=16, batch_size=8) -> list[str]:
    """Greedy answers to each record's first question, generated in left-padded batches."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for chunk in _batches(records, batch_size):
            prompts, images = zip(*(prompt_inputs(r, image_root) for r in chunk), strict=True)
            texts = [
                processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts
            ]
            flat = [img for group in images for img in group]
            enc = processor(text=texts, images=flat or None, padding=True, return_tensors="pt").to(device)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def evaluate_file(
    model, processor, data: DataConfig, path, max_samples: int | None = None, batch_size=8
) -> dict:
    """Loss and short-answer accuracy of ``model`` on a PubMedVision-format file."""
    dataset = build_dataset(processor, data, str(path))
    if max_samples:
        dataset.records = dataset.records[:max_samples]
    was_training = model.training
    model.eval()
    try:
        loss = answer_loss(model, processor, dataset, batch_size)
        short = [r for r in dataset.records if is_short_answer(r)]
        answers = generate_answers(model, processor, short, dataset.builder.image_root, batch_size=batch_size)
    finally:
        model.train(was_training)
    correct = sum(exact_match(a, first_answer(r)) for a, r in zip(answers, short, strict=True))
    return {
        "loss": loss,
        "accuracy": correct / len(short) if short else math.nan,
        "samples": len(dataset),
        "scored_answers": len(short),
    }


def main(argv: list[str] | None = None) -> None:
    from .config import ModelConfig
    from .modeling import load_model, load_processor

    parser = argparse.ArgumentParser(description="Held-out loss and accuracy of a Qwen3-VL checkpoint.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max_samples", type=int, default=None)
    args = parser.parse_args(argv)
    data = DataConfig(data_path=args.data)
    model = load_model(ModelConfig(model_name_or_path=args.model))
    print(evaluate_file(model, load_processor(args.model, data), data, args.data, args.max_samples))


if __name__ == "__main__":
    main()
