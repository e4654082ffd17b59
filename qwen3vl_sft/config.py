"""Config dataclasses: the single source of every command-line flag's default.

Settings that are not a flag's default live with their purpose: ``job.py --demo``'s overrides in
:mod:`qwen3vl_sft.demo` (applied only to flags left at their default), fixed evaluation settings (batch,
short-answer length) in :mod:`qwen3vl_sft.eval.evaluate` and :mod:`qwen3vl_sft.eval.metrics`, and the keyword defaults of functions the
tests and benchmarks call directly.

The same classes serve every entry point:

* ``python prepare_data.py``             -> :class:`PrepareDataConfig`
* ``python -m qwen3vl_sft.train.engine`` -> :class:`ModelConfig`, :class:`DataConfig`, :class:`TrainConfig`
* ``client.py`` (inside NVFlare)         -> :data:`SITE_CONFIGS` (those three, :class:`BackendConfig`,
  :class:`ExchangeConfig`), written by job.py with :func:`to_flags`
* ``python job.py``                      -> :data:`JOB_CONFIGS` (:class:`JobConfig` plus the site's)
* ``python run_inference.py``            -> :class:`InferenceConfig`

Command lines are generated from the fields with ``transformers.HfArgumentParser``; the help text of
each flag is the field's ``metadata["help"]``.

Defaults follow the official Qwen3-VL fine-tuning recipe (``qwen-vl-finetune/scripts/sft.sh``):
frozen vision tower, trained merger and language model, cosine schedule with 3 % warm-up, gradient
clipping at 1.0, no weight decay, 8192-token context, 784..50176 pixels per image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import DataError

DEFAULT_MODEL = "Qwen/Qwen3-VL-2B-Instruct"
DEFAULT_DATA_FILE = "PubMedVision/PubMedVision_InstructionTuning_VQA.json"
HF_DATASET_ID = "FreedomIntelligence/PubMedVision"
# Training and inference accept the same weight dtypes, resolved the same way (modeling.resolve_dtype).
DTypeName = Literal["auto", "bfloat16", "float16", "float32"]
DTYPE_HELP = "Weight dtype: auto = bfloat16 on CUDA, float32 on CPU."
# The seed README counted sites with --n_clients (job.py) and --num_clients (prepare_data.py); both
# scripts accept both, as aliases of the one name this package uses, --num_sites.
SITE_COUNT_ALIASES = ["--n_clients", "--num_clients"]


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (used by HfArgumentParser for ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PrepareDataConfig:
    """Options of ``prepare_data.py`` (sharding PubMedVision into per-site data sets)."""

    data_file: str = option(
        DEFAULT_DATA_FILE,
        "PubMedVision-format .json array or .jsonl. Pass '' to download --split_name from the HF Hub.",
    )
    split_name: str = option(
        "PubMedVision_InstructionTuning_VQA",
        "HF Hub config of FreedomIntelligence/PubMedVision used when --data_file is ''.",
    )
    image_root: str = option(
        "",
        "Directory that relative image paths are resolved against (default: the data file's folder). "
        "Records whose images are missing are dropped and counted.",
    )
    output_dir: str = option("./data", "Where site-*/train.json, test.json and manifest.json are written.")
    num_sites: int = option(3, "Number of sites (site-1 .. site-N).", aliases=SITE_COUNT_ALIASES)
    subset_size: int | None = option(
        None, "Cap on training records per site (default: no cap); val.json shrinks in proportion."
    )
    split: Literal["iid", "modality", "body_part", "dirichlet"] = option(
        "iid", "How records are spread over sites: iid, by modality, by body_part, or Dirichlet."
    )
    alpha: float = option(0.5, "Dirichlet concentration for --split dirichlet (smaller = more skewed).")
    dirichlet_key: Literal["modality", "body_part"] = option(
        "body_part", "Record field whose label distribution --split dirichlet skews."
    )
    val_fraction: float = option(0.1, "Fraction of each site's records held out as site-N/val.json.")
    test_fraction: float = option(0.05, "Fraction of all records held out as the global test.json.")
    seed: int = option(42, "Seed of the shuffle and of the split.")
    extract_images: bool = option(
        True, "Extract images_*.zip archives next to the data file into images/ when images/ is missing."
    )
    check_images: bool = option(
        True,
        "Drop records whose image files are missing under --image_root. false = only check that paths "
        "stay inside it (to prepare shards on a machine without the images).",
    )
    num_workers: int = option(
        0, "Processes that read the data file in parallel (0 = one per CPU core, at most 4)."
    )


@dataclass
class ModelConfig:
    """Which checkpoint to fine-tune and which of its parts are trained."""

    model_name_or_path: str = option(
        DEFAULT_MODEL, "HF model id or local directory of a Qwen3-VL checkpoint."
    )
    tune_mm_vision: bool = option(False, "Train the vision tower (recipe: False).")
    tune_mm_mlp: bool = option(True, "Train the vision-language merger and deepstack mergers (recipe: True).")
    tune_mm_llm: bool = option(True, "Train the language model and its embeddings (recipe: True).")
    lora: bool = option(
        False, "Train LoRA adapters (PEFT) instead of full weights; only adapters are exchanged."
    )
    lora_r: int = option(64, "LoRA rank.")
    lora_alpha: int = option(128, "LoRA alpha.")
    lora_dropout: float = option(0.05, "LoRA dropout.")
    lora_target_modules: str = option(
        "q_proj,k_proj,v_proj,o_proj", "Comma-separated module names LoRA wraps."
    )
    dtype: DTypeName = option("auto", DTYPE_HELP)
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = option(
        "auto", "auto = flash_attention_2 when flash-attn is importable and CUDA is present, else sdpa."
    )
    fp32_master_weights: bool = option(
        True,
        "Keep trained weights in fp32 when --dtype is bfloat16/float16 (compute in that dtype through "
        "autocast; frozen weights stay in it). false = train the weights in --dtype itself: 8 instead of "
        "16 bytes per trained parameter, but each step's change below half a bf16 step of a weight is "
        "lost (measured: eval loss 5.86 vs 4.83 after 150 steps at lr 1e-5; docs/exchange.md).",
    )
    gradient_checkpointing: bool = option(
        False, "Trade compute for memory (recommended for 2B+ on 24 GB GPUs)."
    )
    trust_remote_code: bool = option(
        False, "Allow code shipped with the checkpoint to run. Off unless you need it."
    )

    def lora_targets(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


@dataclass
class DataConfig:
    """Where a site's data lives and how samples are turned into model inputs."""

    data_path: str = option(
        "./data/site-1/train.json", "Training records (PubMedVision format, .json or .jsonl)."
    )
    eval_data_path: str = option("", "Validation records evaluated before training (default: none).")
    image_root: str = option("", "Directory image paths are relative to (default: the data file's folder).")
    model_max_length: int = option(
        8192, "Maximum tokens per sample; longer samples are truncated between turns."
    )
    max_pixels: int = option(
        50176, "Upper bound on pixels per image after resizing (recipe: 50176 = 224*224)."
    )
    min_pixels: int = option(784, "Lower bound on pixels per image after resizing (recipe: 784 = 28*28).")
    max_bad_sample_fraction: float = option(
        0.05,
        "Abort the round when more than this fraction of samples has a defective image (missing, empty, "
        "not an image, truncated, too large, aspect ratio beyond 200:1, outside the image root), beyond "
        "sampling noise: the Wilson lower bound (3 standard errors) of the share seen must exceed it.",
    )
    max_image_side: int = option(
        16384,
        "Images whose width or height exceeds this are skipped, refused from the file header before "
        "decoding (see also --max_image_pixels).",
    )
    max_image_pixels: int = option(
        50_000_000,
        "Images with more pixels (width x height) than this are skipped, refused from the file header "
        "before decoding (a 12000x12000 PNG took 2.6 GB and 10 s to decode and resize). The default, "
        "50 M (e.g. 8000x6250), is far above real PubMedVision images (a few thousand pixels a side).",
    )
    dataloader_num_workers: int = option(2, "Worker processes that load and resize images.")
    cache_samples: bool = option(
        False,
        "Build every sample once and keep it in memory across rounds (about 1.2 MB per 224x224 image): "
        "for small shards and CPU runs, where building samples costs as much as training on them.",
    )
    system_prompt: str = option("", "Optional system message prepended to every conversation.")
    val_generate_samples: int = option(
        32,
        "Validation generates an answer for every record whose answer is short (<= 4 words: exact-match "
        "accuracy) and for at most this many long-answer records (ROUGE-L, token F1); 0 = none. "
        "Generating paragraphs is what makes validation slow; the loss covers every record.",
    )
    val_max_new_tokens: int = option(128, "Maximum tokens of a generated long validation answer.")


@dataclass
class TrainConfig:
    """Optimisation settings (handed to HF Trainer)."""

    output_dir: str = option("./outputs/sft", "Where checkpoints and logs of a centralised run are written.")
    learning_rate: float = option(1e-5, "Peak learning rate.")
    per_device_train_batch_size: int = option(4, "Samples per device per step.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    max_steps: int = option(-1, "Optimizer steps per round (or per run); -1 = one pass over the data.")
    num_train_epochs: float = option(1.0, "Epochs per round when --max_steps is -1.")
    warmup_ratio: float = option(0.03, "Fraction of the schedule spent warming up (recipe: 0.03).")
    lr_scheduler_type: str = option("cosine", "HF scheduler name (recipe: cosine).")
    max_grad_norm: float = option(1.0, "Gradient clipping (recipe: 1.0).")
    weight_decay: float = option(0.0, "AdamW weight decay (recipe: 0.0).")
    schedule_over_rounds: bool = option(
        True,
        "One learning-rate schedule spans all federated rounds (warm-up once, cosine to the last round) "
        "instead of restarting each round.",
    )
    seed: int = option(42, "Seed of sampling order, dropout and initialisation of LoRA adapters.")
    logging_steps: int = option(10, "Log the loss every N steps.")
    report_to: str = option("none", "HF Trainer report_to (none, tensorboard, wandb).")
    save_model: bool = option(True, "Centralised runs: save the final model (HF directory) into output_dir.")
    keep_model_between_rounds: bool = option(
        True, "Federated runs: keep the loaded model in memory between rounds instead of reloading it."
    )
    disable_progress_bar: bool = option(False, "Hide the per-step progress bar.")
    torch_threads: int = option(
        0, "CPU threads per process (0 = torch's default); job.py splits the cores between sites."
    )


@dataclass
class JobConfig:
    """Options of job.py: the federated job around the engine."""

    num_sites: int = option(3, "Number of sites (site-1 .. site-N).", aliases=SITE_COUNT_ALIASES)
    num_rounds: int = option(3, "FedAvg rounds.")
    data_dir: str = option("./data", "Folder with site-*/train.json (from prepare_data.py).")
    gpu: str = option(
        "", "GPU groups per site for the simulator, e.g. '[0],[1],[2]'; empty = one GPU per site."
    )
    nproc_per_client: int = option(1, "Processes (GPUs) per site, started with torchrun.")
    master_port_base: int = option(29500, "torchrun --master_port of site-1; site-i uses base + i - 1.")
    min_sites: int = option(
        0, "Sites that must answer each round (0 = all sites).", aliases=["--min_clients"]
    )
    server_disk_offload: bool = option(
        True,
        "The server streams each site's result into temporary files and FedAvg reads it back one tensor at a "
        "time (NVFlare's tensor disk offload): about one message less RAM per site arriving at once, a "
        "message of disk per site and round.",
    )
    workspace: str = option("/tmp/nvflare/qwen3vl_fedavg", "NVFlare workspace root.")
    job_name: str = option("qwen3-vl-fedavg", "NVFlare job name.")
    env: Literal["sim", "poc", "prod"] = option(
        "sim",
        "sim = NVFlare simulator; poc = real server and clients on this machine (PoC); prod = submit to a "
        "provisioned deployment through --startup_kit (docs/production.md).",
    )
    startup_kit: str = option(
        "",
        "--env prod: the admin's startup kit folder from 'nvflare provision' (holds startup/fed_admin.json). "
        "Paths in the job are the sites' (absolute, or $VAR / ~ expanded on each site).",
    )
    export_dir: str = option(
        "", "Write the job folder for 'nvflare job submit' here instead of running it.", aliases=["--export"]
    )
    resume: bool = option(False, "Continue a stopped job from its last saved global model.")
    wandb: bool = option(False, "Also track with Weights & Biases (offline unless WANDB_API_KEY is set).")
    demo: bool = option(
        False, "CPU demo: tiny model and synthetic data built offline, then the federated job."
    )
    verbose: bool = option(
        False,
        "Print NVFlare's and the sites' full log stream instead of the job's live view (logs go to "
        "their files either way).",
    )


@dataclass
class ExchangeConfig:
    """What crosses the network each round, both ways (qwen3vl_sft.fl.exchange, docs/exchange.md)."""

    exchange: Literal["update", "weights"] = option(
        "update",
        "update = sites send trained - received (fp32 arithmetic), the server keeps an fp32 master global "
        "and sends sites its change since the global they hold; weights = bf16 weights both ways "
        "(NVFlare's example: an update below half a bf16 step of its weight is rounded away).",
    )
    compression: Literal["none", "bf16", "int8", "nf4"] = option(
        "int8",
        "Codec of the changes sent each way with --exchange update: none (fp32), bf16, int8 or nf4 "
        "(4-bit NormalFloat), blockwise absmax over 64 elements. Bytes per element: 4 / 2 / 1.06 / 0.53.",
    )
    error_feedback: bool = option(
        True, "Add what compression lost from a site's update to its next round's update."
    )


@dataclass
class BackendConfig:
    """Which trainer runs a site's rounds: this package's engine or the official Qwen3-VL code."""

    backend: Literal["builtin", "official"] = option(
        "builtin",
        "builtin = this package's in-process engine; official = train() of a QwenLM/Qwen3-VL clone.",
    )
    qwen3vl_root: str = option("", "Clone of QwenLM/Qwen3-VL for --backend official (or env QWEN3VL_ROOT).")
    qwen3vl_python: str = option("", "Python of the environment built for the clone (or env QWEN3VL_PYTHON).")
    work_dir: str = option(
        "",
        "Official backend: each site works in <work_dir>/<site>/ (default work_dir: the site's current dir).",
    )
    official_nproc_per_node: int = option(1, "Processes (GPUs) the official backend's child torchrun starts.")
    official_master_port: int = option(
        0,
        "The child torchrun's --master_port (0: a free port; job.py gives site N this + N - 1, "
        "from --master_port_base + 100 when 0).",
    )
    official_mode: Literal["auto", "in_process", "subprocess"] = option(
        "auto", "auto = in-process when this python can run the clone, else a child process per round."
    )


def check_data_flags(data: DataConfig) -> None:
    """Refuse DataConfig values no site could train or validate with (DataError: one line naming the
    flag). Shared by job.py, the training CLI and run_inference.py, so each refuses them up front."""
    problems = [
        (data.model_max_length < 1, f"--model_max_length must be >= 1, got {data.model_max_length}"),
        (data.min_pixels < 1, f"--min_pixels must be >= 1, got {data.min_pixels}"),
        (data.max_pixels < data.min_pixels, f"--max_pixels {data.max_pixels} is below --min_pixels {data.min_pixels}"),
        (not 0 <= data.max_bad_sample_fraction <= 1,
         f"--max_bad_sample_fraction must be in [0, 1], got {data.max_bad_sample_fraction}"),
        (data.max_image_side < 1, f"--max_image_side must be >= 1, got {data.max_image_side}"),
        (data.max_image_pixels < 1, f"--max_image_pixels must be >= 1, got {data.max_image_pixels}"),
        (data.dataloader_num_workers < 0, f"--dataloader_num_workers must be >= 0, got {data.dataloader_num_workers}"),
        (data.val_generate_samples < 0, f"--val_generate_samples must be >= 0, got {data.val_generate_samples}"),
        (data.val_max_new_tokens < 1, f"--val_max_new_tokens must be >= 1, got {data.val_max_new_tokens}"),
    ]  # fmt: skip
    refuse(problems)


def check_model_flags(model: ModelConfig) -> None:
    """Refuse ModelConfig values that cannot work (DataError naming the flag)."""
    problems = [
        (model.lora and model.lora_r < 1, f"--lora_r must be >= 1, got {model.lora_r}"),
        (model.lora and model.lora_alpha <= 0, f"--lora_alpha must be > 0, got {model.lora_alpha}"),
        (model.lora and not 0 <= model.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {model.lora_dropout}"),
        (model.lora and not model.lora_targets(), "--lora_target_modules names no module"),
    ]  # fmt: skip
    refuse(problems)


# Fields that name files or folders on the machine that reads them: a site (data, model, clone) or
# the server (model). job.py may pass them as $VAR or ~ for each machine to expand (site_local_paths).
SITE_LOCAL_FIELDS = ("model_name_or_path", "data_path", "eval_data_path", "image_root", "qwen3vl_root",
                     "qwen3vl_python", "work_dir")  # fmt: skip


def is_site_local(path: str) -> bool:
    """Whether ``path`` is left for the machine that reads it to expand ($VAR, ${VAR}, ~)."""
    return path.startswith(("$", "~"))


def site_local_paths(cfg: Any) -> Any:
    """``cfg`` with $VAR and ~ in its path fields expanded on this machine; a variable this machine
    lacks is named in a DataError (the job was built for sites that set it)."""
    import os

    changes = {}
    for name in SITE_LOCAL_FIELDS:
        value = getattr(cfg, name, "")
        if not (isinstance(value, str) and is_site_local(value)):
            continue
        expanded = os.path.expandvars(os.path.expanduser(value))
        if "$" in expanded:
            raise DataError(f"--{name} {value}: the variable is not set on this machine; set it in the "
                            "environment that starts this party, or pass the path itself")  # fmt: skip
        changes[name] = expanded
    return dataclasses.replace(cfg, **changes) if changes else cfg


def refuse(problems: list[tuple[bool, str]]) -> None:
    """DataError with the message of the first (condition, message) pair whose condition holds."""
    for failed, message in problems:
        if failed:
            raise DataError(message)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that ignores keys the dataclass does not have."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in names})


def with_defaults(cfg: Any, values: dict[str, Any]) -> Any:
    """``cfg`` with ``values`` in the fields still at their dataclass default: a script's own defaults
    (the demo's, an experiment's) that explicit flags still override."""
    defaults = type(cfg)()
    changes = {k: v for k, v in values.items() if getattr(cfg, k) == getattr(defaults, k)}
    return dataclasses.replace(cfg, **changes)


# The job -> site contract: client.py parses SITE_CONFIGS from the flags job.py writes with to_flags.
SITE_CONFIGS = (ModelConfig, DataConfig, TrainConfig, BackendConfig, ExchangeConfig)
JOB_CONFIGS = (JobConfig, *SITE_CONFIGS)  # job.py's command line


def to_flags(*configs: Any) -> list[str]:
    """Command-line flags that make HfArgumentParser rebuild ``configs`` exactly.

    Only fields that differ from their defaults are written, so command lines stay short and a
    default changed here reaches every site.
    """
    flags: list[str] = []
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value == default:
                continue
            if isinstance(value, bool):
                flags += [f"--{f.name}", "true" if value else "false"]
            elif value is None:
                continue
            else:
                flags += [f"--{f.name}", str(value)]
    return flags


def parse(config_classes: tuple[type, ...], args: list[str] | None = None, description: str = "") -> tuple:
    """Parse a command line into instances of ``config_classes`` (help texts come from the fields)."""
    import argparse

    from transformers import HfArgumentParser

    # Raw description: module docstrings carry runnable commands, one per line.
    parser = HfArgumentParser(
        config_classes, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)


@dataclass
class InferenceConfig:
    """Options of ``run_inference.py``: which checkpoints answer which held-out records, and the report."""

    model: list[str] = option(
        [],
        "Checkpoint(s) to compare, as LABEL=PATH (or PATH; label = its name). Repeatable or space-separated. "
        "PATH: HF id or directory, an NVFlare FL_global_model.pt (full or LoRA), or a LoRA adapter directory.",
        action="extend",
    )
    model_path: str = option("", "The fine-tuned checkpoint (seed flag), compared as 'fine-tuned'.")
    base_model: str = option(
        "",
        "Architecture and processor for .pt files and adapters, and the 'base' row. Default: the base "
        "recorded in the checkpoint (.pt meta, adapter_config.json, fl_checkpoint.json of the server's HF "
        "directories); a checkpoint that records none is evaluated alone (a .pt or adapter then needs it).",
    )
    compare_base: bool = option(True, "Also evaluate the base model, as the row labelled 'base'.")
    data_file: str = option(
        "./data/test.json", "Held-out PubMedVision-format records (prepare_data.py's test.json)."
    )
    image_root: str = option("", "Directory image paths are relative to (default: as for training).")
    max_samples: int = option(
        200, "Evaluate the first N usable records (0 = all); records with a defective image are skipped."
    )
    max_image_side: int = option(
        DataConfig.max_image_side, "As for training: images with a longer side are skipped."
    )
    max_image_pixels: int = option(
        DataConfig.max_image_pixels, "As for training: images with more pixels are skipped (from the header)."
    )
    max_new_tokens: int = option(256, "Maximum tokens per generated answer.")
    batch_size: int = option(8, "Samples per generation / loss batch (left-padded for generation).")
    device: str = option("auto", "auto = cuda when available, else cpu; or any torch device string.")
    dtype: DTypeName = option("auto", DTYPE_HELP)
    do_sample: bool = option(False, "Sample instead of greedy decoding (greedy is deterministic).")
    temperature: float = option(0.7, "Sampling temperature (with --do_sample).")
    top_p: float = option(0.9, "Nucleus sampling threshold (with --do_sample).")
    seed: int = option(42, "Seed for --do_sample.")
    lora_alpha: int | None = option(
        None, "LoRA alpha of a .pt without meta (default: ModelConfig's lora_alpha, what training used)."
    )
    show_samples: int = option(
        -1, "Print the first N samples' answers (-1 = all, 0 = none); all go to answers.jsonl."
    )
    output_dir: str = option(
        "./outputs/inference", "Where report.json/.csv/.png and answers.jsonl are written."
    )
    trust_remote_code: bool = option(False, "Allow code shipped with a checkpoint to run.")
    progress: bool = option(True, "Show a progress bar per checkpoint.")
