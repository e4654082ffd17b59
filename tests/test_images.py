"""The one image rule (data.SampleBuilder.load_images): every defect is a counted skip, in every path.

    .venv/bin/python -m pytest tests/test_images.py -q

Each class of defective image file is refused with a one-line reason naming the record and the file,
by training (samples), by generation prompts (validation, run_inference) and by the screen evaluation
runs first; sizes are refused from the header, before decoding. A round still aborts past
--max_bad_sample_fraction.
"""

from __future__ import annotations

import io
import json
import os

import pytest
from image_files import png_header_only
from PIL import Image

from qwen3vl_sft.config import DataConfig, ModelConfig, TrainConfig
from qwen3vl_sft.data.samples import SampleBuilder, SkipSample, build_dataset
from qwen3vl_sft.errors import DataError
from qwen3vl_sft.train.engine import RunConfig, SFTEngine


def record(image: str, rid: str) -> dict:
    return {"id": rid, "image": [image], "conversations": [
        {"from": "human", "value": "<image>\nWhere is the lesion?"}, {"from": "gpt", "value": "upper left"}]}  # fmt: skip


def png_bytes(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (90, 30, 30)).save(out, "PNG")
    return out.getvalue()


# name -> (file content, or None for no file; expected fragment of the reason)
DEFECTS = {
    "missing": (None, "does not exist"),
    "zero-byte": (b"", "is empty (0 bytes)"),
    "not-an-image": (b"%PDF-1.4 not a picture", "not an image PIL can read"),
    "truncated": (png_bytes((64, 64))[:-40], "truncated or corrupt image data"),
    "aspect-wide": (png_bytes((10000, 3)), "10000x3 pixels: aspect ratio beyond the 200:1"),
    "aspect-tall": (png_bytes((2, 500)), "2x500 pixels: aspect ratio beyond the 200:1"),
    "pixels": (png_header_only(12000, 12000), "12000x12000 = 144,000,000 pixels exceeds max_image_pixels"),
    "side": (png_header_only(20000, 100), "20000x100 pixels exceeds max_image_side 16384"),
    "bomb": (png_header_only(30000, 30000), "decompression bomb"),  # PIL's own guard, at open
    "directory": ("dir", "is not a regular file"),
    "outside-root": ("outside", "points outside the image root"),
}


def make_defect(root, name: str) -> str:
    """The image path (relative to ``root``) of defect ``name``, with its file written."""
    content = DEFECTS[name][0]
    if content == "outside":
        (root.parent / "outside.png").write_bytes(png_bytes((64, 64)))  # a good image, but not under root
        return "../outside.png"
    if content == "dir":
        (root / "images" / f"{name}.png").mkdir()
    elif content is not None:
        (root / "images" / f"{name}.png").write_bytes(content)
    return f"images/{name}.png"


@pytest.fixture()
def root(tmp_path):
    folder = tmp_path / "root"
    (folder / "images").mkdir(parents=True)
    return folder


@pytest.mark.parametrize("name", sorted(DEFECTS))
@pytest.mark.parametrize("path", ["training sample", "generation prompt"])
def test_every_defect_is_an_image_skip_naming_record_and_file(name, path, processor, root):
    image = make_defect(root, name)
    builder = SampleBuilder(processor, DataConfig(), root)
    with pytest.raises(SkipSample) as skip:
        builder(record(image, "rec-7")) if path == "training sample" else builder.prompt(
            record(image, "rec-7")
        )
    reason = str(skip.value)
    assert skip.value.kind == "image"  # counted toward max_bad_sample_fraction, never trained
    assert "\n" not in reason and "rec-7" in reason and DEFECTS[name][1] in reason
    assert os.path.basename(image) in reason


def test_aspect_ratio_limit_is_the_image_processors_own(processor, root):
    """200:1 passes and becomes a sample; 201:1 is what the Qwen image processor itself rejects."""
    with pytest.raises(ValueError, match="aspect ratio"):
        processor.image_processor(images=[Image.new("RGB", (201, 1))])
    builder = SampleBuilder(processor, DataConfig(), root)
    for size in [(200, 1), (1, 200), (1, 1)]:
        (root / "images" / "edge.png").write_bytes(png_bytes(size))
        assert "pixel_values" in builder(record("images/edge.png", f"{size}"))
    (root / "images" / "edge.png").write_bytes(png_bytes((201, 1)))
    with pytest.raises(SkipSample, match="201x1 pixels: aspect ratio"):
        builder(record("images/edge.png", "201x1"))


def test_size_limits_are_read_from_the_header_and_are_flags(processor, root):
    (root / "images" / "big.png").write_bytes(png_header_only(12000, 12000))
    lax = SampleBuilder(processor, DataConfig(max_image_pixels=200_000_000), root)
    # Past the pixel limit the same file is decoded, and only then found to hold no pixels.
    with pytest.raises(SkipSample, match="truncated or corrupt"):
        lax(record("images/big.png", "big"))
    (root / "images" / "photo.png").write_bytes(png_bytes((4000, 3000)))  # a large real-world photo
    assert "pixel_values" in SampleBuilder(processor, DataConfig(), root)(record("images/photo.png", "ok"))
    strict = SampleBuilder(processor, DataConfig(max_image_pixels=11_999_999), root)
    with pytest.raises(SkipSample, match="4000x3000 = 12,000,000 pixels exceeds max_image_pixels 11,999,999"):
        strict(record("images/photo.png", "ok"))


def test_screen_keeps_the_first_n_usable_records_and_logs_each_skip(processor, root, caplog):
    (root / "images" / "good.png").write_bytes(png_bytes((64, 64)))
    records = [record("images/good.png", "g1"), record(make_defect(root, "zero-byte"), "bad-1")]
    records += [record(make_defect(root, "aspect-wide"), "bad-2"), record("images/good.png", "g2")]
    records += [record("images/good.png", "g3")]
    path = root.parent / "val.json"
    path.write_text(json.dumps(records))
    dataset = build_dataset(processor, DataConfig(image_root=str(root)), str(path))
    skips = dataset.screen(limit=2)
    assert [r["id"] for r in dataset.records] == ["g1", "g2"]
    assert len(skips) == 2 and "'bad-1'" in skips[0] and "'bad-2'" in skips[1]
    assert "Skipping record: record 'bad-1': image" in caplog.text


def sft_config(tiny_model_dir, data_file, root, tmp_path, fraction: float) -> RunConfig:
    return RunConfig(
        ModelConfig(model_name_or_path=str(tiny_model_dir)),
        DataConfig(
            data_path=str(data_file),
            image_root=str(root),
            dataloader_num_workers=0,
            max_bad_sample_fraction=fraction,
        ),
        TrainConfig(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, disable_progress_bar=True
        ),
    )


def test_a_defective_record_drawn_again_is_counted_each_time_and_logged_once(processor, root, caplog):
    records = [
        record(make_defect(root, "zero-byte"), "bad-1"),
        record(make_defect(root, "aspect-wide"), "bad-2"),
    ]
    path = root.parent / "train.json"
    path.write_text(json.dumps(records))
    dataset = build_dataset(processor, DataConfig(image_root=str(root)), str(path))
    draws = [dataset[i] for i in (0, 1, 0, 0, 1)]
    assert [d["skipped"] for d in draws] == ["image"] * 5  # every draw counts toward the bad fraction
    assert caplog.text.count("Skipping sample: record 'bad-1'") == 1
    assert caplog.text.count("Skipping sample: record 'bad-2'") == 1


def test_training_round_counts_every_defect_and_still_aborts_past_the_fraction(
    tiny_model_dir, root, tmp_path
):
    (root / "images" / "good.png").write_bytes(png_bytes((64, 64)))
    bad = [record(make_defect(root, name), f"bad-{name}") for name in sorted(DEFECTS)]
    records = [record("images/good.png", f"g{i}") for i in range(21)] + bad  # 21 good + 11 defective
    data_file = tmp_path / "train.json"
    data_file.write_text(json.dumps(records))

    result = SFTEngine(sft_config(tiny_model_dir, data_file, root, tmp_path, fraction=0.5)).train_round()
    assert result.metrics["skipped_samples"] == len(DEFECTS) and result.metrics["samples"] == 21

    with pytest.raises(DataError, match="more than max_bad_sample_fraction 0.05"):
        SFTEngine(sft_config(tiny_model_dir, data_file, root, tmp_path, fraction=0.05)).train_round()


# --------------------------------------------------------------------------- the image root


def test_image_root_that_does_not_exist_is_named_when_the_dataset_is_built(processor, tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record("images/a.png", "r1")]))
    with pytest.raises(DataError, match=r"--image_root \.\./no-such-dir \(= .*no-such-dir\) does not exist"):
        build_dataset(processor, DataConfig(image_root="../no-such-dir"), str(path))


def write_shards(folder, manifest: dict) -> None:
    (folder / "data" / "site-1").mkdir(parents=True)
    (folder / "data" / "site-1" / "train.json").write_text(json.dumps([record("images/a.png", "r1")]))
    (folder / "data" / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("config", "source"),
    [
        ({"image_root": "../imgs", "output_dir": "./data", "data_file": "../imgs/x.json"}, "imgs/x.json"),
        ({"image_root": "../imgs", "output_dir": "/elsewhere", "data_file": "src/x.json"}, "proj/src/x.json"),
    ],
    ids=["from-output-dir", "from-data-file"],
)
def test_relative_root_of_an_old_manifest_is_found_from_where_prepare_data_ran(
    config, source, processor, tmp_path, monkeypatch
):
    """prepare_data ran in proj/ with --image_root ../imgs; the site reads the shards from elsewhere."""
    (tmp_path / "imgs" / "images").mkdir(parents=True)
    write_shards(tmp_path / "proj", {"config": config, "source": {"path": str(tmp_path / source)}})
    monkeypatch.chdir(tmp_path / "proj" / "data" / "site-1")  # e.g. the site's workspace
    dataset = build_dataset(processor, DataConfig(), "train.json")
    assert dataset.builder.image_root == tmp_path / "imgs"


def test_manifest_root_that_does_not_exist_here_is_named(processor, tmp_path):
    write_shards(
        tmp_path, {"image_root": "/mnt/gone/PubMedVision", "config": {}, "source": {"path": "/x.json"}}
    )
    with pytest.raises(DataError, match="image root '/mnt/gone/PubMedVision' does not exist here"):
        build_dataset(processor, DataConfig(), str(tmp_path / "data" / "site-1" / "train.json"))
