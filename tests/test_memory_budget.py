"""bench/memory_budget.py's figures agree with the models and files they describe (tiny checkpoint, CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from safetensors import safe_open

from qwen3vl_sft.config import ModelConfig
from qwen3vl_sft.model.modeling import count_parameters, load_model
from qwen3vl_sft.model.weights import exchanged_state

BENCH = Path(__file__).resolve().parents[1] / "bench" / "memory_budget.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("memory_budget", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def figures(bench, tiny_model_dir):
    return bench.budget(str(tiny_model_dir), 512, 3, "tiny")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_parameter_counts_are_the_loaded_models(figures, tiny_model_dir, kind):
    # Materialised weights, not the meta device the script counts on: the two must agree.
    model = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir), lora=kind == "lora"))
    trained, total = count_parameters(model)
    stats = figures["parameters"][kind]
    assert (stats["trained"], stats["total"]) == (trained, total)
    assert stats["trained"] + stats["frozen"] == stats["total"]
    message = sum(t.numel() * t.element_size() for t in exchanged_state(model).values())
    assert figures["server_and_disk"][kind]["message (bf16)"] == message
    assert figures["server_and_disk"][kind]["message (fp32)"] == 2 * message


def test_every_total_is_the_sum_of_its_parts(figures):
    for name, parts in figures["gpu"].items():
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total"), name


def test_checkpointing_cuts_layer_activations_only(figures):
    gpu = figures["gpu"]
    names = sorted({n.rsplit(", ", 1)[0] for n in gpu})
    assert len(names) == 3
    for name in names:
        without, with_ = gpu[f"{name}, no grad. checkpointing"], gpu[f"{name}, with grad. checkpointing"]
        layers = "activations (decoder layers)"
        assert with_[layers] < without[layers], name
        assert {k: v for k, v in with_.items() if k not in (layers, "total")} == {
            k: v for k, v in without.items() if k not in (layers, "total")
        }


def test_activations_scale_with_tokens_and_states_do_not(bench, tiny_model_dir, figures):
    double = bench.budget(str(tiny_model_dir), 2 * figures["tokens"], 3, "tiny")
    for name, parts in figures["gpu"].items():
        for part, size in parts.items():
            if part.startswith("activations"):
                assert double["gpu"][name][part] == 2 * size, (name, part)
            elif part != "total":
                assert double["gpu"][name][part] == size, (name, part)


def test_fp32_master_costs_six_more_bytes_per_trained_parameter(figures):
    gpu, trained = figures["gpu"], figures["parameters"]["full"]["trained"]
    bf16 = gpu["full SFT, bf16 weights, no grad. checkpointing"]["total"]
    fp32 = gpu["full SFT, fp32 master, no grad. checkpointing"]["total"]
    # Per trained parameter: 4 + 2 + 4 + 8 = 18 bytes against 4 x the meta model's element size (bf16:
    # weights, gradient, two moments); frozen parameters cost bf16 in both.
    element = figures["parameters"]["full"]["trained_bytes"] // trained
    assert fp32 - bf16 == (18 - 4 * element) * trained


def test_hf_directory_size_is_the_checkpoints_tensor_bytes(figures, tiny_model_dir):
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        names = f.keys()  # safe_open is not iterable
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in names)
    rows = figures["server_and_disk"]["full"]
    assert rows["disk: global_model_hf/"] == stored
    assert rows["disk per round, latest + best_*"] == 2 * rows["disk per round, latest only"]


def test_lora_layer_rule_refuses_unknown_targets(bench):
    dims = {"h": 8, "ad": 8, "kvd": 4, "i": 16}
    with pytest.raises(ValueError, match="no activation rule"):
        bench.layer_bytes_per_token(dims, 4, ("lm_head",))
    assert bench.layer_bytes_per_token(dims, 4, ("q_proj",)) > bench.layer_bytes_per_token(dims, 4, ())


def test_cli_prints_the_report(bench, tiny_model_dir, capsys, tmp_path):
    out = tmp_path / "budget.json"
    assert (
        bench.main(["--model_name_or_path", str(tiny_model_dir), "--tokens", "64", "--json", str(out)]) == 0
    )
    assert "GPU memory: full SFT, bf16 weights" in capsys.readouterr().out
    assert out.is_file()
