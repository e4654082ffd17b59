"""run_inference.py on the tiny model: every checkpoint kind loads and answers, bad ones are refused.

    .venv/bin/python -m pytest tests/test_run_inference.py -q

Checkpoints are made the way the federated job makes them: ``{"model": exchanged tensors (bf16),
"meta": ...}`` .pt files for full fine-tuning and LoRA, and a PEFT adapter directory.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import run_inference
from qwen3vl_sft import inference
from qwen3vl_sft.config import InferenceConfig, ModelConfig
from qwen3vl_sft.inference import Checkpoint, CheckpointError
from qwen3vl_sft.modeling import load_model
from qwen3vl_sft.weights import exchanged_state

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def probe_logits(model) -> torch.Tensor:
    """Logits on a fixed text-only prompt: enough to tell two language models apart."""
    ids = torch.arange(20, 60).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_model_dir, tiny_finetuned_dir) -> dict:
    """Checkpoint files of every kind, plus the logits their models must reproduce."""
    out = tmp_path_factory.mktemp("ckpts")
    finetuned = load_model(ModelConfig(model_name_or_path=str(tiny_finetuned_dir)))
    full = exchanged_state(finetuned)  # bf16, trainable names: what a full-fine-tuning job saves
    meta = {"base_model": str(tiny_model_dir), "lora": None, "round": 3}
    torch.save({"model": full, "meta": meta, "train_conf": {"round": 3}}, out / "full.pt")

    lora_config = ModelConfig(
        model_name_or_path=str(tiny_model_dir),
        lora=True,
        lora_r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_target_modules=",".join(LORA["target_modules"]),
    )
    peft_model = load_model(lora_config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero, bf16-exact adapters: B = 0 would make any loader look right
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_((torch.randn(param.shape, generator=generator) * 0.3).bfloat16())
    lora = exchanged_state(peft_model)
    torch.save({"model": lora, "meta": {**meta, "lora": LORA}}, out / "lora.pt")
    torch.save({"model": lora}, out / "lora_no_meta.pt")
    peft_model.save_pretrained(out / "adapter")  # adapter_config.json names the tiny base
    with peft_model.disable_adapter():
        base_logits = probe_logits(peft_model)
    return {"dir": out, "full": full, "lora_logits": probe_logits(peft_model), "base_logits": base_logits}


def config(tiny_model_dir, synth_dir, synth_split, **kw) -> InferenceConfig:
    defaults = {
        "base_model": str(tiny_model_dir),
        "data_file": str(synth_split[1]),
        "image_root": str(synth_dir),
        "max_new_tokens": 6,
        "progress": False,
    }
    return InferenceConfig(**{**defaults, **kw})


def load(path, cfg: InferenceConfig):
    """(detected checkpoint, its model on CPU)."""
    ckpt = inference.detect(Checkpoint("x", str(path)), cfg)
    return ckpt, inference.load_checkpoint(ckpt, cfg, torch.device("cpu"))[0]


# --------------------------------------------------------------------------- detection and loading


def test_parse_spec_label_and_path():
    assert inference.parse_spec("global=ws/FL_global_model.pt") == Checkpoint(
        "global", "ws/FL_global_model.pt"
    )
    assert inference.parse_spec("ws/server/FL_global_model.pt").label == "FL_global_model"
    assert inference.parse_spec("Qwen/Qwen3-VL-2B-Instruct").label == "Qwen3-VL-2B-Instruct"
    assert inference.parse_spec("runs/lr=1e-5/global").path == "runs/lr=1e-5/global"  # '=' inside a path


def test_each_kind_is_detected_with_its_base(
    ckpts, tiny_model_dir, tiny_finetuned_dir, synth_dir, synth_split
):
    d = ckpts["dir"]
    models = [
        f"ft={tiny_finetuned_dir}",
        f"full={d / 'full.pt'}",
        f"lora={d / 'lora.pt'}",
        f"adapter={d / 'adapter'}",
    ]
    cfg = config(tiny_model_dir, synth_dir, synth_split, model=models, base_model="")
    found = {c.label: c for c in inference.requested_checkpoints(cfg)}
    assert [(c.label, c.kind) for c in found.values()] == [
        ("base", "hf"),  # the base named by the .pt meta, added in front
        ("ft", "hf"),
        ("full", "pt-full"),
        ("lora", "pt-lora"),
        ("adapter", "adapter"),
    ]
    assert found["base"].path == str(tiny_model_dir)
    assert found["full"].base == found["lora"].base == found["adapter"].base == str(tiny_model_dir)
    assert found["lora"].meta["lora"] == LORA


def test_full_pt_applies_saved_tensors_over_the_base(ckpts, tiny_model_dir, synth_dir, synth_split):
    _, model = load(ckpts["dir"] / "full.pt", config(tiny_model_dir, synth_dir, synth_split))
    params = dict(model.named_parameters())
    for name, saved in ckpts["full"].items():
        assert torch.equal(params[name], saved.float()), name
    base = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    vision = "model.visual.blocks.0.attn.qkv.weight"  # frozen in training: not in the file, kept from base
    assert vision not in ckpts["full"]
    assert torch.equal(params[vision], dict(base.named_parameters())[vision])


@pytest.mark.parametrize("name", ["lora.pt", "lora_no_meta.pt", "adapter"])
def test_lora_checkpoints_reproduce_the_adapted_model(name, ckpts, tiny_model_dir, synth_dir, synth_split):
    # Without meta, rank and targets are read from the tensors; alpha cannot be, so it is a flag.
    cfg = config(tiny_model_dir, synth_dir, synth_split, lora_alpha=LORA["lora_alpha"])
    ckpt, model = load(ckpts["dir"] / name, cfg)
    assert ckpt.kind == ("adapter" if name == "adapter" else "pt-lora")
    logits = probe_logits(model)
    assert torch.allclose(logits, ckpts["lora_logits"], atol=1e-4)
    assert not torch.allclose(logits, ckpts["base_logits"], atol=1e-2)  # the adapters really act


def test_lora_pt_without_meta_defaults_alpha_to_model_config(ckpts, tiny_model_dir, synth_dir, synth_split):
    ckpt, model = load(ckpts["dir"] / "lora_no_meta.pt", config(tiny_model_dir, synth_dir, synth_split))
    assert ckpt.meta == {}
    # alpha 128 (ModelConfig's default) instead of 8 scales the adapters 16x: a different model.
    assert not torch.allclose(probe_logits(model), ckpts["lora_logits"], atol=1e-2)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"encoder.layer.0.weight": torch.zeros(2)}, "none of the 1 saved tensors"),
        (
            {"model.language_model.norm.weight": torch.ones(128), "vision.proj.bias": torch.zeros(2)},
            r"1 of 2 saved tensors are not in this model \(e.g. \['vision.proj.bias'\]\)",
        ),
        ({"model.language_model.norm.weight": torch.ones(7)}, "saved shape"),
        ({"base_model.model.encoder.query.lora_A.weight": torch.zeros(4, 8)}, "do not fit"),
    ],
)
def test_pt_whose_keys_do_not_fit_is_refused(
    state, message, tmp_path, tiny_model_dir, synth_dir, synth_split
):
    torch.save({"model": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message):
        load(tmp_path / "bad.pt", config(tiny_model_dir, synth_dir, synth_split))


class NotWeights:
    pass


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (NotWeights(), "not a weights file that torch.load"),  # unpickling would run foreign code
        ({"epoch": 3, "optimizer": {"lr": 0.1}}, r"found a dict with keys \['epoch', 'optimizer'\]"),
        ({"model": {}}, "holds no tensors"),
        (b"{}", "not a weights file that torch.load"),  # raw bytes written below: e.g. a JSON file
    ],
)
def test_file_that_is_not_a_weights_file_is_refused(content, message, tmp_path):
    path = tmp_path / "FL_global_model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        inference.detect(Checkpoint("x", str(path)), InferenceConfig())


def test_paths_that_are_not_qwen3vl_checkpoints_are_refused(tmp_path, tiny_model_dir):
    cfg = InferenceConfig(base_model=str(tiny_model_dir))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert' is not Qwen3-VL"):
        inference.detect(Checkpoint("other", str(other)), cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json"):
        inference.detect(Checkpoint("empty", str(tmp_path / "empty")), cfg)
    with pytest.raises(CheckpointError, match="does not exist"):
        inference.detect(Checkpoint("gone", str(tmp_path / "FL_global_model.pt")), cfg)


def test_cli_refuses_with_one_line_and_exit_code_2(tmp_path, capsys, tiny_model_dir, synth_dir, synth_split):
    torch.save({"model": {"encoder.layer.0.weight": torch.zeros(2)}}, tmp_path / "bad.pt")
    cfg = [
        "--base_model",
        str(tiny_model_dir),
        "--data_file",
        str(synth_split[1]),
        "--image_root",
        str(synth_dir),
    ]
    assert (
        run_inference.main([*cfg, "--model_path", str(tmp_path / "bad.pt"), "--compare_base", "false"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: fine-tuned (") and "none of the 1 saved tensors" in err[-1]
    dup = ["--model", f"a={tiny_model_dir}", "--model", f"a={tmp_path / 'bad.pt'}"]
    assert run_inference.main([*cfg, *dup]) == 2
    assert "repeated: ['a']" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end


def test_cli_compares_every_kind_side_by_side(
    ckpts, tmp_path, capsys, tiny_model_dir, tiny_finetuned_dir, synth_dir, synth_split
):
    d = ckpts["dir"]
    hf_global = tmp_path / "global_hf"  # our HF directory of a global model, without processor files
    hf_global.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_finetuned_dir / name, hf_global / name)
    labels = {"hf": hf_global, "full": d / "full.pt", "lora": d / "lora.pt", "adapter": d / "adapter"}
    argv = [f"--model={k}={v}" for k, v in labels.items()]
    argv += ["--base_model", str(tiny_model_dir), "--data_file", str(synth_split[1])]
    argv += [
        "--image_root",
        str(synth_dir),
        "--max_samples",
        "5",
        "--max_new_tokens",
        "4",
        "--batch_size",
        "4",
    ]
    argv += ["--output_dir", str(tmp_path / "report"), "--progress", "false"]
    assert run_inference.main(argv) == 0
    out = capsys.readouterr().out

    assert out.count("--- Sample ") == 5
    first = out[out.index("--- Sample 1 ---") : out.index("--- Sample 2 ---")].splitlines()
    assert first[1].startswith("Image: ") and str(synth_dir) in first[1]
    assert first[2].startswith("Q: ") and "<image>" not in first[2]
    assert first[3].startswith("Ground truth: ")
    assert [line.split("]")[0] for line in first[4:9]] == [f"Model [{k}" for k in ("base", *labels)]

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {row["label"]: row for row in report["checkpoints"]}
    assert {k: rows[k]["kind"] for k in rows} == {
        "base": "hf", "hf": "hf", "full": "pt-full", "lora": "pt-lora", "adapter": "adapter"
    }  # fmt: skip
    assert all(row["samples"] == 5 and row["loss"] > 0 for row in rows.values())
    # the HF directory and the bf16 .pt hold the same fine-tuned weights (up to bf16 rounding)
    assert rows["hf"]["loss"] == pytest.approx(rows["full"]["loss"], rel=0.05)
    assert rows["hf"]["loss"] < rows["base"]["loss"]
    csv_lines = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert (
        csv_lines[0].startswith("label,path,kind,loss,rouge_l,token_f1,exact_match") and len(csv_lines) == 6
    )
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = [json.loads(x) for x in (tmp_path / "report" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 5 and set(answers[0]["answers"]) == set(rows)


def test_finetuned_scores_higher_than_base_on_held_out(
    tmp_path, capsys, tiny_model_dir, tiny_finetuned_dir, synth_dir, synth_split
):
    argv = ["--model_path", str(tiny_finetuned_dir), "--base_model", str(tiny_model_dir)]
    argv += ["--data_file", str(synth_split[1]), "--image_root", str(synth_dir), "--max_samples", "0"]
    argv += ["--max_new_tokens", "5", "--batch_size", "20", "--show_samples", "0"]
    argv += ["--output_dir", str(tmp_path), "--progress", "false"]
    assert run_inference.main(argv) == 0
    table = capsys.readouterr().out
    assert "--- Sample" not in table and "fine-tuned  hf" in table
    rows = {row["label"]: row for row in json.loads((tmp_path / "report.json").read_text())["checkpoints"]}
    base, tuned = rows["base"], rows["fine-tuned"]
    assert tuned["samples"] == base["samples"] == 40  # every held-out record
    assert tuned["loss"] < base["loss"] / 2
    for metric in ("rouge_l", "token_f1", "exact_match"):
        assert tuned[metric] > base[metric], metric
