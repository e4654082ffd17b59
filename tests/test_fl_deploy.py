"""job.py beyond the simulator: a PoC run (real server and clients as processes) and what an exported
job folder holds (test_production submits one to a deployment). Slow (NVFlare start-up); CI runs them."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest
from ports import free_port_base

import job as job_script
from qwen3vl_sft.config import PrepareDataConfig
from qwen3vl_sft.data.prepare import prepare_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SMALL_RUN = ["--num_sites", "2", "--num_rounds", "1", "--max_steps", "2", "--per_device_train_batch_size", "4",
             "--disable_progress_bar", "true", "--dataloader_num_workers", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def two_site_shards(synth_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards2")
    prepare_shards(PrepareDataConfig(data_file=str(synth_file), output_dir=str(out), num_sites=2))
    return out


def nvflare_home_state() -> dict[str, bytes]:
    """Every file under ~/.nvflare with its content: PoC must leave the user's NVFlare config alone."""
    home = Path.home() / ".nvflare"
    return {str(p): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()} if home.is_dir() else {}


def test_poc_run_completes_in_its_workspace_and_writes_the_global_model(
    tiny_model_dir, two_site_shards, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("NVFLARE_POC_WORKSPACE", raising=False)
    before = nvflare_home_state()
    workspace = tmp_path / "ws"
    job_script.main(
        ["--env", "poc", "--model_name_or_path", str(tiny_model_dir), "--data_dir", str(two_site_shards),
         "--workspace", str(workspace), *SMALL_RUN]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "Job finished" in out
    hf_dir = Path(out.split("Global model (HF directory): ", 1)[1].splitlines()[0])
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "config.json").is_file()
    assert "    0 site-1" in out and "    0 site-2" in out  # per-site metrics came back through the server
    assert hf_dir.is_relative_to(workspace / "poc")  # not the shared /tmp/nvflare/poc
    # The plain console (stdout is not a terminal): the view's lines, not NVFlare's monitor output.
    assert any(line.startswith("  site-2 round 0: done, train_loss ") for line in out.splitlines()), out
    assert "Job Meta" not in out and len(out.splitlines()) <= 40, out
    print(out)  # with -s: what a PoC run's console shows
    assert nvflare_home_state() == before


def test_exported_job_folder_runs_by_itself_from_another_folder(
    tiny_model_dir, two_site_shards, tmp_path, capsys
):
    """A relative --data_dir is written absolute into the exported job (sites run from their own
    workspace), and the printed submit command names the job folder itself."""
    project = tmp_path / "project"
    shutil.copytree(two_site_shards, project / "data")
    os.chdir(project)  # the relative paths below are the user's, from where they ran job.py
    try:
        job_script.main(["--export_dir", "exported", "--model_name_or_path", str(tiny_model_dir),
                         "--data_dir", "data", "--master_port_base", str(free_port_base(2)), *SMALL_RUN])  # fmt: skip
    finally:
        os.chdir(REPO)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    job_dir = Path(shlex.split(printed.split("submit it with: ", 1)[1])[-1])
    assert job_dir == project / "exported" / "qwen3-vl-fedavg"
    assert (job_dir / "meta.json").is_file()  # what `nvflare job submit -j` takes: a job folder
    for app in ("app_server", "app_site-1", "app_site-2"):
        assert (
            job_dir / app / "custom" / "qwen3vl_sft" / "__init__.py"
        ).is_file()  # the package travels along
    client_config = (job_dir / "app_site-1" / "config" / "config_fed_client.json").read_text()
    assert str(project / "data" / "site-1" / "train.json") in client_config  # absolute: sites run elsewhere
    server_config = (job_dir / "app_server" / "config" / "config_fed_server.json").read_text()
    assert (
        "qwen3vl_sft.fl.exchange.GlobalEncoder" in server_config
        and "qwen3vl_sft.fl.exchange.UpdateDecoder" in server_config
    )
    # That the folder runs by itself, from another folder, is test_production's `nvflare job submit` test.
