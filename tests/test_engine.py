"""The in-process SFT engine on the tiny model: what trains, what is returned, what changes."""

from __future__ import annotations

import math

import pytest
import torch

from qwen3vl_sft.config import DataConfig, ModelConfig, TrainConfig
from qwen3vl_sft.model.modeling import load_model
from qwen3vl_sft.model.weights import WeightsError, exchanged_names, load_exchanged
from qwen3vl_sft.train import engine as train_mod
from qwen3vl_sft.train.engine import RunConfig, SFTEngine

MERGERS = ("model.visual.merger.", "model.visual.deepstack_merger_list.")


def config(model_dir, data_file, tmp_path, **overrides) -> RunConfig:
    model = ModelConfig(model_name_or_path=str(model_dir), **overrides.pop("model", {}))
    train_args = {"output_dir": str(tmp_path / "out"), "learning_rate": 1e-3, "per_device_train_batch_size": 8,
                  "max_steps": 6, "logging_steps": 100, "disable_progress_bar": True, **overrides.pop("train", {})}  # fmt: skip
    train = TrainConfig(**train_args)
    data = DataConfig(data_path=str(data_file), dataloader_num_workers=0)
    return RunConfig(model=model, data=data, train=train)


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        ({}, lambda n: n.startswith(("model.language_model.",) + MERGERS)),
        ({"tune_mm_llm": False}, lambda n: n.startswith(MERGERS)),
        ({"tune_mm_mlp": False}, lambda n: n.startswith("model.language_model.")),
        ({"tune_mm_vision": True, "tune_mm_mlp": False, "tune_mm_llm": False},
         lambda n: n.startswith("model.visual.") and not n.startswith(MERGERS)),
    ],
)  # fmt: skip
def test_exchanged_set_is_exactly_the_trainable_set(tiny_model_dir, flags, expect):
    model = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir), **flags))
    names = exchanged_names(model)
    all_names = [n for n, _ in model.named_parameters()]
    assert names == [n for n in all_names if expect(n)]
    assert "lm_head.weight" not in names  # tied to the embedding: exchanged once, as the embedding


def test_lora_exchanges_adapters_only(tiny_model_dir):
    model = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir), lora=True, lora_r=4, lora_alpha=8))
    names = exchanged_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # 2 layers x 4 projections (q, k, v, o) x (A, B)
    assert len(names) == 16
    assert {n.split(".")[-3] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(".default." not in n for n in names)  # PEFT file names: loadable by PeftModel.from_pretrained


def test_nothing_to_train_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="nothing to train"):
        load_model(ModelConfig(model_name_or_path=str(tiny_model_dir), tune_mm_mlp=False, tune_mm_llm=False))


def test_short_round_lowers_loss_and_changes_exactly_the_trainable_tensors(
    tiny_model_dir, synth_file, tmp_path
):
    engine = SFTEngine(config(tiny_model_dir, synth_file, tmp_path, train={"max_steps": 12}))
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    first = engine.train_round(round_index=0, num_rounds=2)
    second = engine.train_round(round_index=1, num_rounds=2)
    assert second.metrics["train_loss"] < first.metrics["train_loss"]
    changed = {n for n, p in engine.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(first.weights)
    m = first.metrics
    assert m["steps"] == 12 and m["samples"] == 96 and m["supervised_tokens"] > m["samples"]
    assert m["skipped_samples"] == 0 and m["seconds"] > 0 and math.isfinite(m["train_loss"])
    # In the model's dtype (fp32 here): the exchange computes the update from them in fp32.
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in first.weights.values())


def trained_change(cfg: RunConfig) -> tuple[torch.Tensor, SFTEngine]:
    """The change of every exchanged tensor over one round, flattened into one fp32 vector."""
    engine = SFTEngine(cfg)
    before = {n: t.float() for n, t in engine.weights().items()}
    after = engine.train_round().weights
    return torch.cat([(after[n].float() - before[n]).reshape(-1) for n in before]), engine


def test_fp32_master_weights_keep_the_small_updates_that_bf16_weights_round_away(
    tiny_model_dir, synth_file, tmp_path
):
    """lr 1e-5: each Adam step moves a weight ~1e-5, below half a bf16 step of most weights."""
    run = {"max_steps": 6, "learning_rate": 1e-5, "warmup_ratio": 0.0}

    def change(**model):
        return trained_change(config(tiny_model_dir, synth_file, tmp_path, train=run, model=model))

    reference, _ = change(dtype="float32")
    master, engine = change(dtype="bfloat16")  # fp32_master_weights defaults to True
    pure, _ = change(dtype="bfloat16", fp32_master_weights=False)
    trained = {p.dtype for p in engine.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in engine.model.parameters() if not p.requires_grad}
    assert (trained, frozen) == ({torch.float32}, {torch.bfloat16})  # the vision tower stays bf16

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    assert cosine(master, reference) > 0.95
    assert float((master == 0).float().mean()) < 0.05
    assert cosine(pure, reference) < 0.5  # most of each step is lost in bf16 weights ...
    assert float((pure == 0).float().mean()) > 0.5  # ... and most weights did not move at all


def test_schedule_spans_rounds(tiny_model_dir, synth_file, tmp_path):
    engine = SFTEngine(config(tiny_model_dir, synth_file, tmp_path, train={"max_steps": 4}))
    ends = [engine.train_round(round_index=r, num_rounds=3).metrics["learning_rate_end"] for r in range(3)]
    assert ends[0] > ends[1] > ends[2]  # one cosine over 12 steps, not three restarts
    assert ends[0] < 1e-3


def test_initial_weights_are_applied(tiny_model_dir, synth_file, tmp_path):
    cfg = config(tiny_model_dir, synth_file, tmp_path, train={"max_steps": 1, "learning_rate": 1e-12})
    engine = SFTEngine(cfg)
    received = {n: torch.full_like(t, 0.01) for n, t in engine.weights().items()}
    result = train_mod.train(cfg, initial_weights=received)
    for name, tensor in result.weights.items():  # lr ~ 0: what comes back is what was received
        torch.testing.assert_close(tensor.float(), received[name].float(), atol=1e-3, rtol=0)


def test_received_weights_load_strictly_by_name(tiny_model_dir):
    model = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(WeightsError, match="empty"):
        load_exchanged(model, {})
    with pytest.raises(WeightsError, match="unknown"):
        load_exchanged(model, {**state, "model.bogus.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="missing"):
        load_exchanged(model, dict(list(state.items())[1:]))
    load_exchanged(model, state)


def test_too_many_bad_images_abort_the_round(tiny_model_dir, tmp_path, write_records):
    records = [{"id": f"r{i}", "image": [f"images/none_{i}.jpg"], "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]} for i in range(40)]  # fmt: skip
    data_file = write_records(records)
    engine = SFTEngine(config(tiny_model_dir, data_file, tmp_path))
    with pytest.raises(ValueError, match="max_bad_sample_fraction"):
        engine.train_round()


@pytest.mark.slow
def test_cli_trains_the_tiny_model_from_chance_to_90_percent(tiny_model_dir, tmp_path, capsys):
    from qwen3vl_sft.data import synthetic

    data = synthetic.generate(tmp_path / "train", synthetic.SyntheticSpec(num_records=800, seed=11))
    test = synthetic.generate(
        tmp_path / "test", synthetic.SyntheticSpec(num_records=80, seed=12, multi_turn_fraction=0)
    )
    results = train_mod.main([
        "--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--eval_data_path", str(test),
        "--max_steps", "350", "--learning_rate", "1e-3", "--per_device_train_batch_size", "16",
        "--dataloader_num_workers", "0", "--cache_samples", "true", "--disable_progress_bar", "true",
        "--logging_steps", "1000",
        "--output_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert results["eval"]["accuracy"] >= 0.9, out
    assert f"eval: {{'loss': {round(results['eval']['loss'], 4)}" in out  # and the CLI prints it
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_bad_image_limit_is_judged_beyond_sampling_noise():
    """A round draws samples at random: 2 defective in the first 20 (10 %) is what a shard with 3 %
    broken images shows by chance, and must not abort at a 5 % limit; a gone image root (all bad) and
    a quarter bad must. Wilson lower bounds at z = 3, computed by hand."""
    from qwen3vl_sft.train.engine import bad_share_lower_bound

    assert bad_share_lower_bound(0, 20) == 0.0 and bad_share_lower_bound(0, 0) == 0.0
    assert round(bad_share_lower_bound(2, 20), 4) == 0.0160  # (0.1 + 0.225 - 0.3019) / 1.45
    assert round(bad_share_lower_bound(20, 20), 4) == 0.6897  # (1 + 0.225 - 0.225) / 1.45
    assert round(bad_share_lower_bound(5, 20), 4) == 0.0742  # above 0.05: a quarter bad aborts
    assert (
        bad_share_lower_bound(200, 4000) < 0.05 < bad_share_lower_bound(300, 4000)
    )  # 5 % vs 7.5 %, long round


def test_rank_and_world_before_a_process_group_come_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train_mod.rank_and_world() == (2, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert train_mod.rank_and_world() == (0, 1)  # a plain process
