"""run_inference.py on the tiny model: every checkpoint kind loads and answers, bad ones are refused.

    .venv/bin/python -m pytest tests/test_run_inference.py -q

Checkpoints are made the way the federated job makes them: ``{"model": exchanged tensors (bf16),
"meta": ...}`` .pt files for full fine-tuning and LoRA, and a PEFT adapter directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

import run_inference
from qwen3vl_sft.config import InferenceConfig, ModelConfig
from qwen3vl_sft.eval import inference, loading
from qwen3vl_sft.eval.loading import Checkpoint, CheckpointError
from qwen3vl_sft.model.modeling import load_model
from qwen3vl_sft.model.weights import exchanged_state

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
REPO = Path(__file__).resolve().parents[1]


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
    ckpt = loading.detect(Checkpoint("x", str(path)), cfg)
    return ckpt, loading.load_checkpoint(ckpt, cfg, torch.device("cpu"))[0]


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
        loading.detect(Checkpoint("x", str(path)), InferenceConfig())


def test_paths_that_are_not_qwen3vl_checkpoints_are_refused(tmp_path, tiny_model_dir):
    cfg = InferenceConfig(base_model=str(tiny_model_dir))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert' is not Qwen3-VL"):
        loading.detect(Checkpoint("other", str(other)), cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json"):
        loading.detect(Checkpoint("empty", str(tmp_path / "empty")), cfg)
    with pytest.raises(CheckpointError, match="does not exist"):
        loading.detect(Checkpoint("gone", str(tmp_path / "FL_global_model.pt")), cfg)


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


# --------------------------------------------------------------------------- flags refused up front, Ctrl-C


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max_samples", "-1"], "--max_samples -1: must be >= 0"),
        (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
        (["--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
        (["--show_samples", "-2"], "--show_samples -2: must be >= -1"),
        (["--do_sample", "true", "--temperature", "0"], "--temperature 0.0: must be > 0 with --do_sample"),
        (["--do_sample", "true", "--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]"),
        (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
        (["--device", "tpu9"], "--device tpu9: not a torch device"),
        (["--data_file", "no/such/test.json"], "--data_file no/such/test.json does not exist"),
        (["--image_root", "no/such/root"], "--image_root no/such/root (= "),
        (["--max_image_pixels", "0"], "--max_image_pixels must be >= 1, got 0"),
    ],
    ids=[
        "max_samples",
        "batch_size",
        "max_new_tokens",
        "show_samples",
        "temperature",
        "top_p",
        "cuda",
        "device",
        "data_file",
        "image_root",
        "max_image_pixels",
    ],  # fmt: skip
)
def test_flags_that_cannot_work_are_refused_in_one_line_before_any_model_loads(
    flags, message, monkeypatch, capsys, tiny_model_dir, synth_dir, synth_split
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    monkeypatch.setattr(inference, "load_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["--model_path", str(tiny_model_dir), "--data_file", str(synth_split[1])]
    argv += ["--image_root", str(synth_dir), *flags]
    assert run_inference.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_ctrl_c_ends_with_one_line_and_exit_code_130(
    monkeypatch, capsys, tiny_model_dir, synth_split, synth_dir
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "evaluate_checkpoints", interrupted)
    argv = [
        "--model_path",
        str(tiny_model_dir),
        "--data_file",
        str(synth_split[1]),
        "--image_root",
        str(synth_dir),
    ]
    assert run_inference.main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted (Ctrl-C): stopped, no report written"
    ]


def test_sigint_during_a_real_run_prints_no_traceback(tmp_path, tiny_model_dir, synth_file, synth_dir):
    argv = [sys.executable, str(REPO / "run_inference.py"), "--model_path", str(tiny_model_dir)]
    argv += ["--data_file", str(synth_file), "--image_root", str(synth_dir), "--max_samples", "0"]
    argv += ["--max_new_tokens", "256", "--output_dir", str(tmp_path), "--progress", "false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # interrupt once the model is being evaluated
        if line.startswith("fine-tuned: "):
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert (
        "Traceback" not in err
        and err.strip().splitlines()[-1] == "interrupted (Ctrl-C): stopped, no report written"
    )
    assert not (tmp_path / "report.json").exists()


# --------------------------------------------------------------------------- the base row comes from the checkpoint


def test_base_row_is_what_the_checkpoint_records_never_a_default_hub_id(
    ckpts, tmp_path, capsys, tiny_model_dir, tiny_finetuned_dir, synth_dir, synth_split
):
    from qwen3vl_sft.model.checkpoints import write_hf_directory

    cfg = config(tiny_model_dir, synth_dir, synth_split, base_model="")
    # an HF directory without a record (a trainer's save_pretrained): evaluated alone, said in one line
    alone = inference.requested_checkpoints(replace(cfg, model_path=str(tiny_finetuned_dir)))
    assert [(c.label, c.path) for c in alone] == [("fine-tuned", str(tiny_finetuned_dir))]
    assert capsys.readouterr().out == (
        f"No base row: {tiny_finetuned_dir} records no base model and --base_model is not set, "
        "so it is evaluated alone.\n"
    )
    # the server's HF directory records its base in fl_checkpoint.json
    server_dir = write_hf_directory(
        ckpts["full"], ModelConfig(model_name_or_path=str(tiny_model_dir)), tmp_path / "global_model_hf"
    )
    found = inference.requested_checkpoints(replace(cfg, model_path=str(server_dir)))
    assert [(c.label, c.kind, c.path) for c in found] == [
        ("base", "hf", str(tiny_model_dir)),
        ("fine-tuned", "hf", str(server_dir)),
    ]
    # the LoRA job's global_model_hf/ is a PEFT adapter directory; it records its base the same way
    lora_cfg = ModelConfig(model_name_or_path=str(tiny_model_dir), lora=True, lora_r=4, lora_alpha=8,
                           lora_target_modules="q_proj,v_proj")  # fmt: skip
    lora_state = torch.load(ckpts["dir"] / "lora.pt", weights_only=True)["model"]
    adapter_dir = write_hf_directory(lora_state, lora_cfg, tmp_path / "lora_hf")
    found = inference.requested_checkpoints(replace(cfg, model_path=str(adapter_dir)))
    assert [(c.label, c.kind, c.path) for c in found] == [
        ("base", "hf", str(tiny_model_dir)),
        ("fine-tuned", "adapter", str(adapter_dir)),
    ]
    # --base_model still wins
    found = inference.requested_checkpoints(
        replace(cfg, model_path=str(server_dir), base_model=str(tiny_finetuned_dir))
    )
    assert found[0].path == str(tiny_finetuned_dir)


def test_pt_that_records_no_base_needs_base_model(ckpts, tiny_model_dir, synth_dir, synth_split):
    cfg = config(tiny_model_dir, synth_dir, synth_split, base_model="")
    with pytest.raises(CheckpointError, match=r'its meta names no "base_model"; pass --base_model'):
        loading.detect(Checkpoint("x", str(ckpts["dir"] / "lora_no_meta.pt")), cfg)


def test_server_hf_directories_record_their_base_and_still_load(ckpts, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    from qwen3vl_sft.model.checkpoints import FL_RECORD, write_hf_directory

    full_cfg = ModelConfig(model_name_or_path=str(tiny_model_dir))
    full = write_hf_directory(ckpts["full"], full_cfg, tmp_path / "full_hf")
    assert json.loads((full / FL_RECORD).read_text()) == {
        "format": 1, "kind": "full", "base_model": str(tiny_model_dir), "base_model_id": None, "lora": None
    }  # fmt: skip
    Qwen3VLForConditionalGeneration.from_pretrained(full)  # the extra file does not disturb loading

    lora_cfg = ModelConfig(model_name_or_path=str(tiny_model_dir), lora=True, lora_r=4, lora_alpha=8,
                           lora_target_modules="q_proj,v_proj")  # fmt: skip
    lora_state = torch.load(ckpts["dir"] / "lora.pt", weights_only=True)["model"]
    adapter = write_hf_directory(lora_state, lora_cfg, tmp_path / "lora_hf")
    assert json.loads((adapter / FL_RECORD).read_text()) == {
        "format": 1, "kind": "lora", "base_model": str(tiny_model_dir), "base_model_id": None,
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    }  # fmt: skip
    base = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    assert torch.allclose(probe_logits(merged.eval()), ckpts["lora_logits"], atol=1e-4)


# --------------------------------------------------------------------------- defective images


def test_every_checkpoint_answers_the_same_usable_records(
    ckpts, tmp_path, capsys, tiny_model_dir, tiny_finetuned_dir, synth_dir, synth_split
):
    """A 0-byte, non-image or 10000x3 image is a counted skip in run_inference.py, not a crash."""
    root = tmp_path / "root"
    shutil.copytree(synth_dir, root)
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "notes.jpg").write_text("not an image")
    Image.new("RGB", (10000, 3)).save(root / "images" / "wide.png")
    good = json.loads(synth_split[1].read_text())
    bad = [
        {**good[0], "id": f"bad-{n}", "image": [f"images/{n}"]}
        for n in ("empty.jpg", "notes.jpg", "wide.png")
    ]
    data = tmp_path / "test.json"
    data.write_text(json.dumps([good[0], bad[0], good[1], bad[1], bad[2], *good[2:6]]))
    argv = ["--model_path", str(tiny_finetuned_dir), "--base_model", str(tiny_model_dir)]
    argv += [
        "--data_file",
        str(data),
        "--image_root",
        str(root),
        "--max_samples",
        "4",
        "--max_new_tokens",
        "3",
    ]
    argv += ["--output_dir", str(tmp_path / "report"), "--progress", "false"]
    assert run_inference.main(argv) == 0
    out = capsys.readouterr().out
    assert "Running inference on 4 sample(s) (3 skipped: defective images, see the log)" in out
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["checkpoints"]
    assert [(r["label"], r["samples"], r["skipped_images"]) for r in rows] == [
        ("base", 4, 3),
        ("fine-tuned", 4, 3),
    ]
    answered = [json.loads(x)["id"] for x in (tmp_path / "report" / "answers.jsonl").read_text().splitlines()]
    assert answered == [r["id"] for r in good[:4]]
