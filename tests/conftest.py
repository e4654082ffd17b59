"""Shared fixtures: the offline tiny Qwen3-VL and synthetic PubMedVision data, built once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hang_watch import watch_for_hang

from qwen3vl_sft.data import synthetic
from qwen3vl_sft.model import tiny

# One compute thread for in-process tests: the tiny model gains little from two, and OpenMP threads
# spinning against other processes on a 2-core machine made timings swing several-fold (measured).
torch.set_num_threads(1)

# Every Python a test starts (NVFlare's server and workers, torchrun, trainers) inherits this: on the hang
# watch's SIGABRT each prints the stack of every thread, so a stuck run says where it is stuck.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
# The slowest phase takes ~110 s in CI (a production test; the real-width test builds its model in ~15 s
# and trains in ~35 s); pytest-timeout (900 s) stays the last resort.
HANG_SECONDS = float(os.environ.get("TEST_HANG_SECONDS", "480"))


def watched(item, phase: str):
    """Run a test's phase under the hang watch (tests/hang_watch.py); past HANG_SECONDS it fails."""
    root = Path(item.config._tmp_path_factory.getbasetemp())  # pytest's tmp folders: where the logs are
    with watch_for_hang(f"{item.nodeid} ({phase})", root, HANG_SECONDS) as fired:
        result = yield
    if fired:
        pytest.fail(f"hang watch: the {phase} ran past {HANG_SECONDS:.0f} s and was ended; its report (processes, "
                    "their stacks, the newest logs) is in the captured stderr", pytrace=False)  # fmt: skip
    return result


# Each phase, not only the test function: module and session fixtures (a job run once for several tests)
# are set up inside the first test's setup phase. trylast: inside pytest's capture, so the report is shown.
@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_setup(item):
    return (yield from watched(item, "setup"))


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item):
    return (yield from watched(item, "call"))


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item):
    return (yield from watched(item, "teardown"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The compact tiny checkpoint (built once; tests must not modify it)."""
    return tiny.build(tmp_path_factory.mktemp("models") / "qwen3-vl-tiny")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A 200-record synthetic data set (with multi-image and multi-turn records)."""
    out = tmp_path_factory.mktemp("data") / "PubMedVision_synth"
    synthetic.generate(out, synthetic.SyntheticSpec(num_records=200, seed=3))
    return out


@pytest.fixture(scope="session")
def synth_file(synth_dir) -> Path:
    return synth_dir / synthetic.DATA_FILE_NAME


@pytest.fixture()
def write_records(tmp_path):
    """Write records as a JSON array next to a copy-free image root; returns the file path."""

    def write(records: list[dict], name: str = "records.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(records), encoding="utf-8")
        return path

    return write


# --------------------------------------------------------------------------- fine-tuned tiny model (evaluation tests)

HELD_OUT_RECORDS = 40


@pytest.fixture(scope="session")
def shards(synth_file, tmp_path_factory) -> Path:
    """synth_file split over 3 sites by prepare_data (the FL tests' data; tests copy it to change it)."""
    from qwen3vl_sft.config import PrepareDataConfig
    from qwen3vl_sft.data.prepare import prepare_shards

    out = tmp_path_factory.mktemp("shards")
    prepare_shards(PrepareDataConfig(data_file=str(synth_file), output_dir=str(out), num_sites=3))
    return out


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    """The tiny model's processor (read-only in tests)."""
    from qwen3vl_sft.config import DataConfig
    from qwen3vl_sft.model.modeling import load_processor

    return load_processor(str(tiny_model_dir), DataConfig())


@pytest.fixture(scope="session")
def synth_split(synth_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(train.json, test.json): synth_dir's records, the last 40 held out; images stay under synth_dir."""
    records = json.loads((synth_dir / synthetic.DATA_FILE_NAME).read_text(encoding="utf-8"))
    out = tmp_path_factory.mktemp("split")
    train, test = out / "train.json", out / "test.json"
    train.write_text(json.dumps(records[:-HELD_OUT_RECORDS]), encoding="utf-8")
    test.write_text(json.dumps(records[-HELD_OUT_RECORDS:]), encoding="utf-8")
    return train, test


@pytest.fixture(scope="session")
def tiny_finetuned_dir(tiny_model_dir, synth_dir, synth_split, tmp_path_factory) -> Path:
    """tiny_model_dir after 30 SFT steps on synth_split's train.json, saved as an HF directory.

    30 steps (lr 2e-3, batch 8, ~10 s) teach the answer vocabulary ("upper left", ...), enough to beat
    the untrained base on held-out loss, ROUGE-L and exact match; not enough to read the images well.
    """
    from qwen3vl_sft.config import DataConfig, ModelConfig, TrainConfig
    from qwen3vl_sft.train.engine import RunConfig, SFTEngine

    out = tmp_path_factory.mktemp("models") / "qwen3-vl-tiny-sft"
    config = RunConfig(
        ModelConfig(model_name_or_path=str(tiny_model_dir)),
        DataConfig(data_path=str(synth_split[0]), image_root=str(synth_dir), dataloader_num_workers=0),
        TrainConfig(
            output_dir=str(out),
            learning_rate=2e-3,
            per_device_train_batch_size=8,
            max_steps=30,
            logging_steps=100,
            disable_progress_bar=True,
        ),
    )
    engine = SFTEngine(config)
    engine.train_round()
    engine.model.save_pretrained(out)
    engine.processor.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- data shaped like the field


@pytest.fixture(scope="session")
def realistic_dir(tmp_path_factory) -> Path:
    """160 records in the synthetic generator's realistic mode: paragraph answers, varied image sizes
    and formats, a few defective images, duplicates and records sharing an image."""
    out = tmp_path_factory.mktemp("data") / "PubMedVision_realistic"
    synthetic.generate(out, synthetic.SyntheticSpec(num_records=160, seed=5, realistic=True))
    return out


@pytest.fixture(scope="session")
def realistic_shards(realistic_dir, tmp_path_factory) -> Path:
    """realistic_dir split over 2 sites by prepare_data (with its val.json and test.json)."""
    from qwen3vl_sft.config import PrepareDataConfig
    from qwen3vl_sft.data.prepare import prepare_shards

    out = tmp_path_factory.mktemp("realistic_shards")
    data_file = realistic_dir / synthetic.DATA_FILE_NAME
    prepare_shards(PrepareDataConfig(data_file=str(data_file), output_dir=str(out), num_sites=2))
    return out
