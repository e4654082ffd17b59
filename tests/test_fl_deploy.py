"""job.py beyond the simulator: a PoC run (real server and clients as processes) and an exported job
folder that runs by itself. Slow (NVFlare start-up dominates); CI runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import job as job_script
from qwen3vl_sft.config import PrepareDataConfig
from qwen3vl_sft.prepare import run as prepare_shards

pytestmark = pytest.mark.slow
SMALL_RUN = ["--n_clients", "2", "--num_rounds", "1", "--max_steps", "2", "--per_device_train_batch_size", "4",
             "--disable_progress_bar", "true", "--dataloader_num_workers", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def two_site_shards(synth_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards2")
    prepare_shards(PrepareDataConfig(data_file=str(synth_file), output_dir=str(out), num_clients=2))
    return out


def test_poc_run_completes_and_writes_the_global_model(tiny_model_dir, two_site_shards, capsys):
    job_script.main(
        [
            "--env",
            "poc",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--data_dir",
            str(two_site_shards),
            *SMALL_RUN,
        ]
    )
    out = capsys.readouterr().out
    assert "Job finished" in out
    hf_dir = Path(out.split("Global model (HF directory): ", 1)[1].splitlines()[0])
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "config.json").is_file()
    assert "    0 site-1" in out and "    0 site-2" in out  # per-site metrics came back through the server


def test_exported_job_folder_runs_by_itself(tiny_model_dir, two_site_shards, tmp_path):
    export = tmp_path / "exported"
    job_script.main(
        ["--export_dir", str(export), "--model_name_or_path", str(tiny_model_dir), "--data_dir", str(two_site_shards),
         *SMALL_RUN]
    )  # fmt: skip
    job_dir = export / "qwen3-vl-fedavg"
    for app in ("app_server", "app_site-1", "app_site-2"):
        assert (
            job_dir / app / "custom" / "qwen3vl_sft" / "__init__.py"
        ).is_file()  # the package travels along
    # Run it elsewhere, with nothing of this repository on the path: only the job folder.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # torchrun, as on a site
    nvflare = Path(sys.executable).parent / "nvflare"
    cmd = [str(nvflare), "simulator", "-w", str(tmp_path / "ws"), "-n", "2", "-t", "2", str(job_dir)]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    saved = torch.load(tmp_path / "ws/server/simulate_job/app_server/FL_global_model.pt", weights_only=True)
    assert saved["model"] and all(t.dtype == torch.bfloat16 for t in saved["model"].values())
    assert (tmp_path / "ws/server/simulate_job/app_server/global_model_hf/model.safetensors").is_file()
