"""Train each round with the official Qwen3-VL fine-tuning code (a clone of QwenLM/Qwen3-VL).

    QWEN3VL_ROOT=~/src/Qwen3-VL python -m qwen3vl_sft.train.official \\
        --qwen3vl_python ~/envs/qwen3vl/bin/python --model_name_or_path Qwen/Qwen3-VL-2B-Instruct \\
        --data_path data/site-1/train.json --max_steps 20 --nproc_per_node 2

runs one round through the clone's ``qwenvl/train/train_qwen.py`` and prints its metrics.

:class:`OfficialBackend` has the round interface of :class:`qwen3vl_sft.train.engine.SFTEngine`. Each round:

1. empties ``<work_dir>/qwen3vl_checkpoints/`` (upstream resumes from any ``checkpoint-*`` it finds in
   its output_dir, so nothing from an earlier round may survive);
2. writes the base checkpoint's config, tokenizer and processor files plus its safetensors, with the
   received tensors merged in, to a directory whose *name* makes upstream load the right class (it
   decides from the path: no "qwen3" loads Qwen2-VL, a last component with the letter "a" loads MoE);
3. runs the clone's ``train()`` (through :mod:`qwen3vl_sft.train.official_launch`, which registers the site's
   data set in the clone's ``data_dict`` at run time; the clone is never edited), either in a child
   process per round under ``torch.distributed.run`` with the Python of the environment built for the
   clone, or in this process when this interpreter can import the clone;
4. reads the trained tensors back from the safetensors files upstream saved (no model is loaded) and
   the loss from its ``trainer_state.json``.

The clone pins transformers 4.57 / torch 2.6 and imports flash-attn at module level; see
``docs/official_backend.md`` for the environment it needs.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..config import DataConfig, replace
from ..data.samples import resolve_image_root
from ..model.checkpoints import base_model_dir, read_tensors, safetensors_shards, write_merged_shards
from ..model.modeling import resolve_attention
from ..model.weights import WeightsError, checkpoint_name, exchanged_names, meta_model, require_weights
from . import official_launch
from .engine import TORCHRUN_VARS, RoundResult, RunConfig, rank_and_world

logger = logging.getLogger(__name__)

ROOT_ENV, PYTHON_ENV = "QWEN3VL_ROOT", "QWEN3VL_PYTHON"
ENTRY = Path("qwenvl", "train", "train_qwen.py")
WORK_SUBDIR, LOG_SUBDIR = "qwen3vl_checkpoints", "qwen3vl_logs"
# Upstream picks the class from the path: "qwen3" in it -> Qwen3-VL; the letter "a" in the last
# component -> the MoE class (meant for names like Qwen3-VL-30B-A3B). So the dense name has no "a".
MODEL_DIR_NAMES = {"qwen3_vl": "qwen3-vl-dense", "qwen3_vl_moe": "qwen3-vl-moe-base"}
OUTPUT_DIR_NAME = "output"
# Set by the torchrun that may have started *this* process; the child's own torchrun must not see them.
_LAUNCHER_VARS = (*TORCHRUN_VARS, "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
# Variables that tie a Python to our environment; the clone's interpreter must not inherit them.
_PARENT_PYTHON_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")
_NON_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


class OfficialBackendError(RuntimeError):
    """The official backend cannot run as configured (one line: what is wrong and what to do)."""


# --------------------------------------------------------------------------- locating clone and python


def find_finetune_dir(root: str | None) -> Path:
    """The clone's ``qwen-vl-finetune`` folder, from ``root`` or ``$QWEN3VL_ROOT``."""
    root = root or os.environ.get(ROOT_ENV, "")
    if not root:
        raise OfficialBackendError(
            f"no Qwen3-VL clone given: set {ROOT_ENV} or pass --qwen3vl_root "
            "(a clone of https://github.com/QwenLM/Qwen3-VL)"
        )
    base = Path(root).expanduser().resolve()
    for candidate in (base / "qwen-vl-finetune", base):
        if (candidate / ENTRY).is_file() and (candidate / "qwenvl" / "data" / "__init__.py").is_file():
            return candidate
    raise OfficialBackendError(
        f"{ROOT_ENV} / --qwen3vl_root {root} is not a clone of QwenLM/Qwen3-VL "
        f"(no qwen-vl-finetune/{ENTRY.as_posix()} under it)"
    )


def resolve_python(python: str | None) -> str:
    """The interpreter that runs the clone: ``python``, ``$QWEN3VL_PYTHON`` or this one."""
    python = python or os.environ.get(PYTHON_ENV, "") or sys.executable
    found = python if os.sep in python else shutil.which(python)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise OfficialBackendError(f"--qwen3vl_python / {PYTHON_ENV} {python!r} is not an executable file")
    return os.path.abspath(found)


def is_current_python(python: str) -> bool:
    # Compared without resolving symlinks: every venv's python links to the same base interpreter, but
    # a different venv is a different environment.
    return os.path.abspath(python) == os.path.abspath(sys.executable)


# --------------------------------------------------------------------------- environment probe


@dataclass(frozen=True)
class Environment:
    """What the clone's Python offers (from :func:`qwen3vl_sft.train.official_launch.probe`)."""

    python: str
    current: bool
    versions: dict = field(default_factory=dict)
    cuda: bool = False
    flash_attn: bool = False
    flash_attn_stand_in: bool = False
    problems: tuple[str, ...] = ()

    def describe(self) -> str:
        v = self.versions
        return (
            f"{self.python} (torch {v.get('torch')}, transformers {v.get('transformers')}, "
            f"flash-attn {v.get('flash_attn') or 'absent'}{' (import-only stand-in)' if self.flash_attn_stand_in else ''}, "
            f"CUDA {'yes' if self.cuda else 'no'})"
        )

    @property
    def transformers_major(self) -> int:
        return int(str(self.versions.get("transformers") or "0").split(".")[0])


@functools.lru_cache(maxsize=16)
def probe_environment(python: str, finetune_dir: str) -> Environment:
    """Probe ``python`` for the clone (in this process when it is this interpreter), once per pair."""
    if is_current_python(python):
        report = official_launch.probe(finetune_dir)
    else:
        source = Path(official_launch.__file__).read_text(encoding="utf-8")
        # -c, not the file path: running a file inside our package would put the package folder (with
        # modules named data, train, config ...) first on the child's sys.path.
        done = subprocess.run(
            [python, "-c", source, "probe", finetune_dir],
            capture_output=True, text=True, timeout=600,
            env=child_environment(Path(finetune_dir)), cwd=finetune_dir,  # -c puts the cwd on sys.path
        )  # fmt: skip
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith(official_launch.PROBE_PREFIX)]
        if done.returncode != 0 or not lines:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise OfficialBackendError(f"cannot probe {python} for the Qwen3-VL clone: {last}")
        report = json.loads(lines[-1][len(official_launch.PROBE_PREFIX) :])
    return Environment(
        python=python,
        current=is_current_python(python),
        versions=report["versions"],
        cuda=report["cuda"],
        flash_attn=report["flash_attn"],
        flash_attn_stand_in=report.get("flash_attn_stand_in", False),
        problems=tuple(report["problems"]),
    )


def choose_mode(requested: str, env: Environment) -> tuple[str, str]:
    """``("in_process" | "subprocess", why)``; raises when the clone cannot run in ``env`` at all."""
    if env.problems:
        raise OfficialBackendError(
            f"the Qwen3-VL clone cannot run under {env.describe()}: {'; '.join(env.problems)}. "
            f"Build the environment it pins with `bash install_requirements.sh --official ENV_DIR` "
            f"(docs/official_backend.md) and pass ENV_DIR/bin/python with --qwen3vl_python or {PYTHON_ENV}"
        )
    if requested not in ("auto", "in_process", "subprocess"):
        raise OfficialBackendError(f"mode must be auto, in_process or subprocess, not {requested!r}")
    if requested == "in_process" and not env.current:
        raise OfficialBackendError(
            f"in_process mode needs the clone's python to be this one, not {env.python}"
        )
    if requested != "auto":
        return requested, "requested"
    if env.current:
        return "in_process", "the clone's imports all resolve in this interpreter"
    return "subprocess", f"the clone's environment is another interpreter ({env.python})"


# --------------------------------------------------------------------------- model directory


def local_checkpoint(model_name_or_path: str) -> Path:
    """The base checkpoint as a local directory with safetensors shards (a hub id through the HF cache)."""
    try:
        source = base_model_dir(model_name_or_path).resolve()
        safetensors_shards(source)
    except (OSError, ValueError) as err:
        raise OfficialBackendError(
            f"--model_name_or_path {model_name_or_path}: not a checkpoint directory with safetensors shards "
            f"and not downloadable ({err})"
        ) from err
    return source


def checkpoint_model_type(checkpoint: Path) -> str:
    model_type = json.loads((checkpoint / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_DIR_NAMES:
        raise OfficialBackendError(
            f"{checkpoint}: model_type {model_type!r}; the official backend trains Qwen3-VL "
            f"({' or '.join(MODEL_DIR_NAMES)})"
        )
    return model_type


def upstream_model_type(path: str | os.PathLike) -> str:
    """The model type upstream's ``train()`` loads for ``model_name_or_path=path`` (its path-name rule)."""
    text = str(path).lower()
    if "qwen3" in text:
        return "qwen3_vl_moe" if "a" in Path(str(path).rstrip("/")).name.lower() else "qwen3_vl"
    return "qwen2_5_vl" if "qwen2.5" in text else "qwen2_vl"


def model_dir_for(parent: Path, model_type: str) -> Path:
    """Where to write the round's input model so that upstream's path rule picks ``model_type``."""
    path = parent / MODEL_DIR_NAMES[model_type]
    if upstream_model_type(path) != model_type:
        raise OfficialBackendError(f"{path} would load as {upstream_model_type(path)}, not {model_type}")
    return path


def write_model_dir(source: Path, dest: Path, weights: Mapping[str, torch.Tensor]) -> None:
    """``source``'s config/tokenizer/processor files and safetensors, with ``weights`` (keyed by checkpoint
    name) merged in; untouched shards are symlinked (the round's input lives no longer than its base)."""
    dest.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(_NON_WEIGHT_SUFFIXES):
            shutil.copyfile(item, dest / item.name)
    write_merged_shards(source, dest, weights, link_unchanged=True)


def read_exchanged(output_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The exchanged tensors from the safetensors files in ``output_dir``, in their saved dtype, on CPU
    (no model load)."""
    found = read_tensors(sorted(output_dir.glob("*.safetensors")), {checkpoint_name(n): n for n in names})
    missing = [name for name in names if name not in found]
    if missing:
        raise OfficialBackendError(
            f"{output_dir}: the official trainer saved no {len(missing)} of the exchanged tensors "
            f"(e.g. {missing[:3]}); did it finish?"
        )
    return {name: found[name] for name in names}


# --------------------------------------------------------------------------- arguments, child, metrics


def _flag_value(value) -> str:
    return str(value) if not isinstance(value, bool) else ("True" if value else "False")


def upstream_arguments(
    config: RunConfig, model_dir: Path, output_dir: Path, dataset: str, env: Environment, attention: str
) -> list[str]:
    """Our config as the command line of upstream's HfArgumentParser (the names of its argument.py)."""
    m, d, t = config.model, config.data, config.train
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(
        m.dtype, "bf16" if m.dtype == "auto" and env.cuda else ""
    )
    args = {
        # ModelArguments
        "model_name_or_path": model_dir,
        "tune_mm_vision": m.tune_mm_vision,
        "tune_mm_mlp": m.tune_mm_mlp,
        "tune_mm_llm": m.tune_mm_llm,
        # DataArguments; upstream's flattened batches need flash attention (its train() asserts so)
        "dataset_use": dataset,
        "data_flatten": attention == "flash_attention_2",
        "max_pixels": d.max_pixels,
        "min_pixels": d.min_pixels,
        # TrainingArguments (HF's plus upstream's model_max_length)
        "output_dir": output_dir,
        "model_max_length": d.model_max_length,
        "dataloader_num_workers": d.dataloader_num_workers,
        "learning_rate": t.learning_rate,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "max_steps": t.max_steps,
        "num_train_epochs": t.num_train_epochs,
        # transformers 5 dropped --warmup_ratio; there a float warmup_steps below 1 is the ratio
        ("warmup_ratio" if env.transformers_major < 5 else "warmup_steps"): t.warmup_ratio,
        "lr_scheduler_type": t.lr_scheduler_type,
        "max_grad_norm": t.max_grad_norm,
        "weight_decay": t.weight_decay,
        "seed": t.seed,
        "logging_steps": t.logging_steps,
        "report_to": t.report_to,
        "disable_tqdm": t.disable_progress_bar,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        # no mid-round checkpoints: a checkpoint-* in output_dir is what upstream resumes from
        "save_strategy": "no",
    }
    if m.gradient_checkpointing:  # only when on: transformers 5 warns about the flag itself
        args["gradient_checkpointing"] = True
    return [item for key, value in args.items() for item in (f"--{key}", _flag_value(value))]


def child_environment(finetune_dir: Path) -> dict[str, str]:
    """The environment for the clone's interpreter: ours minus anything that points into our Python.

    NVFlare copies its whole ``sys.path`` (our site-packages included) into ``PYTHONPATH`` for every
    process it starts; passed on, that would make the clone's Python import our transformers 5 instead
    of its own 4.57. So the child's path is the clone's folders and nothing else.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and k not in _PARENT_PYTHON_VARS and not k.startswith("TORCHELASTIC_")
    }
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in official_launch.search_roots(finetune_dir))
    env["PYTHONUNBUFFERED"] = "1"  # lines reach our log as they are printed
    return env


def run_logged(command: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
    """Run ``command``, copying its output line by line to ``log_path`` and to our logger."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Starting: %s (log: %s)", " ".join(command), log_path)
    last = ""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        for line in proc.stdout:
            log.write(line)
            log.flush()
            logger.info("[qwen3vl] %s", line.rstrip())
            last = line.strip() or last
        code = proc.wait()
    if code != 0:
        from ..fl.watch import last_exception_line  # the rule that reads every site log ("[rank0]: ...")

        cause = last_exception_line(log_path) or last
        raise OfficialBackendError(
            f"official Qwen3-VL training failed (exit code {code}): {cause[:300]}; log: {log_path}"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def round_metrics(state_path: Path, seconds: float, global_batch: int, max_samples: float | None) -> dict:
    """Metrics from upstream's ``trainer_state.json`` (HF Trainer's own log of the run)."""
    if not state_path.is_file():
        raise OfficialBackendError(f"the official trainer wrote no {state_path}; did it finish?")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    history = state.get("log_history", [])
    final = next((entry for entry in reversed(history) if "train_loss" in entry), None)
    if final is None:
        raise OfficialBackendError(f"{state_path} holds no train_loss")
    loss, steps = float(final["train_loss"]), int(state["global_step"])
    if not math.isfinite(loss):
        raise FloatingPointError(f"official trainer's training loss is {loss}")
    if loss == 0.0 and steps:
        logger.warning(
            "train_loss is exactly 0.0: upstream supervised no token (tokenizer without Qwen's ids?)"
        )
    # Samples the optimizer steps consumed; in epoch mode at most the data set times the epochs.
    samples = steps * global_batch if max_samples is None else min(steps * global_batch, max_samples)
    metrics = {
        "train_loss": loss,
        "steps": steps,
        "samples": samples,
        "seconds": seconds,
        "samples_per_second": samples / seconds if seconds > 0 else 0.0,
        "train_runtime": float(final.get("train_runtime", seconds)),
    }
    logged = [entry for entry in history if "loss" in entry]
    if logged:
        metrics["train_loss_last"] = float(logged[-1]["loss"])
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    if rates:
        metrics["learning_rate_end"] = float(rates[-1])
    return metrics


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# --------------------------------------------------------------------------- the backend


def check_supported(config: RunConfig) -> list[str]:
    """Raise for settings upstream cannot honour; return notes on those it silently does not apply."""
    if config.model.lora:
        raise OfficialBackendError(
            "--lora with the official backend is not supported: upstream's train() creates new adapters "
            "every round and cannot start from the global adapter; use the builtin backend for LoRA"
        )
    if config.data.system_prompt:
        raise OfficialBackendError(
            "--system_prompt is not supported by the official backend (upstream has none)"
        )
    notes = []
    if config.train.schedule_over_rounds:
        notes.append("schedule_over_rounds (upstream restarts warm-up and cosine every round)")
    if config.data.max_bad_sample_fraction != DataConfig().max_bad_sample_fraction:
        notes.append("max_bad_sample_fraction (upstream retries other samples instead)")
    return notes


@dataclass
class RoundPaths:
    root: Path
    model: Path
    output: Path
    spec: Path
    launcher: Path
    log: Path


class OfficialBackend:
    """Rounds of SFT run by the official Qwen3-VL code; same round interface as ``SFTEngine``.

    Subprocess mode starts its own ``torchrun`` with ``nproc_per_node`` processes, so call
    :meth:`train_round` from one process. In-process mode runs inside the torchrun that started this
    process: every rank calls :meth:`train_round`, rank 0 writes the files, all ranks train.
    """

    def __init__(
        self,
        config: RunConfig,
        root: str | None = None,
        python: str | None = None,
        work_dir: str | os.PathLike | None = None,
        *,
        nproc_per_node: int = 1,
        master_port: int | None = None,
        mode: Literal["auto", "in_process", "subprocess"] = "auto",
        dataset_name: str = "site",
    ):
        notes = check_supported(config)
        if not dataset_name or any(c in dataset_name for c in ",%"):
            raise OfficialBackendError(
                f"dataset name {dataset_name!r}: must be non-empty, without ',' or '%'"
            )
        self.config, self.dataset_name = config, dataset_name
        self.finetune_dir = find_finetune_dir(root)
        self.env = probe_environment(resolve_python(python), str(self.finetune_dir))
        self.mode, why = choose_mode(mode, self.env)
        self.work_dir = Path(work_dir or os.getcwd()).resolve()
        self.nproc_per_node, self.master_port = nproc_per_node, master_port
        self.attention = resolve_attention(
            config.model.attn_implementation, self.env.cuda, self.env.flash_attn
        )
        logger.info(
            "Official Qwen3-VL backend: %s mode (%s); clone %s; environment %s; attention %s",
            self.mode.replace("_", "-"), why, self.finetune_dir, self.env.describe(), self.attention,
        )  # fmt: skip
        if notes:
            logger.warning("Not applied by the official Qwen3-VL code: %s", "; ".join(notes))
        self.annotation_path = Path(config.data.data_path).resolve()
        if not self.annotation_path.is_file():
            raise OfficialBackendError(f"--data_path {config.data.data_path}: no such file")
        self.image_root = resolve_image_root(config.data, self.annotation_path).resolve()
        self.source = local_checkpoint(config.model.model_name_or_path)
        self.model_type = checkpoint_model_type(self.source)
        model_config = replace(config.model, model_name_or_path=str(self.source))
        self.names = exchanged_names(meta_model(model_config))
        self._local: dict[str, torch.Tensor] = {}  # last round's result: the base for keys not received

    @property
    def checkpoints_dir(self) -> Path:
        return self.work_dir / WORK_SUBDIR

    def paths(self, round_index: int) -> RoundPaths:
        root = self.checkpoints_dir
        return RoundPaths(
            root=root,
            model=model_dir_for(root, self.model_type),
            output=root / OUTPUT_DIR_NAME,
            spec=root / "launch.json",
            launcher=root / "official_launch.py",
            log=self.work_dir / LOG_SUBDIR / f"round-{round_index}.log",
        )

    def train_round(
        self,
        initial_weights: Mapping[str, torch.Tensor] | None = None,
        round_index: int = 0,
        num_rounds: int = 1,
    ) -> RoundResult:
        """Train one round; returns the exchanged tensors (saved dtype, CPU) and the trainer's metrics.

        The round starts from the base checkpoint with the previous round's result and then
        ``initial_weights`` (exchanged names; a subset is fine) merged in.
        """
        rank, world = rank_and_world()
        if self.mode == "subprocess" and world > 1:
            raise OfficialBackendError(
                "subprocess mode starts its own torchrun: call it from one process only"
            )
        paths = self.paths(round_index)
        if rank == 0:
            self._prepare(paths, initial_weights)
        _barrier(world)
        start = time.monotonic()
        if self.mode == "subprocess":
            self._run_child(paths)
        else:
            official_launch.run_train(json.loads(paths.spec.read_text(encoding="utf-8")))
        seconds = time.monotonic() - start
        _barrier(world)
        weights = read_exchanged(paths.output, self.names)
        # The update is measured from what the clone started from (the received global as written to
        # the checkpoint's dtype), so that rounding on the way in is not sent back as a change.
        start = read_exchanged(paths.model, self.names)
        metrics = round_metrics(
            paths.output / "trainer_state.json", seconds, self._global_batch(world), self._max_samples()
        )
        self._local = weights
        logger.info("Round %d/%d (official): %s", round_index + 1, num_rounds, metrics)
        return RoundResult(weights=weights, metrics=metrics, start=start)

    def _prepare(self, paths: RoundPaths, initial_weights: Mapping[str, torch.Tensor] | None) -> None:
        """Empty the work dir and write the round's input model, launch spec and launcher."""
        if initial_weights is not None:
            require_weights(initial_weights)
        unknown = sorted(set(initial_weights or {}) - set(self.names))
        if unknown:
            raise WeightsError(
                f"{len(unknown)} received tensors are not exchanged by this model (e.g. {unknown[:3]})"
            )
        if paths.root.exists():
            shutil.rmtree(paths.root)  # a stale checkpoint-* would be resumed by upstream
        paths.root.mkdir(parents=True)
        weights = {**self._local, **(initial_weights or {})}
        write_model_dir(self.source, paths.model, {checkpoint_name(n): t for n, t in weights.items()})
        argv = upstream_arguments(
            self.config, paths.model, paths.output, self.dataset_name, self.env, self.attention
        )
        spec = {
            "finetune_dir": str(self.finetune_dir), "dataset_name": self.dataset_name,
            "annotation_path": str(self.annotation_path), "data_path": str(self.image_root),
            "attn_implementation": self.attention, "argv": argv,
        }  # fmt: skip
        paths.spec.write_text(json.dumps(spec, indent=1), encoding="utf-8")
        shutil.copyfile(official_launch.__file__, paths.launcher)

    def _run_child(self, paths: RoundPaths) -> None:
        # Always through torchrun, even for one process: upstream's train() calls
        # torch.distributed.get_rank(), which needs the process group torchrun's environment sets up.
        command = [
            self.env.python, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc_per_node),
            "--master_port", str(self.master_port or free_port()), str(paths.launcher), "train", str(paths.spec),
        ]  # fmt: skip
        run_logged(command, child_environment(self.finetune_dir), self.work_dir, paths.log)

    def _global_batch(self, world: int) -> int:
        t = self.config.train
        processes = self.nproc_per_node if self.mode == "subprocess" else world
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * processes

    @functools.cached_property
    def _record_count(self) -> int:
        from ..data.json_scan import load_records

        return len(load_records(self.annotation_path))

    def _max_samples(self) -> float | None:
        t = self.config.train
        return None if t.max_steps > 0 else self._record_count * t.num_train_epochs


# --------------------------------------------------------------------------- command line


def site_work_dir(work_dir: str, site: str) -> Path:
    """A site's own work folder: ``<work_dir or cwd>/<site>``.

    Always per site: with one folder for the job, co-located sites overwrote each other's launch.json
    and model, and every site trained on the last writer's data.
    """
    return Path(work_dir or os.getcwd()).expanduser().resolve() / site


def from_config(config: RunConfig, opts, site: str = "") -> OfficialBackend:
    """The backend described by a :class:`~qwen3vl_sft.config.BackendConfig`, for ``site`` if given."""
    return OfficialBackend(
        config,
        root=opts.qwen3vl_root or None,
        python=opts.qwen3vl_python or None,
        work_dir=site_work_dir(opts.work_dir, site) if site else (opts.work_dir or None),
        dataset_name=site or "site",
        nproc_per_node=opts.official_nproc_per_node,
        master_port=opts.official_master_port or None,
        mode=opts.official_mode,
    )


def main(argv: list[str] | None = None) -> None:
    from ..config import BackendConfig, ModelConfig, TrainConfig, parse

    model_cfg, data_cfg, train_cfg, opts = parse(
        (ModelConfig, DataConfig, TrainConfig, BackendConfig), argv, description=__doc__
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    backend = from_config(RunConfig(model_cfg, data_cfg, train_cfg), opts)
    result = backend.train_round()
    print("train:", {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()})
    print(f"Trained model (upstream's output): {backend.paths(0).output}")


if __name__ == "__main__":
    main()
