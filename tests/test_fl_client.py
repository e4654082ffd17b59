"""client.py's round logic (qwen3vl_sft.fl.client.SiteRunner) on the tiny model, outside NVFlare."""

from __future__ import annotations

import torch

from qwen3vl_sft.config import DataConfig, ModelConfig, TrainConfig
from qwen3vl_sft.fl.client import SiteRunner
from qwen3vl_sft.model.modeling import load_model
from qwen3vl_sft.model.weights import exchanged_state
from qwen3vl_sft.train.engine import RunConfig


def test_validation_scores_the_received_global_model_not_the_sites_last_local_one(
    tiny_model_dir, synth_dir, synth_split, tmp_path
):
    """Bug fixed here: with the model kept between rounds, validation ran before the received weights
    were loaded, so from round 1 on val_* scored the site's own locally trained model."""
    train_file, held_out = synth_split
    config = RunConfig(
        ModelConfig(model_name_or_path=str(tiny_model_dir)),
        DataConfig(
            data_path=str(train_file),
            eval_data_path=str(held_out),
            image_root=str(synth_dir),
            dataloader_num_workers=0,
        ),
        TrainConfig(
            output_dir=str(tmp_path),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            disable_progress_bar=True,
        ),
    )
    runner = SiteRunner(config, "site-1", rank=0)
    global_model = exchanged_state(load_model(config.model), torch.bfloat16)

    first = runner.round(global_model, current_round=0, total_rounds=2)
    trained = first.weights
    assert any(not torch.equal(trained[k], global_model[k]) for k in global_model)  # the site moved away
    second = runner.round(global_model, current_round=1, total_rounds=2)  # the same global model again

    assert second.metrics["val_loss"] == first.metrics["val_loss"]
    assert second.metrics["val_accuracy"] == first.metrics["val_accuracy"]


def test_a_site_refuses_to_start_on_a_data_path_or_image_root_it_lacks(shards, tmp_path):
    """Paths are checked before the Client API handshake, so the job ends naming the missing one
    (qwen3vl_sft.fl.watch) instead of failing every round."""
    import json
    import shutil

    import pytest

    from qwen3vl_sft.errors import DataError
    from qwen3vl_sft.fl.client import check_site_paths

    with pytest.raises(
        FileNotFoundError, match=r"--data_path /nowhere/train.json does not exist on this site"
    ):
        check_site_paths(DataConfig(data_path="/nowhere/train.json"))
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["image_root"] = manifest["config"]["image_root"] = str(tmp_path / "moved_away")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="moved_away"):  # the root the manifest names, not found here
        check_site_paths(DataConfig(data_path=str(copy / "site-1" / "train.json")))
    train = str(shards / "site-1" / "train.json")
    assert check_site_paths(DataConfig(data_path=train)) == DataConfig(data_path=train)  # all there: as given
    # A validation file the site lacks (job.py could not look on the site's machine) means no validation.
    missing_val = DataConfig(data_path=train, eval_data_path=str(shards / "site-1" / "nothing.json"))
    assert check_site_paths(missing_val).eval_data_path == ""
