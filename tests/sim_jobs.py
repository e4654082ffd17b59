"""The small federated jobs the end-to-end tests run in NVFlare's simulator: their configs, and one
call that builds the recipe (optionally with the fault hooks' recorder and outage), runs it and
summarises it as job.py does."""

from __future__ import annotations

from pathlib import Path

from ports import free_port_base

from qwen3vl_sft.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from qwen3vl_sft.fl import job as fl_job
from qwen3vl_sft.fl.summary import summarize

TESTS_DIR = Path(__file__).resolve().parent


def job_configs(
    workspace: Path,
    model_dir: Path,
    data_dir: Path,
    *,
    num_rounds: int = 2,
    max_steps: int = 3,
    torch_threads: int = 0,
    data_kw: dict | None = None,
    **job_kw,
) -> tuple[JobConfig, ModelConfig, DataConfig, TrainConfig]:
    """A job of a few tiny rounds on free ports; ``torch_threads=1`` makes float results machine-independent."""
    job = JobConfig(data_dir=str(data_dir), workspace=str(workspace), num_rounds=num_rounds,
                    master_port_base=free_port_base(max(4, job_kw.get("num_sites", 3))), **job_kw)  # fmt: skip
    train = TrainConfig(max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
                        disable_progress_bar=True, torch_threads=torch_threads)  # fmt: skip
    data = DataConfig(dataloader_num_workers=0, **(data_kw or {}))
    return job, ModelConfig(model_name_or_path=str(model_dir)), data, train


def run_sim_job(job, model, data, train, *, record_dir=None, backend=None, exchange=None, outage=None):
    """Build, run and summarise the job in the simulator. ``record_dir``: what each site sends is saved
    there (fault_hooks.RoundRecorder); ``outage``: a server output filter (fault_hooks.DataOutage)."""
    from nvflare.recipe.sim_env import SimEnv

    recipe = fl_job.build_recipe(job, model, data, train, backend, exchange)
    if record_dir is not None:
        from fault_hooks import RoundRecorder

        recipe.add_server_file(str(TESTS_DIR / "fault_hooks.py"))
        recipe.add_server_input_filter(RoundRecorder(str(record_dir)), tasks=["train"])
    if outage is not None:
        recipe.add_server_output_filter(outage, tasks=["train"])
    env = fl_job.execution_env(job, 0)
    assert isinstance(env, SimEnv)
    return summarize(job, recipe.run(env).get_result())
