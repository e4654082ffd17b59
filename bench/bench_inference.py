"""Batched vs one-at-a-time answer generation on the tiny Qwen3-VL: samples per second, side by side.

    python bench/bench_inference.py                         # tiny model + synthetic records, built offline
    python bench/bench_inference.py --model outputs/tiny-sft --num_samples 64 --batch_size 32

Both modes run in the same process, on the same model and records, alternating (one-at-a-time, batched,
one-at-a-time, ...) so that a busy machine slows both alike; each figure is the best of ``--repeats``.

* one-at-a-time: ``generate_answers(batch_size=1)``, what the seed's run_inference.py did (one prompt,
  one ``generate`` call per sample);
* batched: ``generate_answers(batch_size=N)``: left-padded batches of prompts of similar length.

Greedy decoding; the script also checks that both modes give the same answers. Target: >= 3x.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: the package lives at the repo root
TARGET_SPEEDUP = 3.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="", help="HF directory of a Qwen3-VL (default: build the tiny one)"
    )
    parser.add_argument("--data_file", default="", help="PubMedVision-format records (default: synthetic)")
    parser.add_argument("--num_samples", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--work_dir", default="", help="Where the tiny model / data are built (default: temp)"
    )
    return parser.parse_args(argv)


def inputs(args, work: Path) -> tuple[str, str]:
    from qwen3vl_sft.data import synthetic
    from qwen3vl_sft.model import tiny

    model = args.model or str(tiny.ensure(work / "qwen3-vl-tiny"))
    spec = synthetic.SyntheticSpec(num_records=max(args.num_samples, 64))
    data = args.data_file or str(synthetic.ensure(work / "synth", spec))
    return model, data


def timed(fn) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = fn()
    return time.perf_counter() - start, answers


def main(argv=None) -> int:
    import torch

    from qwen3vl_sft.config import DataConfig, InferenceConfig
    from qwen3vl_sft.data.samples import build_dataset
    from qwen3vl_sft.eval.evaluate import generate_answers
    from qwen3vl_sft.eval.loading import Checkpoint, load_checkpoint

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data_file = inputs(args, Path(args.work_dir or tmp))
        model, processor = load_checkpoint(
            Checkpoint("bench", model_dir, "hf"), InferenceConfig(), torch.device("cpu")
        )
        dataset = build_dataset(processor, DataConfig(), data_file)
        records = dataset.records[: args.num_samples]

        def run(batch_size: int) -> list[str]:
            return generate_answers(model, dataset.builder, records, args.max_new_tokens, batch_size)

        run(args.batch_size)  # warm-up: first calls pay for lazy initialisation
        best = {1: float("inf"), args.batch_size: float("inf")}
        answers: dict[int, list[str]] = {}
        for _ in range(args.repeats):
            for batch_size in best:
                seconds, answers[batch_size] = timed(lambda b=batch_size: run(b))
                best[batch_size] = min(best[batch_size], seconds)

    n = len(records)
    single, batched = n / best[1], n / best[args.batch_size]
    print(
        f"model {model_dir}, {n} samples, max_new_tokens {args.max_new_tokens}, torch threads {torch.get_num_threads()}"
    )
    print(f"one-at-a-time       : {single:7.2f} samples/s ({best[1]:.2f} s)")
    print(f"batched (batch {args.batch_size:>3}) : {batched:7.2f} samples/s ({best[args.batch_size]:.2f} s)")
    print(f"speed-up            : {batched / single:.2f}x (target >= {TARGET_SPEEDUP:.0f}x)")
    same = answers[1] == answers[args.batch_size]
    print(f"same greedy answers : {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
