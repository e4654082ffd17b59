"""Security: weights never unpickle code, no remote code runs by default, secrets stay out of job files.

=============================================  ===============================================================
Requirement                                    Test
=============================================  ===============================================================
weights load only via safetensors or           test_every_torch_load_is_weights_only (source scan),
torch.load(weights_only=True)                  test_a_checkpoint_that_runs_code_is_refused_everywhere
no trust_remote_code=True                      test_no_remote_code_is_trusted_by_default (source scan)
image paths confined to the image root         test_records.py::test_resolve_image_path_confines_paths,
                                               test_bad_inputs.py::test_escaping_image_path_is_skipped...
images size-checked before decoding            test_bad_inputs.py::test_huge_image_is_refused_from_its_header
secrets not in the exported job folder or      test_secrets_stay_out_of_an_exported_job
its configs
secrets not in logs, configs or models of a    test_faults.py::test_secrets_in_the_environment_never_reach...
running job                                    (a simulated job run with WANDB_API_KEY set)
=============================================  ===============================================================
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import job
from qwen3vl_sft.config import InferenceConfig, ModelConfig
from qwen3vl_sft.errors import DataError
from qwen3vl_sft.fl import resume

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "qwen3vl_sft").rglob("*.py"), *REPO.glob("*.py")])
SECRETS = {
    "WANDB_API_KEY": "wandb-secret-value-5f4dcc3b5aa765d6",
    "HF_TOKEN": "hf_secretTokenValue0123456789",
}


def calls(path: Path):
    """(function name as written, ast.Call) for every call in a source file."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"server.py", "loading.py", "checkpoints.py", "resume.py", "job.py", "run_inference.py"} <= names


def loads_unsafely(func: str, call: ast.Call) -> bool:
    """torch.load without a literal weights_only=True, pickle loads, or from_pretrained told to skip
    safetensors (its .bin path unpickles)."""
    safetensors = keyword(call, "use_safetensors")
    return (
        (func == "torch.load" and not is_true(keyword(call, "weights_only")))
        or func in {"pickle.load", "pickle.loads", "torch.serialization.load"}
        or (isinstance(safetensors, ast.Constant) and safetensors.value is False)
    )


def test_every_torch_load_is_weights_only():
    offenders = [
        f"{path.name}:{call.lineno}: {ast.unparse(call)}"
        for path in SOURCES
        for func, call in calls(path)
        if loads_unsafely(func, call)
    ]
    assert offenders == []
    found = [call for path in SOURCES for func, call in calls(path) if func == "torch.load"]
    assert len(found) >= 1  # the scan sees the loads it is meant to check


def test_no_remote_code_is_trusted_by_default():
    offenders = [
        f"{path.name}:{call.lineno}"
        for path in SOURCES
        for _, call in calls(path)
        if is_true(keyword(call, "trust_remote_code"))
    ]
    assert offenders == []
    assert ModelConfig().trust_remote_code is False and InferenceConfig().trust_remote_code is False


class RunsCode:
    """Unpickling this object calls ``open(marker, "w")``: a stand-in for any code a .pt could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_runs_code_is_refused_everywhere(tiny_model_dir, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "FL_global_model.pt"
    torch.save({"model": {"w": torch.ones(1)}, "meta": {"round": 0}, "x": RunsCode(marker)}, path)
    from qwen3vl_sft.eval.loading import Checkpoint, CheckpointError, detect, read_weights_file

    with pytest.raises(CheckpointError, match="weights_only"):
        read_weights_file(
            path
        )  # the one reader of .pt files (eval/loading.py; model/checkpoints.py and fl/resume.py call it)
    with pytest.raises(DataError, match="--resume: .*weights_only"):
        resume.completed_rounds(path)  # job.py --resume
    with pytest.raises(CheckpointError, match="weights_only"):
        detect(
            Checkpoint("x", str(path)), InferenceConfig(base_model=str(tiny_model_dir))
        )  # run_inference.py
    from fault_hooks import standalone_persistor

    persistor = standalone_persistor(str(tiny_model_dir), str(tmp_path / "app"))[0]
    assert persistor.load_weights_only is True  # NVFlare's torch.load of --resume's source checkpoint
    assert not marker.exists()


def test_secrets_stay_out_of_an_exported_job(tiny_model_dir, tmp_path, monkeypatch, capsys):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    for i in (1, 2):
        (tmp_path / "data" / f"site-{i}").mkdir(parents=True)
        (tmp_path / "data" / f"site-{i}" / "train.json").write_text("[]")
    export = tmp_path / "exported"
    job.main(["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(tmp_path / "data"), "--num_sites", "2",
              "--wandb", "true", "--export_dir", str(export)])  # fmt: skip
    assert "Job exported" in capsys.readouterr().out
    files = [p for p in export.rglob("*") if p.is_file()]
    configs = [p for p in files if p.suffix == ".json"]
    assert configs and any("WandBReceiver" in p.read_text() for p in configs)  # tracking is configured...
    assert any('"mode": "online"' in p.read_text() for p in configs)  # ...and saw the key in the env...
    leaked = [str(p) for p in files for value in SECRETS.values() if value.encode() in p.read_bytes()]
    assert leaked == []  # ...but wrote no secret anywhere (configs, package copy, scripts)
    assert json.loads(next(p for p in configs if p.name == "meta.json").read_text())
