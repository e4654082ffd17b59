"""Step time on the tiny Qwen3-VL with the real data pipeline vs batches held in memory, side by side.

    .venv/bin/python bench/bench_data_pipeline.py                      # tiny model + synthetic data, offline
    .venv/bin/python bench/bench_data_pipeline.py --steps 40 --batch_size 8 --repeats 3 --profile

Target: with the real data pipeline the step time is within 10 % of the step time on pre-collated
batches held in memory. Every variant trains the same model (weights reset before each run), with the
same Trainer arguments, seed, batch size, steps and therefore the same batches in the same order:

* real, workers=N : ``SFTEngine.train_round`` as a site runs it (N = DataConfig's default);
* real, workers=1 : the same with one worker (one compute thread + one worker = two cores);
* real, workers=0 : the same, images decoded and processed in the training process;
* precomputed     : a RoundTrainer over samples built once beforehand (collation still runs per step):
                    what every round after the first would cost with samples cached across rounds;
* pre-collated    : a RoundTrainer whose collator hands out the batches built once beforehand.

Variants are interleaved and each figure is the best of ``--repeats`` (the machine is shared); one torch
compute thread by default (``--torch_threads``) so that runs on a busy 2-core machine compare. Step time
is measured by a Trainer callback from ``on_train_begin`` to the last ``on_step_end``: it includes the
first batch's latency (worker start-up) but not Trainer construction. ``--profile`` adds a cProfile of
building the samples of one round in the training process (what workers=0 pays per step).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: the package lives at the repo root
TARGET_RATIO = 1.10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per timed run.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per variant (best is kept).")
    parser.add_argument("--num_records", type=int, default=256)
    parser.add_argument(
        "--work_dir", default="", help="Where the tiny model / data are built (default: temp)"
    )
    # One compute thread by default: on a shared 2-core machine torch's default (all cores) makes OpenMP
    # threads spin against other processes and the DataLoader workers, and timings swing 10x between runs.
    parser.add_argument("--torch_threads", type=int, default=1, help="CPU threads (0 = torch's default).")
    parser.add_argument("--profile", action="store_true", help="Profile sample building (cProfile).")
    return parser.parse_args(argv)


@dataclass
class Run:
    """One timed run: step timestamps and what was trained."""

    begin: float = 0.0
    step_ends: list[float] = field(default_factory=list)
    samples: int = 0
    supervised_tokens: int = 0
    loss: float = float("nan")

    @property
    def step_time(self) -> float:
        return (self.step_ends[-1] - self.begin) / len(self.step_ends)

    @property
    def steady_step_time(self) -> float:
        """Median step after the first (the first one also waits for worker start-up)."""
        ends = [self.begin, *self.step_ends]
        return statistics.median(b - a for a, b in zip(ends[1:-1], ends[2:], strict=True))


def step_timer(run: Run):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            run.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            run.step_ends.append(time.perf_counter())

    return StepTimer()


@contextlib.contextmanager
def timed_trainers(run: Run):
    """Every Trainer built inside gets the step timer.

    train_round builds its Trainer internally; DEFAULT_CALLBACKS is the list every Trainer reads when
    it is constructed, so this times the real path without changing train/engine.py.
    """
    from transformers import trainer as hf_trainer

    timer = step_timer(run)
    hf_trainer.DEFAULT_CALLBACKS.append(timer)
    try:  # stdout muted: with the progress bar off, Trainer prints its end-of-run metrics dict
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_trainer.DEFAULT_CALLBACKS.remove(timer)


class SampleList:
    """Samples built once, returned by index (what a fully cached data set would look like)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return {"index": index, **self.samples[index]}


class PlainCollator:
    """The real Collator on precomputed samples (drops the index the SampleList adds)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, samples: list[dict]) -> dict:
        return self.collator([{k: v for k, v in s.items() if k != "index"} for s in samples])


class CachedCollator:
    """Collates each index combination once; afterwards hands out the stored batch (a shallow copy,
    because RoundTrainer pops the skip counters from the dict it is given)."""

    def __init__(self, collator):
        self.plain = PlainCollator(collator)
        self.batches: dict[tuple[int, ...], dict] = {}

    def __call__(self, samples: list[dict]) -> dict:
        key = tuple(s["index"] for s in samples)
        if key not in self.batches:
            self.batches[key] = self.plain(samples)
        return dict(self.batches[key])


def build_inputs(args, work: Path) -> tuple[Path, Path]:
    from qwen3vl_sft.data import synthetic
    from qwen3vl_sft.model import tiny

    model_dir = tiny.ensure(work / "qwen3-vl-tiny")
    spec = synthetic.SyntheticSpec(num_records=args.num_records)
    return model_dir, synthetic.ensure(work / f"synth-{args.num_records}", spec)


def sft_config(args, model_dir: Path, data_file: Path, work: Path, workers: int):
    from qwen3vl_sft.config import DataConfig, ModelConfig, TrainConfig
    from qwen3vl_sft.train.engine import RunConfig

    train = TrainConfig(
        output_dir=str(work / "out"), learning_rate=5e-4, per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, logging_steps=args.steps + 1, disable_progress_bar=True, seed=42,
        torch_threads=args.torch_threads,
    )  # fmt: skip
    data = DataConfig(data_path=str(data_file), dataloader_num_workers=workers)
    return RunConfig(model=ModelConfig(model_name_or_path=str(model_dir)), data=data, train=train)


class Bench:
    """The engine, its initial weights and the in-memory variants of its data set."""

    def __init__(self, args, model_dir: Path, data_file: Path, work: Path):
        from qwen3vl_sft.config import DataConfig
        from qwen3vl_sft.data.samples import Collator
        from qwen3vl_sft.train.engine import SFTEngine

        self.default_workers = DataConfig().dataloader_num_workers
        self.engine = SFTEngine(sft_config(args, model_dir, data_file, work, self.default_workers))
        self.initial = {k: v.detach().clone() for k, v in self.engine.model.state_dict().items()}
        start = time.perf_counter()
        self.samples = SampleList([self.engine.dataset[i] for i in range(len(self.engine.dataset))])
        self.build_seconds = time.perf_counter() - start
        assert not any("skipped" in s for s in self.samples.samples), "synthetic samples must all build"
        collator = Collator(self.engine.processor.tokenizer.pad_token_id)
        self.plain, self.cached = PlainCollator(collator), CachedCollator(collator)

    def reset(self, workers: int) -> None:
        self.engine.model.load_state_dict(self.initial)
        self.engine.config.data.dataloader_num_workers = workers

    def real(self, workers: int) -> Run:
        self.reset(workers)
        run = Run()
        with timed_trainers(run):
            metrics = self.engine.train_round().metrics
        run.samples, run.supervised_tokens, run.loss = (
            metrics["samples"], metrics["supervised_tokens"], metrics["train_loss"],
        )  # fmt: skip
        return run

    def real_cached(self) -> Run:
        """The real path with --cache_samples: what rounds 2+ cost once round 1 has built the samples."""
        dataset, data = self.engine.dataset, self.engine.config.data
        dataset.cache, data.cache_samples = {}, True
        dataset.fill_cache(0)  # round 1's extra cost, outside the timed steps
        try:
            return self.real(0)
        finally:
            dataset.cache, data.cache_samples = None, False

    def in_memory(self, collator) -> Run:
        from qwen3vl_sft.train.engine import RoundTrainer, training_arguments

        self.reset(0)  # batches are ready: worker processes would only add start-up and IPC
        run = Run()
        with timed_trainers(run):
            trainer = RoundTrainer(
                model=self.engine.model, args=training_arguments(self.engine.config),
                train_dataset=self.samples, data_collator=collator,
            )  # fmt: skip
            output = trainer.train()
        run.samples, run.supervised_tokens = trainer.counters.samples, trainer.counters.supervised_tokens
        run.loss = float(output.training_loss)
        return run

    def variants(self) -> dict:
        return {
            f"real, workers={self.default_workers}": lambda: self.real(self.default_workers),
            "real, workers=1": lambda: self.real(1),
            "real, workers=0": lambda: self.real(0),
            "real, cache_samples": self.real_cached,
            "precomputed samples": lambda: self.in_memory(self.plain),
            "pre-collated batches": lambda: self.in_memory(self.cached),
        }


def run_interleaved(bench: Bench, repeats: int) -> dict[str, list[Run]]:
    variants = bench.variants()
    for fn in variants.values():
        fn()  # warm-up: lazy initialisation, allocator growth, and it fills the batch cache
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            runs[name].append(fn())
    return runs


def check_same_work(runs: dict[str, list[Run]]) -> None:
    """Sanity: every variant trained the same samples to the same loss (same batches, same order)."""
    every = [r for rs in runs.values() for r in rs]
    assert len({(r.samples, r.supervised_tokens) for r in every}) == 1, "variants trained different data"
    losses = [r.loss for r in every]
    assert max(losses) - min(losses) <= 1e-4 * max(1.0, abs(losses[0])), f"losses differ: {losses}"


def print_table(runs: dict[str, list[Run]], args, bench: Bench) -> None:
    import torch

    reference = min(r.step_time for r in runs["pre-collated batches"])
    steady_reference = min(r.steady_step_time for r in runs["pre-collated batches"])
    first = next(iter(runs.values()))[0]
    print(f"\ntiny Qwen3-VL, {args.steps} steps x batch {args.batch_size}, {first.samples} samples, "
          f"{first.supervised_tokens} supervised tokens per run, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}, cores {os.cpu_count()}")  # fmt: skip
    print(f"building all {len(bench.samples)} samples once, in-process: {bench.build_seconds:.2f} s "
          f"({1000 * bench.build_seconds / len(bench.samples):.1f} ms/sample)")  # fmt: skip
    header = (
        f"{'variant':<22} {'step ms':>8} {'samples/s':>10} {'sup tok/s':>10} {'ratio':>6}"
        f" {'steady ms':>10} {'ratio':>6}"
    )
    print(header + "\n" + "-" * len(header))
    for name, rs in runs.items():
        best = min(rs, key=lambda r: r.step_time)
        steady = min(r.steady_step_time for r in rs)
        seconds = best.step_time * len(best.step_ends)
        print(f"{name:<22} {1000 * best.step_time:>8.1f} {best.samples / seconds:>10.1f} "
              f"{best.supervised_tokens / seconds:>10.1f} {best.step_time / reference:>6.2f} "
              f"{1000 * steady:>10.1f} {steady / steady_reference:>6.2f}")  # fmt: skip
    print(f"step = mean over the run incl. the first batch's wait; steady = median step after the first; "
          f"ratio = / pre-collated (target <= {TARGET_RATIO:.2f}); loss {first.loss:.4f} in every run")  # fmt: skip


def profile_sample_building(bench: Bench, count: int) -> None:
    """Where the training process's time goes when it builds samples itself (workers=0)."""
    dataset = bench.engine.dataset
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(count):
        dataset[i % len(dataset)]
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    print(f"\ncProfile of building {count} samples (cumulative):\n{out.getvalue()}")


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        bench = Bench(args, *build_inputs(args, work), work)
        runs = run_interleaved(bench, args.repeats)
        check_same_work(runs)
        print_table(runs, args, bench)
        if args.profile:
            profile_sample_building(bench, args.steps * args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
