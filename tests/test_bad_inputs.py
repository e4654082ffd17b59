"""Bad inputs: each gets a one-line error naming the file, record or flag and the fix, or a counted skip.

The matrix of the reliability issue and the test covering each case (this file unless named):

===============================================  ==========================================================
Bad input                                        Test
===============================================  ==========================================================
malformed JSON / JSONL line                      test_records.py::test_malformed_inputs_raise_one_line_errors,
                                                 test_prepare_data.py::test_malformed_json_names_the_file_and_line
UTF-8 BOM (json and jsonl)                       test_records.py::test_every_format_loads_the_same_records...
                                                 (array-bom / jsonl-bom)
record with no conversations / no gpt turn /     test_records.py::test_check_record_reasons,
empty image list (counted skips)                 test_prepare_data.py::test_counted_skips_are_reported,
                                                 test_training_file_with_invalid_records_counts_them
no usable record at all                          test_training_file_without_usable_records_is_an_error
image missing                                    test_prepare_data.py::test_counted_skips_are_reported,
                                                 test_samples.py::test_missing_or_corrupt_image_is_a_skip...
0-byte image                                     test_zero_byte_image_is_a_counted_skip_naming_the_file
truncated JPEG                                   test_truncated_jpeg_is_a_counted_skip_naming_the_file
not-an-image file                                test_samples.py::test_missing_or_corrupt_image_is_a_skip...
30000x30000 image (decompression bomb)           test_huge_image_is_refused_from_its_header (3 cases)
image path escaping the image root               test_records.py::test_resolve_image_path_confines_paths,
                                                 test_records.py::test_image_index_reports_missing_and...,
                                                 test_escaping_image_path_is_skipped_without_opening_it
missing training file                            test_missing_training_file_names_prepare_data
--gpu malformed / not matching --num_sites /     test_job_flag_is_refused_with_one_line[gpu-*]
not matching --nproc_per_client
unknown site data dir (no site-N/train.json)     test_job_flag_is_refused_with_one_line[site-missing,
                                                 data-dir-missing]
--num_sites 0, --resume with nothing saved       test_job_flag_is_refused_with_one_line[num-sites-0, resume]
model dir that is not Qwen3-VL                   job.py: test_job_flag_is_refused_with_one_line[not-qwen3vl];
                                                 client start-up: test_client_refuses_a_model_that_is_not...;
                                                 run_inference: test_run_inference.py::test_paths_that_are...
job.py exit status and stderr                    test_job_exit_status_is_1_with_one_line_on_stderr
client start-up without its data file            test_client_without_its_data_file_names_prepare_data
checkpoint with no matching keys                 test_run_inference.py::test_pt_whose_keys_do_not_fit_is_refused,
                                                 test_engine.py::test_received_weights_load_strictly_by_name
output dir not writable                          test_prepare_data.py::test_output_dir_not_writable (+ without
                                                 write permission); run_inference:
                                                 test_run_inference_output_dir_not_writable
disk full while writing a shard                  test_prepare_data.py::test_disk_full_leaves_the_previous...;
disk full while saving the global model          test_faults.py::test_disk_full_while_saving_keeps_the_last...
===============================================  ==========================================================
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from image_files import png_header_only
from PIL import Image

import job
from qwen3vl_sft.config import DataConfig, ModelConfig
from qwen3vl_sft.data.samples import SampleBuilder, SkipSample, build_dataset
from qwen3vl_sft.errors import DataError
from qwen3vl_sft.model.modeling import ModelError

REPO = Path(__file__).resolve().parents[1]


def record(image: str, rid: str = "rec-1") -> dict:
    return {"id": rid, "image": [image], "conversations": [
        {"from": "human", "value": "<image>\nWhere is the lesion?"}, {"from": "gpt", "value": "upper left"}]}  # fmt: skip


def skip_reason(processor, root: Path, image: str, **data_kw) -> SkipSample:
    with pytest.raises(SkipSample) as skip:
        SampleBuilder(processor, DataConfig(**data_kw), root)(record(image))
    assert "\n" not in str(skip.value) and "rec-1" in str(skip.value)
    assert skip.value.kind == "image"  # counted toward max_bad_sample_fraction, never trained
    return skip.value


# --------------------------------------------------------------------------- training data loader


def test_zero_byte_image_is_a_counted_skip_naming_the_file(processor, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert str(tmp_path / "empty.jpg") in str(skip_reason(processor, tmp_path, "empty.jpg"))


@pytest.mark.parametrize("keep", [300, 0.5], ids=["cut-in-header", "cut-in-pixels"])
def test_truncated_jpeg_is_a_counted_skip_naming_the_file(keep, processor, tmp_path):
    jpeg = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(jpeg, "JPEG")  # noise: most bytes are pixels
    data = jpeg.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    message = str(skip_reason(processor, tmp_path, "cut.jpg"))
    assert str(tmp_path / "cut.jpg") in message and "runcated" in message


@pytest.mark.parametrize(
    ("size", "pil_guard", "fragment"),
    [
        ((30000, 30000), True, "decompression bomb"),  # PIL refuses > 179 M pixels at open
        ((30000, 30000), False, "30000x30000 pixels exceeds max_image_side 16384"),  # our check, guard off
        ((20000, 100), True, "20000x100 pixels exceeds max_image_side 16384"),  # few pixels, one long side
    ],
    ids=["bomb", "bomb-without-pil-guard", "long-side"],
)
def test_huge_image_is_refused_from_its_header(size, pil_guard, fragment, processor, tmp_path, monkeypatch):
    if not pil_guard:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # as some libraries set it
    (tmp_path / "huge.png").write_bytes(png_header_only(*size))
    assert fragment in str(skip_reason(processor, tmp_path, "huge.png"))


@pytest.mark.parametrize("escape", ["../outside.png", "/ABS/outside.png"], ids=["dotdot", "absolute"])
def test_escaping_image_path_is_skipped_without_opening_it(escape, processor, tmp_path, monkeypatch):
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    root.mkdir()
    Image.new("RGB", (64, 64)).save(outside)  # exists: only the confinement check can refuse it
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    image = escape.replace("/ABS", str(tmp_path))
    message = str(skip_reason(processor, root, image))
    assert "points outside the image root" in message and "--image_root" in message
    assert opened == []


def test_training_file_with_invalid_records_counts_them(processor, synth_dir, tmp_path, caplog):
    good = json.loads((synth_dir / "PubMedVision_InstructionTuning_VQA.json").read_text())[:2]
    bad = [
        {"id": "b1", "image": ["images/x.jpg"], "conversations": []},
        {"id": "b2", "image": ["images/x.jpg"], "conversations": [{"from": "human", "value": "q"}]},
        {"id": "b3", "image": [], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]  # fmt: skip
    path = tmp_path / "train.json"
    path.write_text(json.dumps([good[0], *bad, good[1]]))
    with caplog.at_level(logging.WARNING, logger="qwen3vl_sft.data.samples"):
        dataset = build_dataset(processor, DataConfig(image_root=str(synth_dir)), str(path))
    assert len(dataset) == 2
    expected = "{'no_conversations': 1, 'no_gpt_turn': 1, 'empty_image_list': 1}"
    assert f"{path}: skipped 3 invalid records {expected}" in caplog.text


def test_training_file_without_usable_records_is_an_error(processor, tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"id": "b1", "image": ["x.jpg"], "conversations": []}]))
    with pytest.raises(DataError, match=f"{path}: no usable records .*no_conversations"):
        build_dataset(processor, DataConfig(), str(path))


def test_missing_training_file_names_prepare_data(processor, tmp_path):
    with pytest.raises(
        DataError, match=f"data file {tmp_path / 'nope.json'} does not exist.*prepare_data.py"
    ):
        build_dataset(processor, DataConfig(), str(tmp_path / "nope.json"))


# --------------------------------------------------------------------------- job.py flags


@pytest.fixture(scope="module")
def site_dirs(tmp_path_factory) -> Path:
    """site-1..3/train.json: all job.py checks before the run look at (contents are read by sites)."""
    root = tmp_path_factory.mktemp("sites")
    for i in (1, 2, 3):
        (root / f"site-{i}").mkdir()
        (root / f"site-{i}" / "train.json").write_text("[]")
    return root


@pytest.fixture(scope="module")
def not_qwen(tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("bert")
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return model


JOB_CASES = {
    "gpu-malformed": (["--gpu", "[0],[1"], ["--gpu '[0],[1' is malformed", 'e.g. "[0],[1],[2]"']),
    "gpu-vs-num-sites": (["--gpu", "[0],[1]"], ["--gpu '[0],[1]' has 2 groups but --num_sites is 3"]),
    "gpu-vs-nproc": (["--gpu", "[0],[1],[2]", "--nproc_per_client", "2"], ["each group needs --nproc_per_client=2"]),
    "site-missing": (["--num_sites", "4"], ["site-4/train.json does not exist", "prepare_data.py --num_sites N"]),
    "data-dir-missing": (["--data_dir", "{tmp}/none"], ["none/site-1/train.json does not exist", "prepare_data.py"]),
    "num-sites-0": (["--num_sites", "0"], ["--num_sites must be at least 1, got 0"]),
    "resume": (["--resume", "true"], ["--resume: no FL_global_model.pt under", "nothing to resume"]),
    "not-qwen3vl": (["--model_name_or_path", "{bert}"], ["--model_name_or_path", "model_type 'bert' is not Qwen3-VL"]),
    "model-dir-missing": (["--model_name_or_path", "{tmp}/../no-model"], ["no-model: no such directory, and not a hub id"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_job_flag_is_refused_with_one_line(case, tiny_model_dir, site_dirs, not_qwen, tmp_path, capsys):
    extra, fragments = JOB_CASES[case]
    extra = [arg.format(tmp=tmp_path, bert=not_qwen) for arg in extra]
    argv = ["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(site_dirs), "--num_sites", "3",
            "--workspace", str(tmp_path / "ws"), *extra]  # fmt: skip
    # The refusal must come before anything is written. An exported job's data and model folders may be the
    # sites' alone (not on this machine), so a missing one is refused for a job run here only.
    if case not in {
        "gpu-malformed",
        "gpu-vs-num-sites",
        "gpu-vs-nproc",
        "data-dir-missing",
        "model-dir-missing",
    }:
        argv += ["--export_dir", str(tmp_path / "export")]
    with pytest.raises(SystemExit) as exit_:
        job.main(argv)
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "export").exists() and not (tmp_path / "ws").exists()
    assert "Job exported" not in capsys.readouterr().out


def test_job_exit_status_is_1_with_one_line_on_stderr(site_dirs, tmp_path):
    proc = subprocess.run(
        [sys.executable, "job.py", "--data_dir", str(site_dirs), "--n_clients", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --num_sites must be at least 1, got 0"


# --------------------------------------------------------------------------- client start-up


def site_runner(model_dir, data_path):
    from qwen3vl_sft.fl.client import SiteRunner
    from qwen3vl_sft.train.engine import RunConfig

    config = RunConfig(
        model=ModelConfig(model_name_or_path=str(model_dir)), data=DataConfig(data_path=str(data_path))
    )
    return SiteRunner(config, "site-1", 0)


def test_client_refuses_a_model_that_is_not_qwen3vl(not_qwen, synth_file):
    """Bug fixed here: the processor loaded first and failed with 'BertTokenizer has no attribute
    image_processor'; now the model check runs first."""
    with pytest.raises(
        ModelError, match=f"--model_name_or_path {not_qwen}: model_type 'bert' is not Qwen3-VL"
    ):
        site_runner(not_qwen, synth_file).round({"w": torch.zeros(1)}, 0, 1)


def test_client_without_its_data_file_names_prepare_data(tiny_model_dir, tmp_path):
    missing = tmp_path / "site-1" / "train.json"
    with pytest.raises(
        DataError, match=f"data file {missing} does not exist; create the site shards with prepare_data.py"
    ):
        site_runner(tiny_model_dir, missing).round({"w": torch.zeros(1)}, 0, 1)


# --------------------------------------------------------------------------- run_inference.py


def test_run_inference_output_dir_not_writable(tiny_model_dir, synth_dir, synth_split, tmp_path, capsys):
    import run_inference

    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["--model_path", str(tiny_model_dir), "--compare_base", "false", "--data_file", str(synth_split[1]),
            "--image_root", str(synth_dir), "--max_samples", "2", "--max_new_tokens", "2", "--progress", "false",
            "--output_dir", str(blocker / "report")]  # fmt: skip
    assert run_inference.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--output_dir" in err[-1] and str(blocker / "report") in err[-1]
