"""qwen3vl_sft.model.checkpoints: the base a global model records, so that evaluating it needs no hub."""

from __future__ import annotations

import pytest

from qwen3vl_sft.config import ModelConfig
from qwen3vl_sft.model.checkpoints import (
    SHARD_INDEX,
    base_model_dir,
    fl_record,
    read_tensors,
    recorded_base,
    usable_base,
    write_merged_shards,
)

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


def sharded_base(folder):
    """A base checkpoint of two shards and an index: bf16 weights, one fp32 tensor (a norm kept in fp32)."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {
            "a.weight": torch.ones(2, 3, dtype=torch.bfloat16),
            "norm.weight": torch.ones(3, dtype=torch.float32),
        },
        "model-00002-of-00002.safetensors": {"b.weight": torch.zeros(4, dtype=torch.bfloat16)},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    (folder / SHARD_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_merged_shards_replace_by_name_keep_dtypes_and_copy_the_index(tmp_path):
    import torch
    from safetensors.torch import load_file

    base, out = sharded_base(tmp_path / "base"), tmp_path / "out"
    out.mkdir()
    write_merged_shards(
        base, out, {"a.weight": torch.full((2, 3), 2.0), "norm.weight": torch.full((3,), 0.5)}
    )
    first = load_file(out / "model-00001-of-00002.safetensors")
    assert first["a.weight"].dtype == torch.bfloat16 and first["a.weight"].eq(2).all()
    assert first["norm.weight"].dtype == torch.float32 and first["norm.weight"].eq(0.5).all()
    untouched = out / "model-00002-of-00002.safetensors"
    assert not untouched.is_symlink() and load_file(untouched)["b.weight"].eq(0).all()
    assert (out / SHARD_INDEX).read_text() == (base / SHARD_INDEX).read_text()
    assert read_tensors(sorted(out.glob("*.safetensors")), {"a.weight": "ours.a", "c": "ours.c"}).keys() == {
        "ours.a"
    }


def test_merged_shards_link_untouched_shards_when_asked(tmp_path):
    import torch

    base, out = sharded_base(tmp_path / "base"), tmp_path / "out"
    out.mkdir()
    write_merged_shards(base, out, {"b.weight": torch.ones(4)}, link_unchanged=True)
    linked = out / "model-00001-of-00002.safetensors"
    assert linked.is_symlink() and linked.resolve() == (base / linked.name).resolve()
    assert not (out / "model-00002-of-00002.safetensors").is_symlink()


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"c.weight": (1,)}, "1 tensors are not in the base checkpoint"),
        ({"a.weight": (3, 2)}, "received shape"),
    ],
)
def test_merged_shards_refuse_unknown_names_and_other_shapes(tmp_path, tensors, message):
    import torch

    from qwen3vl_sft.model.weights import WeightsError

    base, out = sharded_base(tmp_path / "base"), tmp_path / "out"
    out.mkdir()
    with pytest.raises(WeightsError, match=message):
        write_merged_shards(base, out, {name: torch.zeros(shape) for name, shape in tensors.items()})


def test_base_model_dir_expands_home(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert base_model_dir("~/base") == tmp_path / "base"
