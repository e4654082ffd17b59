"""The official Qwen3-VL backend, run against a tests-only fake clone (tests/fake_qwen3vl).

    .venv/bin/python -m pytest tests/test_official.py -q

The fake reproduces upstream's layout and call contract under transformers 5 on CPU and records what
it loaded in ``output/fake_run.json``; the tiny ``qwen-ids`` checkpoint has the token ids upstream's
label masking hard-codes, so a round really trains.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen3vl_sft.config import BackendConfig, DataConfig, JobConfig, ModelConfig, TrainConfig
from qwen3vl_sft.data import synthetic
from qwen3vl_sft.data.records import ensure_image_placeholders
from qwen3vl_sft.fl.client import SiteRunner, validate_weights
from qwen3vl_sft.model import tiny
from qwen3vl_sft.model.weights import exchanged_names, meta_model
from qwen3vl_sft.train import official_launch
from qwen3vl_sft.train.engine import RunConfig
from qwen3vl_sft.train.official import (
    Environment,
    OfficialBackend,
    OfficialBackendError,
    from_config,
    model_dir_for,
    run_logged,
    upstream_arguments,
    upstream_model_type,
)

FAKE_ROOT = Path(__file__).parent / "fake_qwen3vl"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.build(tmp_path_factory.mktemp("models") / "tiny-qwen-ids", variant="qwen-ids")


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> tuple[Path, Path]:
    """(train.json of site-1, image root): 4 single-image records with <image> placeholders."""
    root = tmp_path_factory.mktemp("data")
    spec = synthetic.SyntheticSpec(num_records=4, multi_image_fraction=0.0, multi_turn_fraction=0.0)
    source = synthetic.generate(root / "synth", spec)
    records = [ensure_image_placeholders(r) for r in json.loads(source.read_text())]
    train_json = root / "site-1" / "train.json"
    train_json.parent.mkdir()
    train_json.write_text(json.dumps(records))
    return train_json, source.parent


@pytest.fixture
def config(tiny_model, site_data) -> RunConfig:
    train_json, image_root = site_data
    return RunConfig(
        model=ModelConfig(
            model_name_or_path=str(tiny_model), dtype="float32"
        ),  # same flags with or without CUDA
        data=DataConfig(data_path=str(train_json), image_root=str(image_root), dataloader_num_workers=0),
        train=TrainConfig(
            learning_rate=1e-3,
            per_device_train_batch_size=1,
            max_steps=1,
            warmup_ratio=0.0,  # with one step, any warm-up would make the only step a zero-lr step
            logging_steps=1,
            disable_progress_bar=True,
        ),
    )


@pytest.fixture
def process_group(tmp_path, monkeypatch):
    """A one-process gloo group, as a torchrun-launched client has (upstream's train() needs one)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # in-process mode puts the clone on sys.path
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
        )
    yield
    if created:
        torch.distributed.destroy_process_group()
    for name, module in list(sys.modules.items()):  # the fake's generic names (trainer, ...) must not leak
        origin = getattr(getattr(module, "__spec__", None), "origin", None) or ""
        if name.split(".")[0] == "qwenvl" or str(FAKE_ROOT) in origin:
            del sys.modules[name]


def start_weights(model_dir: Path, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """The base checkpoint's exchanged tensors, shifted by seeded noise, in bf16 (what a server sends)."""
    base = load_file(str(model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    return {n: (base[n] + 0.05 * torch.randn(base[n].shape, generator=gen)).to(torch.bfloat16) for n in names}


def fake_record(backend: OfficialBackend) -> dict:
    return json.loads((backend.checkpoints_dir / "output" / "fake_run.json").read_text())


def assert_fake_loaded(record: dict, weights: dict[str, torch.Tensor]) -> None:
    for name, tensor in weights.items():
        assert math.isclose(
            record["param_sums"][name], float(tensor.double().sum()), rel_tol=1e-9, abs_tol=1e-9
        ), name


def flag(record: dict, name: str) -> str:
    argv = record["argv"]
    return argv[argv.index(f"--{name}") + 1]


def test_in_process_rounds_train_from_received_weights_and_clean_between_rounds(
    config, tiny_model, site_data, tmp_path, process_group, caplog
):
    caplog.set_level("INFO", logger="qwen3vl_sft.train.official")
    backend = OfficialBackend(config, root=str(FAKE_ROOT), work_dir=tmp_path / "ws", dataset_name="site-1")
    assert backend.mode == "in_process"
    assert "in-process mode (the clone's imports all resolve in this interpreter)" in caplog.text
    names = exchanged_names(meta_model(config.model))
    start = start_weights(tiny_model, names, seed=0)

    result = backend.train_round(start, round_index=0, num_rounds=2)

    assert list(result.weights) == names
    # In the dtype the clone saved (the tiny checkpoint's: fp32), and the round's start as it was written
    # for the clone: the update is measured from there, so rounding on the way in is not sent back.
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in result.weights.values())
    assert all(torch.equal(result.start[n], start[n].float()) for n in names)
    record = fake_record(backend)
    assert_fake_loaded(record, start)
    assert any(not torch.equal(result.weights[n], start[n]) for n in names), (
        "one optimizer step changed nothing"
    )
    # The directory upstream loaded: "qwen3" in the path, no "a" in its name -> the dense class.
    loaded = record["model_name_or_path"]
    assert record["model_class"] == "Qwen3VLForConditionalGeneration"
    assert "qwen3" in loaded.lower() and "a" not in Path(loaded).name.lower()
    assert Path(loaded).parent == tmp_path / "ws" / "qwen3vl_checkpoints"
    train_json, image_root = site_data
    assert record["datasets"] == [
        {"annotation_path": str(train_json), "data_path": str(image_root), "sampling_rate": 1.0}
    ]
    expected = {"dataset_use": "site-1", "learning_rate": "0.001", "max_steps": "1", "save_strategy": "no"}
    expected |= {"tune_mm_vision": "False", "tune_mm_llm": "True", "data_flatten": "False", "bf16": "False"}
    assert {k: flag(record, k) for k in expected} == expected
    state = json.loads((backend.checkpoints_dir / "output" / "trainer_state.json").read_text())
    assert result.metrics["train_loss"] == state["log_history"][-1]["train_loss"] > 0
    assert (result.metrics["steps"], result.metrics["samples"]) == (1, 1)

    # Round 2 must start from a clean directory: the fake raises on a leftover checkpoint-*.
    (backend.checkpoints_dir / "output" / "checkpoint-7").mkdir()
    (backend.checkpoints_dir / "stale.txt").write_text("from round 1")
    second = start_weights(tiny_model, names, seed=1)
    backend.train_round(second, round_index=1, num_rounds=2)
    assert not (backend.checkpoints_dir / "stale.txt").exists()
    assert_fake_loaded(fake_record(backend), second)


@pytest.fixture(scope="module")
def clone_env_python(tmp_path_factory) -> Path:
    """A separate, bare venv standing for the environment built for the clone.

    Its site-packages holds links to our packages (what it needs to run the fake), under its own
    prefix; the fake clone refuses to run when any *other* environment's site-packages is on sys.path.
    """
    root = tmp_path_factory.mktemp("envs") / "qwen3vl"
    venv.create(root, with_pip=False, symlinks=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = root / "lib" / version / "site-packages"
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)
    return root / "bin" / "python"


def test_subprocess_round_in_another_python_gets_a_path_of_its_own(
    config, tiny_model, tmp_path, clone_env_python, monkeypatch, caplog
):
    """Bug fixed here: the child inherited PYTHONPATH, into which NVFlare copies the parent's whole
    sys.path, so the clone's python imported our site-packages (transformers 5) instead of its own."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # what NVFlare gives the processes it starts
    caplog.set_level("INFO", logger="qwen3vl_sft.train.official")
    backend = OfficialBackend(
        config, root=str(FAKE_ROOT), python=str(clone_env_python), work_dir=tmp_path / "ws"
    )
    assert backend.mode == "subprocess" and not backend.env.current
    assert "subprocess mode (the clone's environment is another interpreter" in caplog.text
    assert "flash-attn absent (import-only stand-in)" in caplog.text  # the fake imports it, like upstream
    names = exchanged_names(meta_model(config.model))
    start = start_weights(tiny_model, names, seed=2)

    result = backend.train_round(start)

    assert list(result.weights) == names
    record = fake_record(backend)
    assert record["python_prefix"] == str(clone_env_python.parent.parent)
    assert_fake_loaded(record, start)
    assert record["world_size"] == 1  # started by torchrun, process group set up
    log = (tmp_path / "ws" / "qwen3vl_logs" / "round-0.log").read_text()
    assert "train_loss" in log and "[qwen3vl]" in caplog.text
    assert result.metrics["steps"] == 1 and math.isfinite(result.metrics["train_loss"])


def test_flash_attn_stand_in_satisfies_imports_and_refuses_calls():
    """Without flash-attn the clone's module-level import works; a call names what to do; transformers
    still sees no flash-attn. Run in a fresh interpreter: the stand-in must not leak into this one."""
    code = (
        "import importlib.metadata, sys; sys.path.insert(0, sys.argv[1]); import official_launch as ol\n"
        "assert ol.stand_in_for_flash_attn() and not ol.stand_in_for_flash_attn()\n"
        "from flash_attn.flash_attn_interface import flash_attn_varlen_func\n"
        "import flash_attn; assert not hasattr(flash_attn, '__version__') and not ol.flash_attn_available()\n"
        "from transformers.utils import is_flash_attn_2_available; assert not is_flash_attn_2_available()\n"
        "flash_attn_varlen_func(1, 2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(official_launch.__file__).parent)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "RuntimeError: flash_attn.flash_attn_varlen_func was called, but flash-attn is not"
    )
    assert "data_flatten" in last and "sdpa" in last


TORCHRUN_FAILURE = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "/srv/qwen3vl_checkpoints/official_launch.py", line 250, in <module>
[rank0]:     raise ValueError(f"Tokenizer class {name} does not exist or is not currently imported.")
[rank0]: ValueError: Tokenizer class TokenizersBackend does not exist or is not currently imported.
E1202 06:00:00.000000 123 torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: 1)
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
/srv/qwen3vl_checkpoints/official_launch.py FAILED
------------------------------------------------------------
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_failing_torchrun_is_reported_by_its_workers_exception_line(tmp_path):
    """Bug fixed here: torchrun's "[rank0]: ValueError: ..." lines were missed and the error read
    "exit code 1: =====...": the worker's exception and the log path it is in must be the message."""
    command = [sys.executable, "-c", f"import sys; sys.stdout.write({TORCHRUN_FAILURE!r}); sys.exit(1)"]
    log = tmp_path / "logs" / "round-0.log"
    with pytest.raises(OfficialBackendError) as err:
        run_logged(command, dict(os.environ), tmp_path, log)
    assert str(err.value) == (
        "official Qwen3-VL training failed (exit code 1): ValueError: Tokenizer class TokenizersBackend "
        f"does not exist or is not currently imported.; log: {log}"
    )
    assert log.read_text() == TORCHRUN_FAILURE


def test_every_site_works_in_a_folder_of_its_own(config, tmp_path, monkeypatch):
    """Bug fixed here: one --work_dir for the job made co-located sites share launch.json and model,
    so every site trained on the data of whichever wrote last."""
    monkeypatch.chdir(tmp_path)
    from qwen3vl_sft.fl import job as fl_job

    shared = BackendConfig(backend="official", qwen3vl_root=str(FAKE_ROOT), work_dir="work")
    site_backends = fl_job.site_backends(JobConfig(num_sites=2), shared, taken=[29500, 29501])
    assert {b.work_dir for b in site_backends} == {str(tmp_path / "work")}  # made absolute where typed
    backends = [from_config(config, b, site=f"site-{i + 1}") for i, b in enumerate(site_backends)]
    dirs = [b.checkpoints_dir for b in backends]
    assert dirs == [
        tmp_path / "work" / "site-1" / "qwen3vl_checkpoints",
        tmp_path / "work" / "site-2" / "qwen3vl_checkpoints",
    ]
    assert [b.dataset_name for b in backends] == ["site-1", "site-2"]
    default = from_config(
        config, BackendConfig(backend="official", qwen3vl_root=str(FAKE_ROOT)), site="site-1"
    )
    assert default.checkpoints_dir == tmp_path / "site-1" / "qwen3vl_checkpoints"


def test_official_rounds_report_the_builtin_validation_metrics_of_the_received_model(
    config, tiny_model, site_data, tmp_path, process_group, monkeypatch
):
    """The clone evaluates nothing: the received global is scored by our evaluator before training."""
    monkeypatch.chdir(tmp_path)
    train_json, _ = site_data
    config.data.eval_data_path = str(train_json)
    backend = BackendConfig(backend="official", qwen3vl_root=str(FAKE_ROOT))
    runner = SiteRunner(config, "site-1", rank=0, backend=backend)
    received = start_weights(tiny_model, exchanged_names(meta_model(config.model)), seed=4)

    result = runner.round(received, current_round=0, total_rounds=1)

    expected = validate_weights(config, received)  # the same model scored again: the same figures
    assert {k: v for k, v in result.metrics.items() if k.startswith("val_") and k != "val_seconds"} == {
        k: v for k, v in expected.items() if k != "val_seconds"
    }
    assert expected["val_samples"] == 4 and math.isfinite(expected["val_loss"])
    base = validate_weights(config, start_weights(tiny_model, list(received), seed=5))
    assert base["val_loss"] != expected["val_loss"]  # it scores the weights it is given
    assert result.metrics["steps"] == 1


def test_failing_child_raises_with_the_log_path(config, tmp_path):
    clone = tmp_path / "broken-clone"
    shutil.copytree(FAKE_ROOT, clone)
    entry = clone / "qwen-vl-finetune" / "qwenvl" / "train" / "train_qwen.py"
    entry.write_text(
        'def train(attn_implementation="flash_attention_2"):\n    raise RuntimeError("simulated OOM")\n'
    )
    backend = OfficialBackend(config, root=str(clone), work_dir=tmp_path / "ws", mode="subprocess")
    log = tmp_path / "ws" / "qwen3vl_logs" / "round-3.log"
    with pytest.raises(OfficialBackendError, match="exit code 1") as err:
        backend.train_round(round_index=3)
    assert "RuntimeError: simulated OOM" in str(err.value) and str(log) in str(err.value)
    assert "\n" not in str(err.value)
    assert "simulated OOM" in log.read_text()


def test_missing_or_wrong_clone_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.delenv("QWEN3VL_ROOT", raising=False)
    with pytest.raises(OfficialBackendError) as err:
        OfficialBackend(RunConfig())
    assert "QWEN3VL_ROOT" in str(err.value) and "--qwen3vl_root" in str(err.value)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("QWEN3VL_ROOT", str(tmp_path))
    with pytest.raises(OfficialBackendError, match=f"{tmp_path} is not a clone of QwenLM/Qwen3-VL"):
        OfficialBackend(RunConfig())


def test_incompatible_environment_names_the_failing_imports(config, tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(FAKE_ROOT, clone)
    trainer = clone / "qwen-vl-finetune" / "qwenvl" / "train" / "trainer.py"
    # What upstream's trainer.py imports and fails under transformers 5 (flash-attn, absent here, is
    # not held against the environment: the launcher's stand-in satisfies its import).
    trainer.write_text(
        trainer.read_text()
        + "from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_multimodal_rotary_pos_emb\n"
    )
    with pytest.raises(OfficialBackendError) as err:
        OfficialBackend(config, root=str(clone), work_dir=tmp_path)
    message = str(err.value)
    assert (
        "apply_multimodal_rotary_pos_emb" in message and "\n" not in message and "flash_attn" not in message
    )
    assert "install_requirements.sh --official ENV_DIR" in message and "--qwen3vl_python" in message


def test_path_name_rule_picks_the_checkpoint_class():
    parent = Path("/srv/site-1/qwen3vl_checkpoints")
    dense, moe = model_dir_for(parent, "qwen3_vl"), model_dir_for(parent, "qwen3_vl_moe")
    assert "a" not in dense.name and "a" in moe.name
    assert (upstream_model_type(dense), upstream_model_type(moe)) == ("qwen3_vl", "qwen3_vl_moe")
    assert upstream_model_type("/m/Qwen3-VL-30B-A3B-Instruct/") == "qwen3_vl_moe"
    assert upstream_model_type("/m/Qwen3-VL-2B-Instruct") == "qwen3_vl"
    assert upstream_model_type("/data/base_model") == "qwen2_vl"


def test_upstream_arguments_follow_the_target_environment(config):
    config.model.dtype = "auto"  # bf16 when the clone's environment has CUDA
    gpu_env = Environment(
        python="/env/bin/python", current=False, versions={"transformers": "4.57.0.dev0"}, cuda=True
    )
    argv = upstream_arguments(config, Path("/w/m"), Path("/w/o"), "site-2", gpu_env, "flash_attention_2")
    args = dict(zip(argv[::2], argv[1::2], strict=True))
    assert args["--warmup_ratio"] == "0.0" and "--warmup_steps" not in args
    assert (args["--bf16"], args["--fp16"], args["--data_flatten"]) == ("True", "False", "True")
    assert (args["--max_pixels"], args["--min_pixels"], args["--model_max_length"]) == (
        "50176",
        "784",
        "8192",
    )
    assert "--gradient_checkpointing" not in args


def test_lora_is_refused_before_anything_runs(config):
    config.model.lora = True
    with pytest.raises(OfficialBackendError, match="--lora"):
        OfficialBackend(config, root=str(FAKE_ROOT))


def test_shards_without_image_root_find_their_images_where_the_engine_does(
    config, shards, synth_dir, tmp_path
):
    """Bug fixed here: without --image_root the backend looked for images beside the shard
    (data/site-N/), not where prepare_data's manifest.json says they are, as the engine does."""
    config.data = DataConfig(data_path=str(shards / "site-1" / "train.json"), dataloader_num_workers=0)
    backend = OfficialBackend(config, root=str(FAKE_ROOT), work_dir=tmp_path / "ws")
    assert backend.image_root == synth_dir.resolve() != (shards / "site-1").resolve()


def test_job_gives_each_sites_child_torchrun_a_port_of_its_own():
    """Bug fixed here: an explicit --official_master_port was given to every site, so co-located
    sites' child torchruns collided."""
    from qwen3vl_sft.fl import job as fl_job

    job = JobConfig(num_sites=3, master_port_base=29500)
    for chosen, expected in ((0, [29600, 29601, 29602]), (40000, [40000, 40001, 40002])):
        backend = BackendConfig(backend="official", official_master_port=chosen)
        backends = fl_job.site_backends(job, backend, taken=[29500, 29501, 29502])
        assert [b.official_master_port for b in backends] == expected


@pytest.mark.slow
def test_federated_job_trains_each_site_on_its_own_data_in_the_clones_python(
    tiny_model, shards, clone_env_python, tmp_path, monkeypatch
):
    """job.py's recipe with --backend official in NVFlare's simulator (which puts its sys.path into
    the sites' PYTHONPATH), the clone's python a separate venv, one relative --work_dir for the job."""
    from sim_jobs import job_configs, run_sim_job

    monkeypatch.chdir(tmp_path)
    job, model, data, train = job_configs(tmp_path / "ws", tiny_model, shards, num_sites=2)
    job.num_rounds, train.max_steps, train.per_device_train_batch_size = 1, 1, 1
    backend = BackendConfig(
        backend="official", qwen3vl_root=str(FAKE_ROOT), qwen3vl_python=str(clone_env_python), work_dir="work"
    )
    summary = run_sim_job(job, model, data, train, backend=backend)

    rows = {r["site"]: r for r in summary.rows}
    assert set(rows) == {"site-1", "site-2"}
    for site, row in rows.items():
        launch = json.loads((tmp_path / "work" / site / "qwen3vl_checkpoints" / "launch.json").read_text())
        assert launch["annotation_path"] == str(shards / site / "train.json")
        record = json.loads(
            (tmp_path / "work" / site / "qwen3vl_checkpoints" / "output" / "fake_run.json").read_text()
        )
        assert (
            record["python_prefix"] == str(clone_env_python.parent.parent)
            and record["datasets"][0]["annotation_path"] == launch["annotation_path"]
        )
        assert row["steps"] == 1 and math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    assert rows["site-1"]["val_loss"] != rows["site-2"]["val_loss"]  # each scored on its own val.json
    assert (Path(summary.global_model_dir) / "model.safetensors").is_file()
