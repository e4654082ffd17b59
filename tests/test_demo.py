"""job.py --demo's set-up (qwen3vl_sft.demo.prepare_demo) from an empty folder, as on a fresh clone.

The federated run itself is what tests/test_fl_job.py runs; the whole demo takes ~3 minutes. One slow
test runs a short demo end to end for its console (the plain form, off a terminal).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3vl_sft.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from qwen3vl_sft.demo import DEMO_RECORDS, DEMO_TRAIN, prepare_demo

REPO_DIR = Path(__file__).resolve().parent.parent


def test_demo_set_up_builds_model_data_and_shards_in_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no demo/ folder yet
    job, model, data, train = prepare_demo(
        JobConfig(num_rounds=2), ModelConfig(), DataConfig(), TrainConfig()
    )

    assert (tmp_path / model.model_name_or_path / "model.safetensors").is_file()
    manifest = json.loads((tmp_path / job.data_dir / "manifest.json").read_text())
    assert sorted(manifest["sites"]) == ["site-1", "site-2", "site-3"]
    assert manifest["source"]["records"] == DEMO_RECORDS
    assert (job.num_sites, job.num_rounds) == (3, 2)  # the demo's sites; the flag given explicitly wins
    assert (train.learning_rate, train.max_steps) == (DEMO_TRAIN["learning_rate"], DEMO_TRAIN["max_steps"])
    assert data.cache_samples and data.dataloader_num_workers == 0


@pytest.mark.slow
def test_demo_console_is_short_plain_and_has_no_traceback(tmp_path):
    """The whole `job.py --demo` (2 rounds, a few steps) with stdout a pipe, as CI and `| tee` see it:
    the plain form of the console, a line per site result and per round, the summary, no traceback
    on the console or in any log (sites' torchrun leave on their own instead of being SIGTERMed)."""
    from ports import free_port_base

    workspace = tmp_path / "ws"
    args = ["--demo", "--num_rounds", "2", "--max_steps", "4", "--workspace", str(workspace),
            "--master_port_base", str(free_port_base(3))]  # fmt: skip
    result = subprocess.run([sys.executable, str(REPO_DIR / "job.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    lines = console.splitlines()
    assert len(lines) <= 45, console
    assert "Traceback" not in console
    for site in ("site-1", "site-2", "site-3"):
        assert any(line.startswith(f"  {site} round 1: done, train_loss ") for line in lines), console
    aggregate = next(line for line in lines if line.startswith("round 1 (2 of 2): averaged 3 of 3 sites, "))
    assert "MiB down" in aggregate and "received global: val_loss " in aggregate
    assert f"Logs: server {workspace}/qwen3-vl-fedavg-demo/server/log.txt" in console
    assert "Job finished." in console and "Evaluate it: " in console and "Held-out test set" in console
    assert not [line for line in lines if " INFO " in line or " - INFO - " in line]  # NVFlare's stream
    assert "get_status returns None" not in console  # SimEnv's note on a status it does not keep
    assert "Loading weights" not in console  # the report's model loads show no progress bars
    logs = [p for p in workspace.rglob("*") if p.suffix in (".txt", ".log") and p.is_file()]
    assert any(p.name == "log.txt" for p in logs)  # the full logs are still written
    assert not [p for p in logs if "Traceback" in p.read_text(errors="replace")]
    assert not [p for p in logs if "terminating trainer process group" in p.read_text(errors="replace")]
