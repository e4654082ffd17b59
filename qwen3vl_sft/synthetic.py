"""Synthetic PubMedVision-format data set that a tiny Qwen3-VL can learn on CPU.

    python -m qwen3vl_sft.synthetic --output PubMedVision_synth --num_records 2000

Writes what a clone of the real data set holds: ``PubMedVision_InstructionTuning_VQA.json`` (a JSON
array of records with ``id``, ``image`` (list of ``images/...jpg``), ``conversations`` (human/gpt turns),
``modality``, ``body_part``) and the JPEG files under ``images/``. Like the real data, human turns carry
no ``<image>`` placeholders; prepare_data.py adds them.

Every answer can be read off the pixels:

* location (most records): one bright lesion in one quadrant -> "upper left" ... "lower right";
* multi-image: two or three scans, only one with a lesion -> "the first image" ...;
* multi-turn: location, then "Which imaging modality is this?" -> the modality, drawn as a distinct
  background style (CT, MRI, X-ray, ultrasound).

With ``location_by_body_part`` each body part only ever shows lesions in two quadrants, so a site
that holds a few body parts never sees some answers (the non-IID federated-benefit experiment).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .fileio import atomic_dir

DATA_FILE_NAME = "PubMedVision_InstructionTuning_VQA.json"
IMAGE_SIZE = 64
QUADRANTS = ["upper left", "upper right", "lower left", "lower right"]
MODALITIES = ["CT", "MRI", "X-ray", "Ultrasound"]
BODY_PARTS = ["Brain", "Chest", "Abdomen", "Pelvis", "Knee", "Spine"]
ORDINALS = ["the first image", "the second image", "the third image"]
# Quadrant pairs per body part for location_by_body_part (each quadrant is covered by three parts).
BODY_PART_QUADRANTS = {
    "Brain": (0, 1), "Chest": (0, 2), "Abdomen": (1, 3), "Pelvis": (2, 3), "Knee": (0, 3), "Spine": (1, 2),
}  # fmt: skip
LOCATION_QUESTIONS = [
    "Where is the lesion located in this {modality} image of the {body_part}?",
    "In which region of the {body_part} {modality} scan is the abnormality?",
    "Locate the lesion in this {modality} of the {body_part}.",
]
MULTI_IMAGE_QUESTION = "These are {modality} images of the {body_part}. Which image shows the lesion?"
MODALITY_QUESTION = "Which imaging modality is this?"


@dataclass(frozen=True)
class SyntheticSpec:
    num_records: int = 600
    seed: int = 0
    multi_image_fraction: float = 0.1
    multi_turn_fraction: float = 0.1
    location_by_body_part: bool = False


def vocabulary_sentences() -> list[str]:
    """Every phrase the data set uses (the tiny tokenizer is trained on these)."""
    lines = list(QUADRANTS) + list(ORDINALS) + list(MODALITIES) + [MODALITY_QUESTION]
    for modality in MODALITIES:
        for part in BODY_PARTS:
            lines += [q.format(modality=modality, body_part=part) for q in LOCATION_QUESTIONS]
            lines.append(MULTI_IMAGE_QUESTION.format(modality=modality, body_part=part))
    return lines


def _background(draw, rng: random.Random, modality: str) -> None:
    """Modality-specific backdrop: what the model reads to name the modality."""
    s = IMAGE_SIZE
    if modality == "CT":
        draw.rectangle([0, 0, s, s], fill=(20, 20, 20))
        draw.ellipse([4, 6, s - 4, s - 6], fill=(90, 90, 90))
    elif modality == "MRI":
        draw.rectangle([0, 0, s, s], fill=(10, 10, 40))
        draw.ellipse([8, 4, s - 8, s - 4], fill=(60, 60, 110))
    elif modality == "X-ray":
        draw.rectangle([0, 0, s, s], fill=(0, 0, 0))
        for x in range(8, s, 12):
            draw.rectangle([x, 2, x + 3, s - 2], fill=(150, 150, 150))
    else:  # Ultrasound: speckle in a fan
        draw.rectangle([0, 0, s, s], fill=(0, 0, 0))
        draw.pieslice([-s // 2, -s // 4, s + s // 2, s + s // 2], 50, 130, fill=(70, 60, 40))
        for _ in range(60):
            x, y = rng.randrange(s), rng.randrange(s)
            draw.point((x, y), fill=(120, 110, 80))


def draw_scan(rng: random.Random, modality: str, quadrant: int | None):
    """A 64x64 RGB scan; a bright lesion sits in ``quadrant`` (0..3) unless it is None."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    draw = ImageDraw.Draw(image)
    _background(draw, rng, modality)
    if quadrant is not None:
        half = IMAGE_SIZE // 2
        cx = (quadrant % 2) * half + half // 2 + rng.randint(-5, 5)
        cy = (quadrant // 2) * half + half // 2 + rng.randint(-5, 5)
        r = rng.randint(5, 8)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 240, 90))
    return image


def _pick_quadrant(rng: random.Random, body_part: str, spec: SyntheticSpec) -> int:
    if spec.location_by_body_part:
        return rng.choice(BODY_PART_QUADRANTS[body_part])
    return rng.randrange(4)


def make_record(index: int, rng: random.Random, spec: SyntheticSpec, images_dir: Path) -> dict:
    """One record in PubMedVision's schema, with its images written under ``images_dir``."""
    modality, body_part = rng.choice(MODALITIES), rng.choice(BODY_PARTS)
    kind = rng.random()
    names: list[str] = []

    def save(image) -> None:
        name = f"synth_{index:06d}_{len(names)}.jpg"
        image.save(images_dir / name, format="JPEG", quality=95)
        names.append(f"images/{name}")

    if kind < spec.multi_image_fraction:
        count = rng.choice([2, 3])
        target = rng.randrange(count)
        for i in range(count):
            save(draw_scan(rng, modality, _pick_quadrant(rng, body_part, spec) if i == target else None))
        turns = [(MULTI_IMAGE_QUESTION.format(modality=modality, body_part=body_part), ORDINALS[target])]
    else:
        quadrant = _pick_quadrant(rng, body_part, spec)
        save(draw_scan(rng, modality, quadrant))
        question = rng.choice(LOCATION_QUESTIONS).format(modality=modality, body_part=body_part)
        turns = [(question, QUADRANTS[quadrant])]
        if kind < spec.multi_image_fraction + spec.multi_turn_fraction:
            turns.append((MODALITY_QUESTION, modality))
    conversations = []
    for question, answer in turns:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {
        "id": f"synth-{index:06d}",
        "image": names,
        "conversations": conversations,
        "modality": modality,
        "body_part": body_part,
    }


def generate(output: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the data set to ``output`` atomically (temp dir, then rename); returns the JSON path."""
    out = Path(output)
    with atomic_dir(out) as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "images").mkdir()
        rng = random.Random(spec.seed)
        records = [make_record(i, rng, spec, tmp / "images") for i in range(spec.num_records)]
        (tmp / DATA_FILE_NAME).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return out / DATA_FILE_NAME


def ensure(output: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Generate the data set unless ``output`` already holds one."""
    path = Path(output) / DATA_FILE_NAME
    return path if path.is_file() else generate(output, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="Directory to write the data set to.")
    parser.add_argument("--num_records", type=int, default=SyntheticSpec.num_records)
    parser.add_argument("--seed", type=int, default=SyntheticSpec.seed)
    parser.add_argument("--multi_image_fraction", type=float, default=SyntheticSpec.multi_image_fraction)
    parser.add_argument("--multi_turn_fraction", type=float, default=SyntheticSpec.multi_turn_fraction)
    parser.add_argument(
        "--location_by_body_part",
        action="store_true",
        help="Each body part shows lesions in only two quadrants (for non-IID experiments).",
    )
    args = parser.parse_args(argv)
    spec = SyntheticSpec(**{k: v for k, v in vars(args).items() if k != "output"})
    path = generate(args.output, spec)
    print(f"{spec.num_records} synthetic PubMedVision records written to {path}")


if __name__ == "__main__":
    main()
