"""Qwen3-VL supervised fine-tuning, in-process: one function for a centralised run or one FL round.

    python -m qwen3vl_sft.train.engine --model_name_or_path tiny_models/qwen3-vl-tiny \\
        --data_path data/site-1/train.json --eval_data_path data/test.json --max_steps 200 \\
        --learning_rate 5e-4 --per_device_train_batch_size 16 --output_dir outputs/central

(``torchrun --nproc_per_node=K -m qwen3vl_sft.train.engine ...`` for several GPUs: HF Trainer does the DDP.)

Built on HF Trainer, so bf16, gradient accumulation, DDP, ``report_to`` and progress bars come from
the library; :class:`RoundTrainer` adds only what federated rounds need: one learning-rate schedule
across rounds, counts of samples / supervised tokens / skipped samples, and the abort when too many
images fail.

:class:`SFTEngine` keeps the model in memory between rounds (``keep_model_between_rounds``): reloading
a 2B checkpoint costs more than a short round. The optimizer is rebuilt each round: its moments
describe the site's previous local trajectory, which the new global model has left behind.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from ..config import DataConfig, ModelConfig, TrainConfig
from ..data.samples import Collator, build_dataset
from ..errors import DataError
from ..model.modeling import load_model, load_processor, resolve_dtype
from ..model.weights import exchanged_state, load_exchanged

logger = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Everything one fine-tuning run needs: the model, data and training flags, parsed once (the input
    of :class:`SFTEngine` and of the official backend)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RoundResult:
    """What a round produces: the exchanged tensors and honest metrics about the work done."""

    weights: dict[str, torch.Tensor]
    metrics: dict[str, float]
    # The exchanged tensors the round started from, when they differ from the received global (the
    # official backend trains from a copy written in the checkpoint's dtype); None = the received one.
    start: dict[str, torch.Tensor] | None = None


@dataclass
class RoundCounters:
    samples: int = 0
    supervised_tokens: int = 0
    skipped: int = 0
    dropped: int = 0

    def reduce(self) -> RoundCounters:
        """Sum over DDP ranks (each rank saw its own share of the batches)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        counts = torch.tensor(
            [self.samples, self.supervised_tokens, self.skipped, self.dropped], dtype=torch.long
        )
        if torch.distributed.get_backend() == "nccl":
            counts = counts.cuda()
        torch.distributed.all_reduce(counts)
        return RoundCounters(*[int(c) for c in counts.tolist()])


class RoundTrainer(Trainer):
    """HF Trainer plus the cross-round schedule and the sample counters."""

    def __init__(self, *args, round_index: int = 0, num_rounds: int = 1, max_bad_fraction: float = 1.0, **kw):
        super().__init__(*args, **kw)
        self.round_index, self.num_rounds = round_index, num_rounds
        self.max_bad_fraction = max_bad_fraction
        self.counters = RoundCounters()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """One schedule over ``num_rounds`` rounds, entered at this round's offset."""
        if self.lr_scheduler is None and self.num_rounds > 1:
            total = num_training_steps * self.num_rounds
            offset = num_training_steps * self.round_index
            super().create_scheduler(total, optimizer)
            shape = self.lr_scheduler.lr_lambdas[0]
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda step: shape(step + offset)
            )
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.counters.skipped += int(inputs.pop("num_skipped", 0))
        self.counters.dropped += int(inputs.pop("num_dropped", 0))
        self._check_bad_fraction()
        if "input_ids" not in inputs:  # every sample of this micro-batch was skipped
            return torch.zeros((), device=self.args.device)
        self.counters.samples += inputs["input_ids"].shape[0]
        self.counters.supervised_tokens += int((inputs["labels"] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def _check_bad_fraction(self, min_seen: int = 20) -> None:
        """Abort once enough samples were seen (mid-round) or at the end of the round (min_seen=1),
        when the share of defective images is above max_bad_sample_fraction beyond sampling noise."""
        seen = self.counters.samples + self.counters.skipped
        if seen >= min_seen and bad_share_lower_bound(self.counters.skipped, seen) > self.max_bad_fraction:
            raise DataError(
                f"{self.counters.skipped} of {seen} samples had defective images (more than "
                f"max_bad_sample_fraction {self.max_bad_fraction} beyond sampling noise; see the 'Skipping "
                "sample' warnings); fix the data or the image_root"
            )


def bad_share_lower_bound(bad: int, seen: int, z: float = 3.0) -> float:
    """Wilson score lower bound (z standard errors) of the share of defective samples.

    A round draws its samples at random, so a shard with 3 % broken images shows 2 of the first 20
    (10 %) by chance; comparing that raw share with a 5 % limit aborted healthy rounds (measured on
    field-shaped data). The bound exceeds the limit only when the data really hold more: an image root
    that is gone (every sample bad) aborts after the first 20 samples; 25 % bad does too.
    """
    if seen <= 0 or bad <= 0:
        return 0.0
    share, z2 = bad / seen, z * z
    centre = share + z2 / (2 * seen)
    margin = z * math.sqrt(share * (1 - share) / seen + z2 / (4 * seen * seen))
    return max(0.0, (centre - margin) / (1 + z2 / seen))


def rank_and_world() -> tuple[int, int]:
    """This process's rank and world size: the process group's once one exists, else torchrun's
    environment (``RANK``, ``WORLD_SIZE``; read before the group is created), else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


TORCHRUN_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_WORLD_SIZE",
)


def leave_single_process_torchrun() -> None:
    """Under ``torchrun --nproc_per_node=1`` run as a plain process.

    accelerate treats any torchrun launch as distributed and wraps the model in DDP over gloo even
    for one process; with three CPU sites on two cores that made each step 5x slower (measured:
    30 steps 32-38 s vs 7-8 s). One process needs no process group, so drop the launcher's variables.
    """
    if os.environ.get("WORLD_SIZE") == "1" and not torch.distributed.is_initialized():
        for name in TORCHRUN_VARS:
            os.environ.pop(name, None)


def training_arguments(config: RunConfig) -> TrainingArguments:
    """Map our TrainConfig onto HF TrainingArguments (nothing is checkpointed mid-round)."""
    t, cuda = config.train, torch.cuda.is_available()
    dtype = resolve_dtype(config.model.dtype, cuda)
    return TrainingArguments(
        output_dir=t.output_dir,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the schedule in transformers 5
        lr_scheduler_type=t.lr_scheduler_type,
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        seed=t.seed,
        logging_steps=t.logging_steps,
        report_to=[] if t.report_to == "none" else t.report_to.split(","),
        save_strategy="no",
        # Autocast in the checkpoint's low dtype over fp32 trained weights (fp32_master_weights), also on
        # CPU; fp16 needs the grad scaler, which exists on CUDA only and refuses fp16 weights.
        bf16=dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16 and config.model.fp32_master_weights,
        use_cpu=not cuda,
        remove_unused_columns=False,
        # Cached samples are ready: workers would only add start-up and transfer costs.
        dataloader_num_workers=0 if config.data.cache_samples else config.data.dataloader_num_workers,
        activation_checkpointing=config.model.gradient_checkpointing,
        ddp_find_unused_parameters=False,
        disable_tqdm=t.disable_progress_bar,
    )


class SFTEngine:
    """A loaded model + processor + site data set that can run rounds of SFT."""

    def __init__(self, config: RunConfig, callbacks: tuple = ()):
        self.config = config
        self.callbacks = list(callbacks)  # HF TrainerCallbacks for every round (fl.console's progress)
        if config.train.torch_threads > 0:
            torch.set_num_threads(config.train.torch_threads)
        leave_single_process_torchrun()
        start = time.monotonic()
        # The model first: it checks the checkpoint is Qwen3-VL (ModelError naming the flag); a
        # processor load from another model's directory failed with an obscure AttributeError.
        self.model = load_model(config.model)
        self.processor = load_processor(
            config.model.model_name_or_path, config.data, config.model.trust_remote_code
        )
        if config.model.gradient_checkpointing and config.model.lora:
            self.model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need grad inputs
        self.dataset = build_dataset(self.processor, config.data)
        self.dataset.fill_cache(config.data.dataloader_num_workers)
        self.load_seconds = time.monotonic() - start

    def apply(self, weights: dict[str, torch.Tensor]) -> None:
        """Load received (exchanged) tensors, strictly by name."""
        load_exchanged(self.model, weights)

    def weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The trained tensors on CPU, in the model's dtype (fp32 with fp32 master weights) by default."""
        return exchanged_state(self.model, dtype)

    def train_round(self, round_index: int = 0, num_rounds: int = 1) -> RoundResult:
        """One round of SFT on the site's data; returns the trainable tensors and the round's metrics."""
        config = self.config
        rounds = num_rounds if config.train.schedule_over_rounds else 1
        trainer = RoundTrainer(
            model=self.model,
            args=training_arguments(config),
            train_dataset=self.dataset,
            data_collator=Collator(self.processor.tokenizer.pad_token_id),
            round_index=round_index if rounds > 1 else 0,
            num_rounds=rounds,
            max_bad_fraction=config.data.max_bad_sample_fraction,
            callbacks=self.callbacks,
        )
        start = time.monotonic()
        output = trainer.train()
        seconds = time.monotonic() - start
        trainer._check_bad_fraction(min_seen=1)
        counts = trainer.counters.reduce()
        if counts.samples == 0:
            raise DataError(
                f"round {round_index}: no sample could be trained on ({counts.dropped} had no answer left)"
            )
        metrics = {
            "train_loss": float(output.training_loss),
            "steps": int(output.global_step),
            "samples": counts.samples,
            "supervised_tokens": counts.supervised_tokens,
            "skipped_samples": counts.skipped,
            "dropped_samples": counts.dropped,
            "seconds": seconds,
            "samples_per_second": counts.samples / seconds if seconds > 0 else 0.0,
            "learning_rate_end": float(trainer.lr_scheduler.get_last_lr()[0]),
        }
        if not math.isfinite(metrics["train_loss"]):
            raise FloatingPointError(f"training loss is {metrics['train_loss']} in round {round_index}")
        return RoundResult(weights=self.weights(), metrics=metrics)


def train(
    config: RunConfig, initial_weights: dict[str, torch.Tensor] | None = None, **round_kw
) -> RoundResult:
    """Load, optionally apply ``initial_weights`` (exchanged tensors), train one round/run, return the result."""
    engine = SFTEngine(config)
    if initial_weights is not None:
        engine.apply(initial_weights)
    return engine.train_round(**round_kw)


def main(argv: list[str] | None = None) -> dict:
    """Train one round on ``--data_path``; print, and return, ``{"train": metrics, "eval": scores}``
    (``eval`` only with ``--eval_data_path``)."""
    from ..config import check_data_flags, check_model_flags, parse
    from ..eval.evaluate import evaluate_file

    model_cfg, data_cfg, train_cfg = parse((ModelConfig, DataConfig, TrainConfig), argv, description=__doc__)
    try:
        check_data_flags(data_cfg)
        check_model_flags(model_cfg)
    except DataError as err:
        sys.exit(f"error: {err}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    engine = SFTEngine(RunConfig(model_cfg, data_cfg, train_cfg))
    result = engine.train_round()
    results = {"train": result.metrics}
    if data_cfg.eval_data_path:
        results["eval"] = evaluate_file(engine.model, engine.processor, data_cfg, data_cfg.eval_data_path)
    for name, values in results.items():
        print(f"{name}:", {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()})
    if train_cfg.save_model and rank_and_world()[0] == 0:
        engine.model.save_pretrained(train_cfg.output_dir)
        engine.processor.save_pretrained(train_cfg.output_dir)
        print(f"Model saved to {train_cfg.output_dir}")
    return results


if __name__ == "__main__":
    main()
