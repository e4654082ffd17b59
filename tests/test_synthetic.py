"""The synthetic PubMedVision-format data set: schema, images, determinism, learnable answers."""

from __future__ import annotations

import json
import random

from PIL import Image

from qwen3vl_sft import synthetic


def load(path):
    return json.loads(path.read_text())


def test_records_match_the_pubmedvision_schema_and_every_image_exists(synth_dir, synth_file):
    records = load(synth_file)
    assert len(records) == 200
    for r in records:
        assert set(r) == {"id", "image", "conversations", "modality", "body_part"}
        assert isinstance(r["image"], list) and r["image"]
        assert all(p.startswith("images/") and (synth_dir / p).is_file() for p in r["image"])
        roles = [t["from"] for t in r["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        assert all("<image>" not in t["value"] for t in r["conversations"])  # like the real data
        assert r["modality"] in synthetic.MODALITIES and r["body_part"] in synthetic.BODY_PARTS
    assert any(len(r["image"]) > 1 for r in records)
    assert any(len(r["conversations"]) > 2 for r in records)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    spec = synthetic.SyntheticSpec(num_records=20, seed=5)
    a = synthetic.generate(tmp_path / "a", spec)
    b = synthetic.generate(tmp_path / "b", spec)
    c = synthetic.generate(tmp_path / "c", synthetic.SyntheticSpec(num_records=20, seed=6))
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a/images/synth_000003_0.jpg").read_bytes() == (
        tmp_path / "b/images/synth_000003_0.jpg"
    ).read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_lesion_is_drawn_in_the_answered_quadrant():
    rng = random.Random(0)
    for quadrant in range(4):
        image = synthetic.draw_scan(rng, "CT", quadrant)
        pixels = image.load()
        bright = [
            (x, y) for x in range(64) for y in range(64) if pixels[x, y][0] > 240 and pixels[x, y][2] < 150
        ]
        cx = sum(x for x, _ in bright) / len(bright)
        cy = sum(y for _, y in bright) / len(bright)
        assert (int(cy >= 32) * 2 + int(cx >= 32)) == quadrant


def test_location_by_body_part_limits_the_answers_per_body_part(tmp_path):
    spec = synthetic.SyntheticSpec(
        num_records=120, seed=1, multi_image_fraction=0, location_by_body_part=True
    )
    records = load(synthetic.generate(tmp_path / "skewed", spec))
    for part, allowed in synthetic.BODY_PART_QUADRANTS.items():
        answers = {r["conversations"][1]["value"] for r in records if r["body_part"] == part}
        assert answers <= {synthetic.QUADRANTS[q] for q in allowed}


def test_images_are_64px_rgb_jpegs(synth_dir):
    image = Image.open(next((synth_dir / "images").iterdir()))
    assert image.format == "JPEG" and image.size == (64, 64) and image.mode == "RGB"
