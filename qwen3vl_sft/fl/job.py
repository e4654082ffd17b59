"""The FedAvg job: NVFlare 2.9 recipe, per-site torchrun commands, environments, running it.

Resuming is :mod:`.resume`'s (which checkpoint, how many rounds are done); the end-of-job report is
:mod:`.summary`'s.

Used by job.py (``python job.py --help``). One recipe serves the simulator (``--env sim``), PoC
(``--env poc``: a real server and clients as separate processes) and production (``--export_dir``: a
self-contained job folder for ``nvflare job submit``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import (
    BackendConfig,
    DataConfig,
    ExchangeConfig,
    JobConfig,
    ModelConfig,
    TrainConfig,
    check_data_flags,
    check_model_flags,
    is_site_local,
    to_flags,
)
from ..errors import DataError, UsageError
from ..fileio import check_writable
from .resume import completed_rounds, resume_checkpoint
from .watch import ending_a_hung_simulator, failure_line, read_failure

if TYPE_CHECKING:
    from .summary import Summary

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # qwen3vl_sft/, shipped whole to every app
REPO_DIR = PACKAGE_DIR.parent
# Sized for a 2B model (3.5 GB per message) on ordinary links; NVFlare 2.9 reads exactly these keys.
LARGE_MODEL_TIMEOUTS = {
    "get_task_timeout": 1800,
    "submit_task_result_timeout": 1800,
    "tensor_min_download_timeout": 1800,
    "tensor_streaming_per_request_timeout": 600,
    "streaming_idle_timeout": 1800,
}
# The key metric every data set has: PubMedVision's answers are paragraphs, so accuracy (exact match on
# short answers) is often undefined, while the teacher-forced answer loss always exists.
KEY_METRIC, KEY_METRIC_MODE = "val_loss", "min"
MAX_PORT = 65535
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
SITE_EXIT_SECONDS = 30.0  # NVFlare's own session-control timeout (nvflare.client.cell.defs)


def site_names(num_sites: int) -> list[str]:
    if num_sites <= 0:
        raise UsageError(f"--num_sites must be at least 1, got {num_sites}")
    return [f"site-{i}" for i in range(1, num_sites + 1)]


def check_job(job: JobConfig, model: ModelConfig, data: DataConfig, train: TrainConfig) -> None:
    """Refuse, in one line naming the flag, values the job could only fail on later (inside NVFlare)."""
    site_names(job.num_sites)
    check_data_flags(data)
    check_model_flags(model)
    at_least_one = {"--num_rounds": job.num_rounds, "--nproc_per_client": job.nproc_per_client,
                    "--per_device_train_batch_size": train.per_device_train_batch_size,
                    "--gradient_accumulation_steps": train.gradient_accumulation_steps}  # fmt: skip
    for flag, value in at_least_one.items():
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if not 0 <= job.min_sites <= job.num_sites:
        raise UsageError(f"--min_sites must be between 0 (all sites) and --num_sites {job.num_sites}, "
                        f"got {job.min_sites}")  # fmt: skip
    if not 1024 <= job.master_port_base <= MAX_PORT - job.num_sites:
        raise UsageError(
            f"--master_port_base must be in 1024..{MAX_PORT - job.num_sites}, got {job.master_port_base}"
        )
    if train.max_steps == 0 or train.max_steps < -1:
        raise UsageError(
            f"--max_steps must be a positive step count or -1 (one epoch), got {train.max_steps}"
        )
    if train.max_steps == -1 and train.num_train_epochs <= 0:
        raise UsageError(
            f"--num_train_epochs must be > 0 when --max_steps is -1, got {train.num_train_epochs}"
        )
    if not train.learning_rate > 0:
        raise UsageError(f"--learning_rate must be > 0, got {train.learning_rate}")
    if job.gpu:
        gpu_groups(job, 0)  # the syntax and group count; GPU ids are the machine's to check
    if job.export_dir:
        check_writable(job.export_dir, "--export_dir")
    else:
        check_writable(job.workspace, "--workspace")  # prod: where the job's result is fetched to
    if job.env == "poc" and not job.export_dir:
        check_poc_server_port()
    if job.env == "prod" and not job.export_dir:
        if not job.startup_kit:
            raise UsageError(
                "--env prod needs --startup_kit: the admin's startup kit folder from 'nvflare provision'"
            )
        from .prod import admin_user

        admin_user(job.startup_kit)  # the kit's admin config is readable
        if job.gpu:
            raise UsageError("--gpu is for this machine's sites (sim, PoC); with --env prod a site's GPUs are the "
                            "CUDA_VISIBLE_DEVICES of the environment that starts its kit")  # fmt: skip


def gpu_groups(job: JobConfig, cuda_devices: int) -> list[list[int]] | None:
    """GPU ids per site from ``--gpu "[0],[1],[2]"`` (validated); default one GPU per site on CUDA."""
    if not job.gpu:
        if cuda_devices == 0:
            return None
        return [
            list(range(i * job.nproc_per_client, (i + 1) * job.nproc_per_client))
            for i in range(job.num_sites)
        ]
    if not re.fullmatch(r"\s*\[\s*\d+(\s*,\s*\d+)*\s*\](\s*,\s*\[\s*\d+(\s*,\s*\d+)*\s*\])*\s*", job.gpu):
        raise UsageError(
            f'--gpu {job.gpu!r} is malformed: use one bracketed list per site, e.g. "[0],[1],[2]"'
        )
    groups = [[int(x) for x in g.split(",")] for g in re.findall(r"\[([^\]]*)\]", job.gpu)]
    if len(groups) != job.num_sites:
        raise UsageError(f"--gpu {job.gpu!r} has {len(groups)} groups but --num_sites is {job.num_sites}")
    if any(len(g) != job.nproc_per_client for g in groups):
        raise UsageError(
            f"--gpu {job.gpu!r}: each group needs --nproc_per_client={job.nproc_per_client} GPUs"
        )
    return groups


def runs_elsewhere(job: JobConfig) -> bool:
    """Whether the sites run on machines of their own (an exported job, a provisioned deployment): their
    ports, cores and paths are theirs to check, not this machine's."""
    return bool(job.export_dir) or job.env == "prod"


def local_path(path: str) -> Path:
    """``path`` as this machine reads it: $VAR and ~ expanded, absolute. abspath, not resolve(): a venv's
    bin/python is a symlink whose target is another environment."""
    return Path(os.path.abspath(os.path.expandvars(os.path.expanduser(path))))


def job_path(path: str, job: JobConfig, flag: str) -> Path:
    """A path flag as the sites will read it: absolute (resolved here, where the user typed it), or
    with $VAR / ~ left for each site to expand when the job runs on other machines."""
    if is_site_local(path) and runs_elsewhere(job):
        return Path(path)
    local = local_path(path)
    if runs_elsewhere(job) and not local.exists() and not Path(path).is_absolute():
        raise DataError(f"{flag} {path} is relative and not on this machine: pass the path the sites read "
                        "(absolute, or $VAR that each site sets)")  # fmt: skip
    return local


def site_data(data: DataConfig, job: JobConfig, site: str) -> DataConfig:
    """The site's DataConfig: its shard, its validation file, paths as the site reads them. Checked here
    unless the sites run elsewhere and the folder is not on this machine (each site checks at start)."""
    data_dir = job_path(job.data_dir, job, "--data_dir")
    train, val = data_dir / site / "train.json", data_dir / site / "val.json"
    image_root = str(job_path(data.image_root, job, "--image_root")) if data.image_root else ""
    site_data_config = dataclasses.replace(
        data, data_path=str(train), eval_data_path=str(val), image_root=image_root
    )
    if runs_elsewhere(job) and not data_dir.is_dir():
        return site_data_config  # a site without val.json skips validation (fl.client.check_site_paths)
    if not train.is_file():
        raise DataError(
            f"{train} does not exist: run prepare_data.py --num_sites N --output_dir {data_dir} first"
        )
    from ..data.samples import resolve_image_root

    # --image_root or the shards' manifest: a missing root is named now
    resolve_image_root(site_data_config, train)
    return dataclasses.replace(site_data_config, eval_data_path=str(val) if val.is_file() else "")


def port_is_free(port: int, reuse_address: bool = False) -> bool:
    """Whether a TCP server (torchrun's rendezvous store) could listen on ``port`` on this machine.
    ``reuse_address``: as a server that sets SO_REUSEADDR does, a port whose only users are connections
    of a server that has ended (TIME_WAIT) counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse_address:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))  # all interfaces, as torchrun's store binds
        except OSError:
            return False
    return True


def poc_server_port() -> int:
    """The port PoC's server listens on (for sites and admin alike): NVFlare's fixed default."""
    from nvflare.tool.poc.poc_commands import POC_DEFAULT_FED_LEARN_PORT

    return POC_DEFAULT_FED_LEARN_PORT


def check_poc_server_port() -> None:
    """Refuse PoC while another process (another PoC, an NVFlare server) holds its server's port: the job's
    admin would reach that server instead (a certificate error after 10 s, a traceback) while its own
    server retries the bind forever, its processes left running."""
    port = poc_server_port()
    # asyncio's servers (NVFlare's) set SO_REUSEADDR: the TIME_WAIT connections a PoC that just ended
    # leaves on the port do not stop a new one
    if not port_is_free(port, reuse_address=True):
        raise DataError(f"--env poc: port {port}, where NVFlare PoC's server listens, is in use on this machine "
                        "(another PoC or NVFlare server?): stop that, or use --env sim")  # fmt: skip


def free_ports(wanted: list[int], flag: str, check: bool) -> list[int]:
    """``wanted`` with each busy port replaced by the next free one above it (one line says so).

    Sites of a simulator or PoC run share this machine, so a port another process listens on would
    kill a site's torchrun at start (EADDRINUSE). ``check`` is off for exported jobs: they run elsewhere.
    """
    if max(wanted) > MAX_PORT:
        raise DataError(
            f"{flag}: the sites need ports {wanted[0]}..{wanted[-1]}, beyond {MAX_PORT}; pass a lower {flag}"
        )
    chosen: list[int] = []
    for port in wanted:
        candidate = port
        while check and (candidate in chosen or not port_is_free(candidate)):
            candidate += 1
            if candidate > MAX_PORT:
                raise DataError(f"{flag}: no free TCP port from {port} up; pass a lower {flag}")
        if candidate != port:
            print(f"{flag}: port {port} is in use on this machine; using {candidate} instead")
        chosen.append(candidate)
    low, high = ephemeral_ports()
    if check and any(low <= port <= high for port in chosen):
        # The OS hands out this range to bind(0) (the simulator's server ports) and to every connection;
        # NVFlare's cell listeners (a site's, for its trainer) pick random ports from 1025 up, anywhere.
        print(f"note: {flag}: ports {chosen[0]}..{chosen[-1]} are in this machine's ephemeral range "
              f"({low}-{high}), where the OS hands NVFlare ports after this check; one could take a site's "
              f"port (its torchrun then ends with EADDRINUSE). A {flag} below {low} makes that rare.")  # fmt: skip
    return chosen


def ephemeral_ports() -> tuple[int, int]:
    """The range the OS hands out for bind(0) and outgoing connections (Linux's default if unreadable)."""
    try:
        low, high = map(int, EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def master_ports(job: JobConfig) -> list[int]:
    """torchrun --master_port of each site: unique, from --master_port_base, free on this machine."""
    wanted = [job.master_port_base + i for i in range(job.num_sites)]
    return free_ports(wanted, "--master_port_base", check=not runs_elsewhere(job))


def launch_command(job: JobConfig, port: int, backend: BackendConfig) -> str:
    """torchrun for one site; a unique --master_port per site so co-located sites never collide.

    The official backend starts its own torchrun per round, so its client runs as one process.
    """
    # Elsewhere, torchrun is the one on the site's PATH; here, this interpreter's (its environment).
    runner = (
        "torchrun" if runs_elsewhere(job) else f"{shlex.quote(sys.executable)} -u -m torch.distributed.run"
    )
    nproc = 1 if backend.backend == "official" else job.nproc_per_client
    return f"{runner} --nproc_per_node={nproc} --master_port={port}"


def site_backends(job: JobConfig, backend: BackendConfig, taken: list[int]) -> list[BackendConfig]:
    """The backend flags of each site: the official backend's child torchrun gets a port of its own
    per site, counted from --official_master_port or --master_port_base + 100 (and not in ``taken``)."""
    if backend.backend != "official":
        return [backend] * job.num_sites
    backend = dataclasses.replace(backend, **absolute_backend_paths(backend, job))
    base = backend.official_master_port or job.master_port_base + 100
    wanted = [base + i for i in range(job.num_sites)]
    ports = free_ports(wanted, "--official_master_port", check=not runs_elsewhere(job))
    if set(ports) & set(taken):
        raise DataError(
            f"--official_master_port {base}: its ports {ports} overlap the sites' --master_port {taken}; "
            "pass another --official_master_port"
        )
    return [
        dataclasses.replace(backend, official_nproc_per_node=job.nproc_per_client, official_master_port=port)
        for port in ports
    ]


def absolute_backend_paths(backend: BackendConfig, job: JobConfig) -> dict[str, str]:
    """The clone, its python and the work dir as the sites read them (see job_path)."""
    paths = {"qwen3vl_root": backend.qwen3vl_root, "work_dir": backend.work_dir}
    if os.sep in backend.qwen3vl_python:  # a bare command name is looked up on each site's PATH
        paths["qwen3vl_python"] = backend.qwen3vl_python
    return {k: str(job_path(v, job, f"--{k}")) for k, v in paths.items() if v}


def absolute_model_path(model: ModelConfig, job: JobConfig) -> ModelConfig:
    """A local model folder made absolute; a hub id, or a $VAR / ~ path of other machines, as given."""
    path = model.model_name_or_path
    if is_site_local(path) and runs_elsewhere(job):
        return model
    local = local_path(path)
    return dataclasses.replace(model, model_name_or_path=str(local)) if local.is_dir() else model


def check_model(model: ModelConfig, job: JobConfig) -> None:
    """Refuse a --model_name_or_path that is no folder here and no hub id, or a local folder that is not
    Qwen3-VL, before the job starts, in one line: started, the job would fail inside NVFlare's server with a
    traceback. Hub ids are checked where they load; paths of other machines (--export_dir, prod) there."""
    path = model.model_name_or_path
    if not os.path.isdir(path):
        if not runs_elsewhere(job) and not is_hub_id(path):
            raise DataError(f"--model_name_or_path {path}: no such directory, and not a hub id (name or "
                            "org/name); pass a Qwen3-VL directory or hub id (offline: build one with "
                            "python -m qwen3vl_sft.model.tiny --output DIR)")  # fmt: skip
        return
    from ..model.modeling import ModelError, model_class

    try:
        model_class(model.model_name_or_path, model.trust_remote_code)
    except ModelError as err:
        raise DataError(str(err)) from err


def is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def stage_package() -> str:
    """A folder holding ``qwen3vl_sft/``: NVFlare copies a folder's *contents* into the app's custom/,
    so this is how the package lands there as a package (the job folder then runs anywhere)."""
    stage = Path(tempfile.mkdtemp(prefix="qwen3vl_job_files_"))
    atexit.register(shutil.rmtree, stage, True)
    shutil.copytree(
        PACKAGE_DIR, stage / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return str(stage)


def cpu_threads_per_site(job: JobConfig) -> int:
    """On a CPU-only machine running every site locally, share the cores instead of oversubscribing."""
    import torch

    if torch.cuda.is_available() or runs_elsewhere(job):
        return 0
    return max(1, (os.cpu_count() or 1) // (job.num_sites * job.nproc_per_client))


def _recipe_class():
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    class ResumableFedAvgRecipe(FedAvgRecipe):
        """FedAvgRecipe whose controller can start at a later round (``--resume``)."""

        def __init__(self, *, start_round: int = 0, **kwargs):
            self._start_round = start_round  # read by _get_controller_kwargs during super().__init__
            super().__init__(**kwargs)

        def _get_controller_kwargs(self):
            # ignore_result_error: a crashed site is left out of the round instead of aborting the job;
            # the persistor enforces --min_sites on what was actually aggregated.
            return {
                **super()._get_controller_kwargs(),
                "start_round": self._start_round,
                "ignore_result_error": True,
            }

        def _create_controller(self, *args, **kwargs):
            from .server import SharedGlobalFedAvg

            controller = super()._create_controller(*args, **kwargs)
            # The recipe builds its FedAvg from a dozen of its settings; the subclass has the same
            # constructor and state, so re-typing that object keeps every setting without repeating them.
            controller.__class__ = SharedGlobalFedAvg
            return controller

    return ResumableFedAvgRecipe


def build_recipe(
    job: JobConfig,
    model: ModelConfig,
    data: DataConfig,
    train: TrainConfig,
    backend: BackendConfig | None = None,
    exchange: ExchangeConfig | None = None,
    site_script: str | os.PathLike | None = None,
):
    """The FedAvg recipe with per-site commands, timeouts, tracking, failure watch, the update exchange
    and the lean persistor. ``site_script`` replaces client.py (a benchmark's site, same flags)."""
    from nvflare.recipe.utils import add_experiment_tracking, set_per_site_config

    check_job(job, model, data, train)
    model = absolute_model_path(model, job)
    check_model(model, job)
    checkpoint = resume_checkpoint(job)
    start_round = completed_rounds(checkpoint)
    if start_round >= job.num_rounds:
        raise DataError(
            f"--resume: all {job.num_rounds} rounds are done already (last checkpoint {checkpoint})"
        )
    exchange = exchange or ExchangeConfig()
    per_site = site_configs(job, model, data, train, backend or BackendConfig(), exchange)
    recipe = _recipe_class()(
        start_round=start_round,
        name=job.job_name,
        min_clients=job.num_sites,  # NVFlare samples this many sites per round: all of them
        num_rounds=job.num_rounds - start_round,
        train_script=str(site_script or REPO_DIR / "client.py"),  # absolute: job.py runs from any folder
        launch_external_process=True,
        server_expected_format="pytorch",
        key_metric=KEY_METRIC,
        key_metric_mode=KEY_METRIC_MODE,
        model_persistor=global_model_persistor(job, model, checkpoint, exchange),
        # NVFlare 2.9's simulator configures the offload on its parent cell while the job's own cell receives
        # the results; RoundMemoryRelease applies it to the job cell too, so it works there as in PoC.
        enable_tensor_disk_offload=job.server_disk_offload,
        server_memory_gc_rounds=1,  # gc + malloc_trim each round: held memory back to ~1x the model
        # At the end NVFlare sends each site's trainer SHUTDOWN, then waits this long for it to leave on its
        # own before it SIGTERMs the process group. NVFlare's default, 0, SIGTERMs at once, and torchrun
        # answers a SIGTERM with a SignalException traceback at every normal end. The site's loop leaves as
        # soon as SHUTDOWN arrives (flare.is_running() turns False); the process exits in seconds.
        shutdown_timeout=SITE_EXIT_SECONDS,
    )
    set_per_site_config(recipe, per_site)
    staged = stage_package()
    recipe.add_server_file(staged)
    recipe.add_server_file(str(REPO_DIR / "model.py"))
    recipe.add_client_file(staged)
    if checkpoint and runs_elsewhere(job):
        recipe.add_server_file(checkpoint)  # the server's own machine has no copy of this file: it travels
    recipe.add_client_config(dict(LARGE_MODEL_TIMEOUTS))
    recipe.add_server_config(dict(LARGE_MODEL_TIMEOUTS))
    add_failure_watch(recipe)
    add_update_exchange(recipe, exchange)
    add_experiment_tracking(recipe, "tensorboard")
    add_console_events(recipe)
    add_memory_release(recipe, job, exchange)
    if job.wandb:
        add_experiment_tracking(recipe, "wandb", wandb_tracking_config())
    return recipe


def global_model_persistor(
    job: JobConfig, model: ModelConfig, checkpoint: str | None, exchange: ExchangeConfig
):
    from .server import GlobalModelPersistor

    return GlobalModelPersistor(
        model_config=dataclasses.asdict(model),
        fp32_master=exchange.exchange == "update",
        min_sites=job.min_sites or job.num_sites,
        model={"path": "model.Qwen3VLGlobalModel", "args": {"model_config": dataclasses.asdict(model)}},
        # Elsewhere, the checkpoint travels with the job: a relative name, which NVFlare's persistor looks
        # up in the server app's custom/ folder (build_recipe adds the file there).
        source_ckpt_file_full_name=os.path.basename(checkpoint)
        if checkpoint and runs_elsewhere(job)
        else checkpoint,
        key_metric=KEY_METRIC,  # the best model by the same metric NVFlare's model selector tracks
        key_mode=KEY_METRIC_MODE,
    )


def site_configs(
    job: JobConfig,
    model: ModelConfig,
    data: DataConfig,
    train: TrainConfig,
    backend: BackendConfig,
    exchange: ExchangeConfig,
) -> dict[str, dict]:
    """Per site: its client.py flags (absolute paths) and its torchrun command (a free --master_port)."""
    train_site = dataclasses.replace(
        train,
        output_dir="qwen3vl_outputs",
        report_to="none",
        torch_threads=train.torch_threads or cpu_threads_per_site(job),
    )
    ports = master_ports(job)
    backends = site_backends(job, backend, ports)
    per_site, validated = {}, 0
    for site, port, site_backend in zip(site_names(job.num_sites), ports, backends, strict=True):
        site_data_config = site_data(data, job, site)
        validated += bool(site_data_config.eval_data_path)
        flags = to_flags(model, site_data_config, train_site, site_backend, exchange)
        per_site[site] = {"train_args": shlex.join(flags), "command": launch_command(job, port, backend)}
    if runs_elsewhere(job) and not job_path(job.data_dir, job, "--data_dir").is_dir():
        print(f"note: --data_dir {job.data_dir} is not on this machine: each site needs its "
              "<data_dir>/<site>/train.json (and val.json to validate); a site checks at start")  # fmt: skip
    elif not validated:
        print(f"note: no site has a val.json under {job.data_dir}: no val_loss is reported, so no best global "
              "model is kept (prepare_data.py --val_fraction > 0 writes one)")  # fmt: skip
    return per_site


def add_failure_watch(recipe) -> None:
    """Sites report fatal errors to the server, which ends the job with the reason (see fl.watch)."""
    from .watch import JobFailureRecorder, SiteFailureReporter

    recipe.add_server_input_filter(JobFailureRecorder(), tasks=["train"])
    # Recipes have no public call for a plain client component; NVFlare's own add_experiment_tracking
    # uses this one, which keeps the per-site apps set_per_site_config made.
    recipe._add_to_client_apps(SiteFailureReporter(), id="site_failure_reporter")


def add_console_events(recipe) -> None:
    """The server writes what job.py's live view shows (qwen3vl_sft.fl.console): the sites' progress and
    metrics arrive over the tracking channel add_experiment_tracking set up, results through a filter."""
    from .console import ConsoleRecorder, ConsoleResultFilter

    # Recipes have no public call for a plain server component; add_experiment_tracking adds its receiver so.
    recipe._job.to_server(ConsoleRecorder(), id="console_recorder")
    recipe.add_server_input_filter(ConsoleResultFilter(), tasks=["train"])


def add_memory_release(recipe, job: JobConfig, exchange: ExchangeConfig) -> None:
    """The server frees each received result once FedAvg has added it up, and each sent global once it
    is replaced (with full weights: once every site has downloaded it)."""
    from .server import RoundMemoryRelease

    release = RoundMemoryRelease(num_sites=job.num_sites if exchange.exchange == "weights" else 0)
    # Recipes have no public call for a plain server component (see add_console_events).
    recipe._job.to_server(release, id="round_memory_release")


def add_update_exchange(recipe, exchange: ExchangeConfig) -> None:
    """With --exchange update: the server codes the global it sends and decodes the updates it gets
    (qwen3vl_sft.fl.exchange); FedAvg itself averages the fp32 differences and applies them."""
    if exchange.exchange != "update":
        return
    from .exchange import GlobalEncoder, UpdateDecoder

    recipe.add_server_output_filter(GlobalEncoder(compression=exchange.compression), tasks=["train"])
    recipe.add_server_input_filter(UpdateDecoder(), tasks=["train"])


def wandb_tracking_config() -> dict:
    """WandB receiver settings; offline unless the server has WANDB_API_KEY (never written into the job)."""
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    args = {"name": "qwen3-vl-fedavg", "project": "nvflare", "group": "nvidia", "job_type": "training"}
    return {"mode": mode, "wandb_args": args}


def exported_job_folder(job: JobConfig) -> str:
    """The folder ``recipe.export`` wrote the job into (what ``nvflare job submit -j`` takes)."""
    return str(Path(job.export_dir).resolve() / job.job_name)


def submit_command(job: JobConfig) -> str:
    """``nvflare job submit`` for the exported job folder, with the admin kit when --startup_kit names one."""
    args = ["nvflare", "job", "submit", "-j", exported_job_folder(job)]
    if job.startup_kit:
        args += ["--startup-kit", str(Path(job.startup_kit).resolve())]
    return shlex.join(args)


def poc_workspace(job: JobConfig) -> str:
    return str(Path(job.workspace).resolve() / "poc")


def prod_result_root(job: JobConfig) -> Path:
    """Where --env prod fetches each run's result to (as <job id>/): under --workspace, like the others."""
    return Path(job.workspace).resolve() / job.job_name


def search_folder(job: JobConfig) -> Path:
    """The folder a run's logs and result appear under on this machine."""
    if job.env == "poc":
        return Path(poc_workspace(job))
    return prod_result_root(job) if job.env == "prod" else Path(job.workspace) / job.job_name


def execution_env(job: JobConfig, cuda_devices: int):
    from nvflare.recipe.sim_env import SimEnv

    if job.env == "prod":  # each site's GPUs are its own: CUDA_VISIBLE_DEVICES of the party it started
        from .prod import prod_deployment

        return prod_deployment(job.startup_kit, str(prod_result_root(job)))
    groups = gpu_groups(job, cuda_devices)
    if job.env == "poc":
        gpu_ids = sorted({g for group in groups for g in group}) if groups else None
        # NVFlare reads the PoC folder from this variable first: without it, PoC runs share /tmp/nvflare/poc
        # (or whatever ~/.nvflare/config.conf names) with every other user and job on the machine.
        os.environ["NVFLARE_POC_WORKSPACE"] = poc_workspace(job)
        if job.verbose:
            from nvflare.recipe.poc_env import PocEnv

            return PocEnv(num_clients=job.num_sites, gpu_ids=gpu_ids)
        from .prod import quiet_poc

        return quiet_poc(num_clients=job.num_sites, gpu_ids=gpu_ids)
    gpu_config = ",".join("[" + ",".join(map(str, g)) + "]" for g in groups) if groups else None
    return SimEnv(
        num_clients=job.num_sites,
        clients=site_names(job.num_sites),
        num_threads=job.num_sites,
        gpu_config=gpu_config,
        workspace_root=job.workspace,
        log_config=None if job.verbose else files_only_log_config(),
    )


def files_only_log_config() -> str:
    """NVFlare's own logging config minus its console handler: every log file stays as it is, the
    terminal is left to job.py's view. The simulator applies it to the server and each site's process,
    and a site's trainer output is relayed into that process's log, so it reaches the files only too."""
    from nvflare.fuel.utils import log_utils

    config = json.loads((Path(log_utils.__file__).parent / "log_config.json").read_text())
    root = config["loggers"]["root"]
    root["handlers"] = [h for h in root["handlers"] if h != "consoleHandler"]
    fd, path = tempfile.mkstemp(prefix="qwen3vl_log_config_", suffix=".json")
    atexit.register(os.unlink, path)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    return path


class JobFailed(RuntimeError):
    """The federated job stopped before its last round; the message is the reason, in one line."""


class JobDetached(KeyboardInterrupt):
    """Ctrl-C while following a job on a deployment: the job goes on there; the message says how to reach it."""


def job_result(job: JobConfig, env, run) -> str | None:
    """The finished job's result folder."""
    if job.env == "sim":
        # The simulator has ended when recipe.run returns. Run.get_result would also ask SimEnv for a job
        # status, which it does not keep, and SimEnv prints a note on the console saying so.
        return env.get_job_result(run.get_job_id())
    # PoC: wait for the job's end, and keep its workspace (server and site logs, the job's result folder).
    return run.get_result(clean_up=False)


def run_job(job: JobConfig, recipe, cuda_devices: int, image_root: str = "") -> Summary:
    """Run the recipe in the simulator, PoC or a deployment; the summary, or JobFailed with the reason."""
    if job.env == "prod":
        return run_prod_job(job, recipe, image_root)
    env = execution_env(job, cuda_devices)
    search_dir = search_folder(job)
    try:
        with (
            noticing_ctrl_c() as interrupted,
            job_console(job, search_dir, getattr(recipe, "_start_round", 0)),
            ending_a_hung_simulator(search_dir) if job.env == "sim" else contextlib.nullcontext(),
        ):
            run = recipe.run(env)  # the simulator returns when the job has ended, PoC once it is submitted
            result_dir = job_result(job, env, run)
    except RuntimeError as err:
        if interrupted:  # NVFlare's simulator turns Ctrl-C into "failed with return code -9"
            raise KeyboardInterrupt from None
        if not str(err).startswith("Simulation failed"):
            raise  # not the simulator's report of a failed job: a bug, shown as one
        raise JobFailed(failure_message(search_dir, str(err).splitlines()[0])) from None
    reason = failure_message(result_dir or search_dir)
    if reason:  # the server stopped the job, yet the run reported no failure (PoC does so)
        raise JobFailed(reason)
    if not result_dir and job.env == "poc":
        raise JobFailed(f"the PoC job returned no result; see the logs under {search_dir}")
    from .summary import summarize

    return summarize(job, result_dir, image_root)


def run_prod_job(job: JobConfig, recipe, image_root: str = "") -> Summary:
    """Submit through the admin's kit, follow the job to its end, fetch its result under --workspace."""
    from .prod import COMPLETED, nvflare_command

    print(f"Federated job {job.job_name}: {job.num_sites} sites, {job.num_rounds} rounds on the deployment of "
          f"{Path(job.startup_kit).resolve()}; logs: each party's <kit>/log.txt and <kit>/<job id>/log.txt")  # fmt: skip
    try:
        run = recipe.run(execution_env(job, 0))  # submits; the deployment runs it
    except RuntimeError as err:  # ProdEnv's "Failed to submit job via Flare API: ..."
        raise JobFailed(f"{' '.join(str(err).split())} (is the server up? check with: nvflare system status "
                        f"--startup-kit {Path(job.startup_kit).resolve()})") from None  # fmt: skip
    job_id = run.get_job_id()
    try:
        result_dir = run.get_result()  # follows the job to its end, then downloads
    except KeyboardInterrupt:
        raise JobDetached(f"job.py: stopped following; job {job_id} goes on in the deployment. Follow it: "
                          f"{nvflare_command('monitor', job_id, job.startup_kit)}; stop it: "
                          f"{nvflare_command('abort', job_id, job.startup_kit)}") from None  # fmt: skip
    reason = failure_message(result_dir) if result_dir else ""
    if reason:
        raise JobFailed(reason)
    status = run.get_status()  # cached by get_result at the job's end
    if status != COMPLETED or not result_dir:
        raise JobFailed(f"job {job_id} ended {status or 'without a status'} and "
                        f"{'its result is in ' + result_dir if result_dir else 'no result came back'}; "
                        "see the server's <kit>/" + job_id + "/log.txt")  # fmt: skip
    from .summary import summarize

    return summarize(job, result_dir, image_root)


@contextlib.contextmanager
def job_console(job: JobConfig, search_dir: Path, start_round: int):
    """The job's live view (a terminal) or its plain event lines while the block runs; with --verbose,
    nothing: NVFlare's own stream is on the console then."""
    if job.verbose:
        yield
        return
    from .console_view import ConsoleRunner, JobView

    where = "the NVFlare simulator" if job.env == "sim" else "NVFlare PoC"
    print(f"Federated job {job.job_name}: {job.num_sites} sites, {job.num_rounds} rounds in {where} "
          "(--verbose prints NVFlare's full log stream)")  # fmt: skip
    # PoC provisions its kits, each with its log.txt, under <poc workspace>/<project>/prod_00.
    kits = f"{search_dir}/<project>/prod_00" if job.env == "poc" else str(search_dir)
    print(f"Logs: server {kits}/server/log.txt; sites {kits}/site-N/log.txt "
          "(training: site-N/**/qwen3vl_client.log)")  # fmt: skip
    view = JobView(site_names(job.num_sites), job.num_rounds, start_round)
    live = sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb"
    with ConsoleRunner(view, search_dir, sys.stdout, live=live):
        yield


@contextlib.contextmanager
def noticing_ctrl_c():
    """A list that holds True once SIGINT arrived inside the block; the previous handler still runs
    (it raises KeyboardInterrupt, which NVFlare's simulator catches and reports as a failed run)."""
    seen: list[bool] = []
    previous = signal.getsignal(signal.SIGINT)

    def note(signum, frame):
        seen.append(True)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def server_log(search_dir: str | os.PathLike) -> str:
    found = sorted(Path(search_dir).glob("**/server/log.txt")) or sorted(Path(search_dir).glob("**/log.txt"))
    return str(found[0]) if found else str(search_dir)


def failure_message(search_dir: str | os.PathLike, fallback: str = "") -> str:
    """Why the job under ``search_dir`` stopped (the server's job_failure.json), else ``fallback``;
    with the server log named. '' when the server recorded no failure and there is no fallback."""
    failure = read_failure(search_dir)
    if failure is None and not fallback:
        return ""
    log = server_log(search_dir)
    return failure_line(failure, log) if failure else f"{fallback.rstrip('. ')} (server log: {log})"
