"""qwen3vl_sft.model.checkpoints: the base a global model records, so that evaluating it needs no hub."""

from __future__ import annotations

import pytest

from qwen3vl_sft.config import ModelConfig
from qwen3vl_sft.model.checkpoints import fl_record, recorded_base, usable_base

HUB_ID = "Qwen/Qwen3-VL-2B-Instruct"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An HF cache holding a snapshot of HUB_ID, as the server has once it read the base model."""
    cache = tmp_path / "hub"
    repo = cache / "models--Qwen--Qwen3-VL-2B-Instruct"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def test_a_hub_base_is_recorded_as_the_local_snapshot_with_its_id(hub_cache):
    record = fl_record(ModelConfig(model_name_or_path=HUB_ID))
    assert record["base_model"] == str(hub_cache) and record["base_model_id"] == HUB_ID
    assert usable_base(record["base_model"], record["base_model_id"]) == str(hub_cache)  # here: the snapshot
    assert usable_base("/elsewhere/snapshot", HUB_ID) == HUB_ID  # another machine: the id


def test_an_uncached_hub_id_and_a_local_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    assert recorded_base(ModelConfig(model_name_or_path="base")) == str(tmp_path / "base")  # absolute
    assert fl_record(ModelConfig(model_name_or_path="base"))["base_model_id"] is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        recorded_base(ModelConfig(model_name_or_path="nobody/not-cached-model")) == "nobody/not-cached-model"
    )
