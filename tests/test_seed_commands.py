"""The seed README's run_inference.py commands, run as written, offline, from the folder they assume.

    .venv/bin/python -m pytest tests/test_seed_commands.py -q

The original example's README (NVFlare's examples/advanced/qwen3-vl) documents three inference
commands; each runs here character for character in a fresh folder laid out as they assume, with
relative paths: ``./data/site-1/train.json``, ``./PubMedVision/images/...`` and the tiny model where the
README names ``Qwen/Qwen3-VL-2B-Instruct`` (a local folder of that name, which transformers prefers
over the hub). The hub is out of reach (``HF_HUB_OFFLINE=1``, an empty ``HF_HOME``): a command that
needed it (a base row from the hub, say) fails here.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3vl_sft.config import ModelConfig
from qwen3vl_sft.data import synthetic
from qwen3vl_sft.model.checkpoints import write_hf_directory
from qwen3vl_sft.model.modeling import load_model
from qwen3vl_sft.model.weights import exchanged_state

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "Qwen/Qwen3-VL-2B-Instruct"
# Verbatim from the seed README ("Inference (before/after comparison)").
SEED_BASE = """python run_inference.py --model_path Qwen/Qwen3-VL-2B-Instruct \\
  --data_file ./data/site-1/train.json --image_root ./PubMedVision --max_samples 1"""
SEED_OPTION_A = """python run_inference.py --model_path /tmp/nvflare/simulation/qwen3-vl/server/simulate_job/app_server/FL_global_model.pt \\
  --base_model Qwen/Qwen3-VL-2B-Instruct \\
  --data_file ./data/site-1/train.json --image_root ./PubMedVision --max_samples 1"""
SEED_OPTION_B = """python run_inference.py --model_path ./path/to/checkpoint-xxx \\
  --data_file ./data/site-1/train.json --image_root ./PubMedVision --max_samples 1"""
# The one substitution: Option A's server workspace, made relative to the test's folder.
SEED_PT = "/tmp/nvflare/simulation/qwen3-vl/server/simulate_job/app_server/FL_global_model.pt"
LOCAL_PT = "./nvflare/simulation/qwen3-vl/server/simulate_job/app_server/FL_global_model.pt"


@pytest.fixture(scope="module")
def trained_state(tiny_finetuned_dir) -> dict[str, torch.Tensor]:
    """What the server holds after a full-fine-tuning job: the exchanged tensors, bf16."""
    return exchanged_state(load_model(ModelConfig(model_name_or_path=str(tiny_finetuned_dir))))


@pytest.fixture()
def seed_dir(tmp_path) -> Path:
    """./PubMedVision (records + images/) and ./data/site-1/train.json, as the seed's steps leave them."""
    synthetic.generate(tmp_path / "PubMedVision", synthetic.SyntheticSpec(num_records=6, seed=5))
    records = json.loads((tmp_path / "PubMedVision" / synthetic.DATA_FILE_NAME).read_text(encoding="utf-8"))
    (tmp_path / "data" / "site-1").mkdir(parents=True)
    (tmp_path / "data" / "site-1" / "train.json").write_text(json.dumps(records), encoding="utf-8")
    return tmp_path


def run_seed(command: str, cwd: Path) -> tuple[str, list[str]]:
    """Run a README command in ``cwd`` with the hub unreachable; (stdout, its describe lines)."""
    argv = shlex.split(command.replace("\\\n", " ").replace(SEED_PT, LOCAL_PT))  # a shell's line continuation
    assert argv[:2] == ["python", "run_inference.py"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cwd / "hf_home"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "run_inference.py"), *argv[2:], "--progress", "false"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    sample = out[out.index("--- Sample 1 ---") :].splitlines()
    assert "Running inference on 1 sample(s)" in out and "--- Sample 2 ---" not in out
    assert sample[1].startswith(f"Image: {cwd / 'PubMedVision' / 'images'}/")
    assert sample[2].startswith("Q: ") and sample[3].startswith("Ground truth: ")
    rows = [line for line in out.splitlines() if line.startswith(("base: ", "fine-tuned: "))]
    return out, rows


def model_lines(out: str) -> list[str]:
    sample = out[out.index("--- Sample 1 ---") :].split("\n\n")[0].splitlines()
    return [line.split(":")[0] for line in sample[4:]]


def test_base_model_command(seed_dir, tiny_model_dir):
    shutil.copytree(tiny_model_dir, seed_dir / HUB_ID)  # the model the README names, as a local folder
    out, rows = run_seed(SEED_BASE, seed_dir)
    assert rows == [f"fine-tuned: {HUB_ID} (hf)"]
    assert "records no base model and --base_model is not set, so it is evaluated alone" in out
    assert model_lines(out) == ["Model"]  # the seed's own "Model:        <answer>" line


def test_option_a_nvflare_global_model_pt(seed_dir, trained_state, tiny_model_dir):
    shutil.copytree(tiny_model_dir, seed_dir / HUB_ID)
    pt = seed_dir / LOCAL_PT
    pt.parent.mkdir(parents=True)
    meta = {"base_model": HUB_ID, "lora": None, "round": 2}  # as fl.server writes it
    torch.save({"model": trained_state, "meta": meta}, pt)
    out, rows = run_seed(SEED_OPTION_A, seed_dir)
    assert rows == [f"base: {HUB_ID} (hf)", f"fine-tuned: {LOCAL_PT} (pt-full, base {HUB_ID})"]
    assert model_lines(out) == ["Model [base]", "Model [fine-tuned]"]


def test_option_b_checkpoint_dir_without_a_recorded_base_runs_alone(seed_dir, tiny_finetuned_dir):
    """An HF directory that records no base runs alone: no base row is fetched from the hub."""
    shutil.copytree(tiny_finetuned_dir, seed_dir / "path" / "to" / "checkpoint-xxx")  # save_pretrained output
    out, rows = run_seed(SEED_OPTION_B, seed_dir)
    assert rows == ["fine-tuned: ./path/to/checkpoint-xxx (hf)"]
    assert "records no base model" in out and model_lines(out) == ["Model"]


def test_option_b_servers_hf_directory_brings_its_base(seed_dir, trained_state, tiny_model_dir):
    """The server's global_model_hf/ names its base in fl_checkpoint.json: the base row comes from there.
    (Its LoRA form, a PEFT adapter directory: test_run_inference.py::test_base_row_is_what_the_checkpoint...)"""
    base = seed_dir / "models" / "qwen3-vl-tiny"
    shutil.copytree(tiny_model_dir, base)
    write_hf_directory(
        trained_state, ModelConfig(model_name_or_path=str(base)), seed_dir / "path/to/checkpoint-xxx"
    )
    out, rows = run_seed(SEED_OPTION_B, seed_dir)
    assert rows == [f"base: {base} (hf)", "fine-tuned: ./path/to/checkpoint-xxx (hf)"]
    assert model_lines(out) == ["Model [base]", "Model [fine-tuned]"]
