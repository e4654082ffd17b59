"""job.py --demo's set-up (qwen3vl_sft.demo.prepare_demo) from an empty folder, as on a fresh clone.

The federated run itself is what tests/test_fl_job.py runs; the whole demo takes ~3 minutes.
"""

from __future__ import annotations

import json

from qwen3vl_sft.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from qwen3vl_sft.demo import DEMO_RECORDS, DEMO_TRAIN, prepare_demo


def test_demo_set_up_builds_model_data_and_shards_in_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no demo/ folder yet
    job, model, data, train = prepare_demo(
        JobConfig(num_rounds=2), ModelConfig(), DataConfig(), TrainConfig()
    )

    assert (tmp_path / model.model_name_or_path / "model.safetensors").is_file()
    manifest = json.loads((tmp_path / job.data_dir / "manifest.json").read_text())
    assert sorted(manifest["sites"]) == ["site-1", "site-2", "site-3"]
    assert manifest["source"]["records"] == DEMO_RECORDS
    assert (job.n_clients, job.num_rounds) == (3, 2)  # the demo's sites; the flag given explicitly wins
    assert (train.learning_rate, train.max_steps) == (DEMO_TRAIN["learning_rate"], DEMO_TRAIN["max_steps"])
    assert data.cache_samples and data.dataloader_num_workers == 0
