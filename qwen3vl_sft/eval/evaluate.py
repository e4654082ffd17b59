"""Held-out evaluation: teacher-forced answer loss, batched greedy answers and their scores.

    python -m qwen3vl_sft.eval.evaluate --model tiny_models/qwen3-vl-tiny --data data/test.json

* ``loss``: mean cross-entropy over the supervised (answer) tokens of every turn, exactly the tokens
  training optimises; defined for every data set, so it is the federated job's key metric;
* ``accuracy``: for records whose first answer is short (a few words, like the synthetic set's
  "upper left"), the share whose greedy answer to the first question matches it (case and
  punctuation ignored); NaN when no answer is short (PubMedVision's answers are paragraphs);
* ``rouge_l`` / ``token_f1``: over the generated answers (:mod:`.metrics`), the scores for long answers.

:func:`evaluate_file` is what training, the federated client's validation and the demo report;
:func:`evaluate_answers` scores an answer for every record, for run_inference.py. Answers come from
:func:`generate_answers`: left-padded batches, returned in record order, the same greedy answers as one
prompt at a time. A record with a defective image is skipped under the one image rule of
:meth:`.data.SampleBuilder.load_images` and counted (``skipped_images``): loss and answers always
cover the same records.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from ..config import DataConfig
from ..data.samples import IGNORE_INDEX, Collator, SampleBuilder, build_dataset
from ..model.modeling import compute_autocast
from .metrics import is_short, score_answers


def first_answer(record: dict) -> str:
    return next(t["value"] for t in record["conversations"] if t["from"] == "gpt").strip()


def first_question(record: dict) -> str:
    return next(t["value"] for t in record["conversations"] if t["from"] == "human").strip()


def is_short_answer(record: dict) -> bool:
    return is_short(first_answer(record))


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def loss_pass(model, processor, dataset, batch_size: int = 8) -> tuple[float, list[int], dict[int, dict]]:
    """(mean loss per supervised token, indices of the records that gave a sample, the skipped ones).

    Building each sample decodes its images under the image rule, so this pass is also the image
    check of evaluation: ``skipped`` maps a record's index to ``{"skipped": kind, "reason": ...}``.
    """
    collate = Collator(processor.tokenizer.pad_token_id)
    total_loss, total_tokens = 0.0, 0
    kept: list[int] = []
    skipped: dict[int, dict] = {}
    device = next(model.parameters()).device
    for indices in _batches(list(range(len(dataset))), batch_size):
        samples = [dataset[i] for i in indices]
        skipped |= {i: s for i, s in zip(indices, samples, strict=True) if "skipped" in s}
        kept += [i for i in indices if i not in skipped]
        batch = collate(samples)
        batch.pop("num_skipped")
        batch.pop("num_dropped")
        if "input_ids" not in batch:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if batch.get("pixel_values") is not None:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        loss = model(**batch).loss
        total_loss += float(loss) * tokens
        total_tokens += tokens
    return (total_loss / total_tokens if total_tokens else math.nan), kept, skipped


def answer_loss(model, processor, dataset, batch_size: int = 8) -> float:
    """Mean loss per supervised token over a dataset (skipped samples excluded)."""
    return loss_pass(model, processor, dataset, batch_size)[0]


def _image_skips(skipped: dict[int, dict]) -> dict[int, dict]:
    return {i: s for i, s in skipped.items() if s["skipped"] == "image"}


def _prompt_length(record: dict) -> tuple[int, int]:
    """Sort key that groups prompts of similar padded length (images first: each adds many tokens)."""
    return len(record["image"]), len(first_question(record))


@torch.no_grad()
def generate_answers(
    model,
    builder: SampleBuilder,
    records,
    max_new_tokens=16,
    batch_size=8,
    *,
    progress: str | None = None,
    **generation,
) -> list[str]:
    """Answers to each record's first question (greedy unless ``generation`` says otherwise).

    Prompts are built by ``builder`` (the training data path: same system prompt, image root and
    limits) and generated in left-padded batches of similar length (fewer pad tokens); the answers
    are returned in the order of ``records``. ``progress`` labels a progress bar.
    """
    from tqdm.auto import tqdm

    tokenizer = builder.processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    order = sorted(range(len(records)), key=lambda i: _prompt_length(records[i]))
    answers: dict[int, str] = {}
    options = {"do_sample": False, "use_cache": True, **generation}  # use_cache: training turns it off
    try:
        with tqdm(total=len(records), desc=progress, disable=progress is None, unit="sample") as bar:
            for chunk in _batches(order, batch_size):
                enc = _encode_prompts(builder, [records[i] for i in chunk]).to(device)
                if "pixel_values" in enc:
                    enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, **options)
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                answers.update(zip(chunk, (t.strip() for t in texts), strict=True))
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
    return [answers[i] for i in range(len(records))]


def _encode_prompts(builder: SampleBuilder, records: list[dict]):
    processor = builder.processor
    prompts, images = zip(*(builder.prompt(r) for r in records), strict=True)
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    flat = [img for group in images for img in group]
    return processor(text=texts, images=flat or None, padding=True, return_tensors="pt")


def evaluate_answers(
    model, processor, dataset, max_new_tokens=256, batch_size=8, progress: str | None = None, **generation
) -> tuple[dict, list[str]]:
    """Answer loss over every turn, answers to every record's first question, and their scores.

    Returns (metrics, answers): ``loss``, ``rouge_l``, ``token_f1``, ``exact_match`` (short answers
    only; NaN when there are none), counts (``skipped_images``: records dropped for a defective image,
    by :meth:`.data.RecordDataset.screen` before or by this loss pass), and generation throughput.
    Records whose images fail are removed from ``dataset.records``, so ``answers`` follow it.
    """
    was_training = model.training
    model.eval()
    try:
        loss, _, skipped = loss_pass(model, processor, dataset, batch_size)
        bad = _image_skips(skipped)
        if bad:  # an unscreened dataset: answer (and let later checkpoints answer) only the good ones
            dataset.image_skips += [s["reason"] for s in bad.values()]
            dataset.keep([r for i, r in enumerate(dataset.records) if i not in bad])
        start = time.perf_counter()
        answers = generate_answers(
            model,
            dataset.builder,
            dataset.records,
            max_new_tokens,
            batch_size,
            progress=progress,
            **generation,
        )
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    metrics = {"loss": loss, **score_answers(answers, [first_answer(r) for r in dataset.records])}
    metrics |= {"samples": len(dataset), "skipped_images": len(dataset.image_skips)}
    metrics |= {"generation_seconds": seconds}
    metrics["samples_per_second"] = len(dataset) / seconds if seconds > 0 else math.nan
    return metrics, answers


SHORT_MAX_NEW_TOKENS = 16  # a short answer is <= 4 words; 16 tokens leave room for a wordier wrong one


def evaluate_file(
    model, processor, data: DataConfig, path, max_samples: int | None = None, batch_size=8
) -> dict:
    """Loss, short-answer accuracy, ROUGE-L and token F1 of ``model`` on a PubMedVision-format file.

    The loss covers every record (the first ``max_samples`` when given) whose images pass the image
    rule; answers are generated for all of those with a short answer and for the first
    ``data.val_generate_samples`` with a long one (``data.val_max_new_tokens`` each). Returns ``loss``,
    ``accuracy`` (NaN without short answers), ``rouge_l``, ``token_f1`` (NaN when nothing was
    generated), ``samples`` (records scored by the loss), ``scored_answers``, ``skipped_images``.
    """
    dataset = build_dataset(processor, data, str(path))
    if max_samples:
        dataset.keep(dataset.records[:max_samples])
    was_training = model.training
    model.eval()
    try:
        with compute_autocast(model):  # fp32 trained + bf16 frozen weights compute as in training
            loss, kept, skipped = loss_pass(model, processor, dataset, batch_size)
            records = [dataset.records[i] for i in kept]
            short = [r for r in records if is_short_answer(r)]
            long = [r for r in records if not is_short_answer(r)][: max(data.val_generate_samples, 0)]
            answers = generate_answers(model, dataset.builder, short, SHORT_MAX_NEW_TOKENS, batch_size)
            answers += generate_answers(model, dataset.builder, long, data.val_max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    scores = score_answers(answers, [first_answer(r) for r in short + long])
    return {
        "loss": loss,
        "accuracy": scores["exact_match"],
        "rouge_l": scores["rouge_l"],
        "token_f1": scores["token_f1"],
        "samples": len(records),
        "scored_answers": scores["scored_answers"],
        "skipped_images": len(_image_skips(skipped)),
    }


def evaluate_model_dir(
    model_dir: str, data: DataConfig, path, max_samples: int | None = None, base_model: str = ""
) -> dict:
    """:func:`evaluate_file` of the checkpoint at ``model_dir``: an HF directory, a PEFT adapter directory
    (the LoRA global model) or a .pt, detected and loaded exactly as run_inference.py loads it."""
    from ..config import InferenceConfig
    from .loading import Checkpoint, detect, load_checkpoint, resolve_device

    cfg = InferenceConfig(base_model=base_model, compare_base=False, data_file=str(path))
    ckpt = detect(Checkpoint("model", str(model_dir)), cfg)
    model, processor = load_checkpoint(ckpt, cfg, resolve_device(cfg.device), data)
    return evaluate_file(model, processor, data, path, max_samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Held-out loss and accuracy of a Qwen3-VL checkpoint.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--base_model", default="", help="Base of a .pt or adapter that records none.")
    args = parser.parse_args(argv)
    data = DataConfig(data_path=args.data)
    print(evaluate_model_dir(args.model, data, args.data, args.max_samples, args.base_model))


if __name__ == "__main__":
    main()
