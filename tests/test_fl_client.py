"""client.py's round logic (qwen3vl_sft.fl_client.SiteRunner) on the tiny model, outside NVFlare."""

from __future__ import annotations

import torch

from qwen3vl_sft.config import DataConfig, ModelConfig, TrainConfig
from qwen3vl_sft.fl_client import SiteRunner
from qwen3vl_sft.modeling import load_model
from qwen3vl_sft.train import SFTConfig
from qwen3vl_sft.weights import exchanged_state


def test_validation_scores_the_received_global_model_not_the_sites_last_local_one(
    tiny_model_dir, synth_dir, synth_split, tmp_path
):
    """Bug fixed here: with the model kept between rounds, validation ran before the received weights
    were loaded, so from round 1 on val_* scored the site's own locally trained model."""
    train_file, held_out = synth_split
    config = SFTConfig(
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
