"""job.py --env prod against a provisioned NVFlare deployment on this machine (tests/deployment.py):
server, 3 sites and an admin from `nvflare provision`, each party started from its own startup kit.
Then the --export_dir folder goes into the same deployment with `nvflare job submit`. Slow; CI runs it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deployment import Deployment, processes_under

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SMALL_RUN = ["--n_clients", "3", "--max_steps", "2", "--per_device_train_batch_size", "4",
             "--disable_progress_bar", "true", "--dataloader_num_workers", "0"]  # fmt: skip
SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, shards, tiny_model_dir):
    # The parties' own settings: job.py's process has neither variable, so the paths the job names as
    # $QWEN3VL_SITE_DATA / $QWEN3VL_BASE_MODEL can only be resolved on the sites and the server.
    party_vars = {"QWEN3VL_SITE_DATA": str(shards), "QWEN3VL_BASE_MODEL": str(tiny_model_dir)}
    deployment = Deployment(tmp_path_factory.mktemp("prod"), SITES, party_vars)
    deployment.provision()
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()
        assert not processes_under(deployment.root)  # every party and what it started has ended
        assert not (deployment.home / ".nvflare").exists()  # every command ran with the deployment's HOME


def admin_run(deployment: Deployment, args: list[str], cwd: Path, timeout: float = 600):
    cwd.mkdir(parents=True, exist_ok=True)
    assert "QWEN3VL_SITE_DATA" not in os.environ
    return subprocess.run(
        args, cwd=cwd, env=deployment.env(), capture_output=True, text=True, timeout=timeout
    )


def assert_global_model(result_dir: Path, rounds: int) -> None:
    (checkpoint,) = result_dir.glob("**/app_server/FL_global_model.pt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["meta"]["round"] == rounds - 1
    assert saved["model"] and all(
        t.dtype == torch.float32 for t in saved["model"].values()
    )  # the fp32 master
    assert (checkpoint.parent / "global_model_hf" / "model.safetensors").is_file()


def test_prod_job_runs_on_the_provisioned_sites_with_their_own_paths(deployment, tmp_path):
    admin = tmp_path / "admin"
    args = [sys.executable, str(REPO / "job.py"), "--env", "prod", "--startup_kit", str(deployment.admin_kit),
            "--data_dir", "$QWEN3VL_SITE_DATA", "--model_name_or_path", "$QWEN3VL_BASE_MODEL",
            "--workspace", "ws", "--num_rounds", "2", *SMALL_RUN]  # fmt: skip
    done = admin_run(deployment, args, admin)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    job_id = re.search(r"job ([0-9a-f-]{36}): FINISHED:COMPLETED", out).group(1)
    assert f"job {job_id}: RUNNING, round 0" in out  # the rounds, as the server's show_stats reports them
    result_dir = Path(out.split("Job finished. Results: ", 1)[1].splitlines()[0])
    assert result_dir == admin / "ws" / "qwen3-vl-fedavg" / job_id  # fetched under --workspace
    for round_ in (0, 1):
        for site in SITES:
            assert re.search(rf"^\s+{round_} {site}\s+\d", out, re.MULTILINE), (
                out
            )  # each site trained each round
    assert_global_model(result_dir, rounds=2)
    assert "Traceback" not in done.stderr
    # --resume: the last fetched global model travels with the new job to the server, which goes on from it.
    resumed = admin_run(deployment, [*args[: args.index("--num_rounds")], "--num_rounds", "3", *SMALL_RUN,
                                     "--resume"], admin)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert re.search(r"^\s+2 site-1\s+\d", resumed.stdout, re.MULTILINE) and not re.search(
        r"^\s+[01] site-1", resumed.stdout, re.MULTILINE
    )  # only round 2 ran
    assert_global_model(Path(resumed.stdout.split("Job finished. Results: ", 1)[1].splitlines()[0]), rounds=3)


def test_exported_job_submitted_with_nvflare_job_submit_runs_in_the_deployment(
    deployment, shards, tiny_model_dir, tmp_path
):
    admin = tmp_path / "admin"
    args = [sys.executable, str(REPO / "job.py"), "--export_dir", "exported", "--startup_kit",
            str(deployment.admin_kit), "--data_dir", str(shards), "--model_name_or_path", str(tiny_model_dir),
            "--num_rounds", "1", *SMALL_RUN]  # fmt: skip
    exported = admin_run(deployment, args, admin)
    assert exported.returncode == 0, exported.stderr
    submit = shlex.split(exported.stdout.strip().splitlines()[-1].split("submit it with: ", 1)[1])
    assert submit[:4] == ["nvflare", "job", "submit", "-j"] and "--startup-kit" in submit
    submitted = admin_run(deployment, submit, tmp_path / "elsewhere")  # as printed, from another folder
    job_id = re.search(r"job_id: ([0-9a-f-]{36})", submitted.stdout).group(1)
    kit = ["--startup-kit", str(deployment.admin_kit)]
    waited = admin_run(deployment, ["nvflare", "job", "wait", job_id, *kit], admin)
    assert "FINISHED:COMPLETED" in waited.stdout, waited.stdout + waited.stderr
    admin_run(deployment, ["nvflare", "job", "download", job_id, "-o", "results", *kit], admin)
    assert_global_model(admin / "results" / job_id, rounds=1)
