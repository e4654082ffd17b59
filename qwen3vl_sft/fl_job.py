"""The FedAvg job: NVFlare 2.9 recipe, per-site torchrun commands, environments, summary.

Used by job.py (``python job.py --help``). One recipe serves the simulator (``--env sim``), PoC
(``--env poc``: a real server and clients as separate processes) and production (``--export_dir``: a
self-contained job folder for ``nvflare job submit``).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from .config import BackendConfig, DataConfig, JobConfig, ModelConfig, TrainConfig, to_flags
from .fileio import atomic_path
from .records import DataError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
# Sized for a 2B model (3.5 GB per message) on ordinary links; NVFlare 2.9 reads exactly these keys.
LARGE_MODEL_TIMEOUTS = {
    "get_task_timeout": 1800,
    "submit_task_result_timeout": 1800,
    "tensor_min_download_timeout": 1800,
    "tensor_streaming_per_request_timeout": 600,
    "streaming_idle_timeout": 1800,
}
KEY_METRIC = "val_accuracy"


def site_names(n_clients: int) -> list[str]:
    if n_clients <= 0:
        raise DataError(f"--n_clients must be at least 1, got {n_clients}")
    return [f"site-{i}" for i in range(1, n_clients + 1)]


def gpu_groups(job: JobConfig, cuda_devices: int) -> list[list[int]] | None:
    """GPU ids per site from ``--gpu "[0],[1],[2]"`` (validated); default one GPU per site on CUDA."""
    if not job.gpu:
        if cuda_devices == 0:
            return None
        return [
            list(range(i * job.nproc_per_client, (i + 1) * job.nproc_per_client))
            for i in range(job.n_clients)
        ]
    if not re.fullmatch(r"\s*\[\s*\d+(\s*,\s*\d+)*\s*\](\s*,\s*\[\s*\d+(\s*,\s*\d+)*\s*\])*\s*", job.gpu):
        raise DataError(
            f'--gpu {job.gpu!r} is malformed: use one bracketed list per site, e.g. "[0],[1],[2]"'
        )
    groups = [[int(x) for x in g.split(",")] for g in re.findall(r"\[([^\]]*)\]", job.gpu)]
    if len(groups) != job.n_clients:
        raise DataError(f"--gpu {job.gpu!r} has {len(groups)} groups but --n_clients is {job.n_clients}")
    if any(len(g) != job.nproc_per_client for g in groups):
        raise DataError(f"--gpu {job.gpu!r}: each group needs --nproc_per_client={job.nproc_per_client} GPUs")
    return groups


def site_data(data: DataConfig, data_dir: Path, site: str) -> DataConfig:
    """The site's DataConfig: its shard, its validation file, absolute paths (clients run elsewhere)."""
    train = data_dir / site / "train.json"
    if not train.is_file():
        raise DataError(
            f"{train} does not exist: run prepare_data.py --num_clients N --output_dir {data_dir} first"
        )
    val = data_dir / site / "val.json"
    image_root = os.path.abspath(data.image_root) if data.image_root else ""
    return dataclasses.replace(
        data, data_path=str(train), eval_data_path=str(val) if val.is_file() else "", image_root=image_root
    )


def launch_command(job: JobConfig, index: int, backend: BackendConfig) -> str:
    """torchrun for one site; a unique --master_port per site so co-located sites never collide.

    The official backend starts its own torchrun per round, so its client runs as one process.
    """
    runner = "torchrun" if job.export_dir else f"{shlex.quote(sys.executable)} -u -m torch.distributed.run"
    nproc = 1 if backend.backend == "official" else job.nproc_per_client
    return f"{runner} --nproc_per_node={nproc} --master_port={job.master_port_base + index}"


def site_backend(job: JobConfig, backend: BackendConfig, index: int) -> BackendConfig:
    """The backend flags of site ``index`` (0-based): the official backend's child torchrun gets a
    port of its own per site, counted from --official_master_port or --master_port_base + 100."""
    if backend.backend != "official":
        return backend
    port = (backend.official_master_port or job.master_port_base + 100) + index
    return dataclasses.replace(
        backend, official_nproc_per_node=job.nproc_per_client, official_master_port=port
    )


def absolute_model_path(model: ModelConfig) -> ModelConfig:
    path = model.model_name_or_path
    return (
        dataclasses.replace(model, model_name_or_path=os.path.abspath(path)) if os.path.isdir(path) else model
    )


def resume_checkpoint(job: JobConfig) -> str | None:
    """For --resume: the job's last saved global model, copied out of the job's run folder.

    The simulator clears ``<workspace>/<job>`` when it starts, so the checkpoint (and the state file)
    are first copied, atomically, to ``<workspace>/resume/<job>/``. That copy is a candidate too: a
    resumed run killed before it saved a round leaves nothing under ``<workspace>/<job>`` (fault test
    fix: the copy used to be ignored, so a second --resume found "nothing to resume").
    """
    if not job.resume:
        return None
    keep = Path(job.workspace).resolve() / "resume" / job.job_name
    found = [*Path(job.workspace).glob(f"{job.job_name}/**/FL_global_model.pt"), keep / "FL_global_model.pt"]
    candidates = [path for path in found if path.is_file()]
    if not candidates:
        raise DataError(
            f"--resume: no FL_global_model.pt under {job.workspace}/{job.job_name} or {keep}; nothing to resume"
        )
    latest = max(candidates, key=lambda path: (completed_rounds(path), os.path.getmtime(path)))
    if latest.parent != keep:
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("FL_global_model.pt", "fl_state.json"):
            (keep / name).unlink(missing_ok=True)
            if (latest.parent / name).is_file():
                with atomic_path(keep / name) as tmp:
                    shutil.copy2(latest.parent / name, tmp)
    return str(keep / "FL_global_model.pt")


def completed_rounds(checkpoint: str | os.PathLike | None) -> int:
    """Rounds already done by the run that wrote ``checkpoint``.

    Read from the checkpoint itself: its meta round is written in the same atomic rename as the weights
    (fault test fix: fl_state.json is written after global_model_hf/, so a kill between the two left it
    a round behind the weights and --resume trained that round twice). fl_state.json is the fallback.
    """
    if checkpoint is None:
        return 0
    from .inference import CheckpointError, read_weights_file  # weights_only: never unpickles code

    try:
        _, meta = read_weights_file(checkpoint)
    except CheckpointError as err:
        raise DataError(f"--resume: {err}") from err
    if meta.get("round") is not None:
        return int(meta["round"]) + 1
    state = Path(checkpoint).with_name("fl_state.json")
    return int(json.loads(state.read_text())["last_round"]) + 1 if state.is_file() else 0


def check_model(model: ModelConfig) -> None:
    """Refuse a local --model_name_or_path that is not Qwen3-VL before the job starts (fault test fix:
    it used to start, then the server failed inside NVFlare). Hub ids are checked where they load."""
    if not os.path.isdir(model.model_name_or_path):
        return
    from .modeling import ModelError, model_class

    try:
        model_class(model.model_name_or_path, model.trust_remote_code)
    except ModelError as err:
        raise DataError(str(err)) from err


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

    if torch.cuda.is_available() or job.export_dir:
        return 0
    return max(1, (os.cpu_count() or 1) // (job.n_clients * job.nproc_per_client))


def _recipe_class():
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    class ResumableFedAvgRecipe(FedAvgRecipe):
        """FedAvgRecipe whose controller can start at a later round (``--resume``)."""

        def __init__(self, *, start_round: int = 0, **kwargs):
            self._start_round = start_round  # read by _get_controller_kwargs during super().__init__
            super().__init__(**kwargs)

        def _get_controller_kwargs(self):
            # ignore_result_error: a crashed site is left out of the round instead of aborting the job;
            # the persistor enforces --min_clients on what was actually aggregated.
            return {
                **super()._get_controller_kwargs(),
                "start_round": self._start_round,
                "ignore_result_error": True,
            }

    return ResumableFedAvgRecipe


def build_recipe(
    job: JobConfig,
    model: ModelConfig,
    data: DataConfig,
    train: TrainConfig,
    backend: BackendConfig | None = None,
):
    """The FedAvg recipe with per-site commands, timeouts, tracking and the lean persistor."""
    from nvflare.recipe.utils import add_experiment_tracking, set_per_site_config

    from .fl_server import GlobalModelPersistor

    sites, model = site_names(job.n_clients), absolute_model_path(model)
    check_model(model)
    backend = backend or BackendConfig()
    checkpoint = resume_checkpoint(job)
    start_round = completed_rounds(checkpoint)
    if start_round >= job.num_rounds:
        raise DataError(
            f"--resume: all {job.num_rounds} rounds are done already (last checkpoint {checkpoint})"
        )
    model_args = {"model_config": dataclasses.asdict(model)}
    persistor = GlobalModelPersistor(
        model_config=dataclasses.asdict(model),
        min_sites=job.min_clients or job.n_clients,
        model={"path": "model.Qwen3VLGlobalModel", "args": model_args},
        source_ckpt_file_full_name=checkpoint,
        key_metric=KEY_METRIC,  # the best model by the same metric NVFlare's model selector tracks
    )
    recipe = _recipe_class()(
        start_round=start_round,
        name=job.job_name,
        min_clients=job.n_clients,  # NVFlare samples this many sites per round: all of them
        num_rounds=job.num_rounds - start_round,
        train_script="client.py",
        launch_external_process=True,
        server_expected_format="pytorch",
        key_metric=KEY_METRIC,
        model_persistor=persistor,
        server_memory_gc_rounds=1,  # gc + malloc_trim each round: held memory back to ~1x the model
    )
    data_dir = Path(job.data_dir) if job.export_dir else Path(job.data_dir).resolve()
    threads = cpu_threads_per_site(job)
    per_site = {}
    for index, site in enumerate(sites):
        train_site = dataclasses.replace(
            train,
            output_dir="qwen3vl_outputs",
            report_to="none",
            torch_threads=train.torch_threads or threads,
        )
        flags = to_flags(
            model, site_data(data, data_dir, site), train_site, site_backend(job, backend, index)
        )
        per_site[site] = {"train_args": shlex.join(flags), "command": launch_command(job, index, backend)}
    set_per_site_config(recipe, per_site)
    staged = stage_package()
    recipe.add_server_file(staged)
    recipe.add_server_file(str(REPO_DIR / "model.py"))
    recipe.add_client_file(staged)
    recipe.add_client_config(dict(LARGE_MODEL_TIMEOUTS))
    recipe.add_server_config(dict(LARGE_MODEL_TIMEOUTS))
    add_experiment_tracking(recipe, "tensorboard")
    if job.wandb:
        add_experiment_tracking(recipe, "wandb", wandb_tracking_config())
    return recipe


def wandb_tracking_config() -> dict:
    """WandB receiver settings; offline unless the server has WANDB_API_KEY (never written into the job)."""
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    args = {"name": "qwen3-vl-fedavg", "project": "nvflare", "group": "nvidia", "job_type": "training"}
    return {"mode": mode, "wandb_args": args}


def execution_env(job: JobConfig, cuda_devices: int):
    from nvflare.recipe.poc_env import PocEnv
    from nvflare.recipe.sim_env import SimEnv

    groups = gpu_groups(job, cuda_devices)
    if job.env == "poc":
        gpu_ids = sorted({g for group in groups for g in group}) if groups else None
        return PocEnv(num_clients=job.n_clients, gpu_ids=gpu_ids)
    gpu_config = ",".join("[" + ",".join(map(str, g)) + "]" for g in groups) if groups else None
    return SimEnv(
        num_clients=job.n_clients,
        clients=site_names(job.n_clients),
        num_threads=job.n_clients,
        gpu_config=gpu_config,
        workspace_root=job.workspace,
    )


@dataclasses.dataclass
class Summary:
    """Per-round, per-site metrics read back from the server's TensorBoard events."""

    result_dir: str
    rows: list[dict]
    global_model_dir: str
    text: str


SUMMARY_COLUMNS = ("train_loss", "samples", "seconds", "sent_mib", "val_loss", "val_accuracy")


def read_site_metrics(result_dir: str) -> list[dict]:
    """One row per (round, site) from ``tb_events/<site>/`` written by the TensorBoard receiver."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows: dict[tuple[int, str], dict] = {}
    for site_dir in sorted(Path(result_dir).glob("**/tb_events/site-*")):
        acc = EventAccumulator(str(site_dir), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                key = tag.rsplit("/", 1)[-1]
                rows.setdefault((event.step, site_dir.name), {"round": event.step, "site": site_dir.name})[
                    key
                ] = event.value
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], int(k[1].split("-")[1])))]


def format_rows(rows: list[dict]) -> str:
    header = f"{'round':>5} {'site':<8}" + "".join(f"{c:>14}" for c in SUMMARY_COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(f"{row[c]:>14.4g}" if c in row else f"{'-':>14}" for c in SUMMARY_COLUMNS)
        lines.append(f"{row['round']:>5} {row['site']:<8}{cells}")
    return "\n".join(lines)


def summarize(job: JobConfig, result_dir: str | None) -> Summary:
    """The end-of-job report: metrics table, where the global model is, how to evaluate it."""
    result_dir = str(result_dir or Path(job.workspace) / job.job_name)
    rows = read_site_metrics(result_dir)
    found = sorted(Path(result_dir).glob("**/global_model_hf"))
    global_dir = str(found[0]) if found else ""
    text = "\n".join(
        [
            f"Job finished. Results: {result_dir}",
            format_rows(rows) if rows else "(no per-site metrics were recorded)",
            f"Global model (HF directory): {global_dir or 'not written'}",
            f"Evaluate it: python run_inference.py --model_path {global_dir or '<global_model_hf>'} "
            f"--data_file {Path(job.data_dir) / 'test.json'}",
        ]
    )
    return Summary(result_dir=result_dir, rows=rows, global_model_dir=global_dir, text=text)
