"""Synthetic PubMedVision-format data set that a tiny Qwen3-VL can learn on CPU.

    python -m qwen3vl_sft.data.synthetic --output PubMedVision_synth --num_records 2000

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

``realistic=True`` (``--realistic``) makes the data look like what the field sends, for end-to-end
tests (the default short mode is unchanged, record for record and byte for byte):

* answers are radiology-report paragraphs of 40-120 words that still carry the fact ("... a
  well-circumscribed hyperintense lesion is seen in the upper left quadrant ...");
* images vary in size (about 40-160 px a side, aspect ratios up to 4:1) and format (JPEG and PNG);
* about 2.5 % of the records (at least one of each kind from 160 records on) have a defective image:
  a 0-byte file, a truncated JPEG, a text file named ``.jpg``, a 1000x3 PNG (aspect ratio 333:1) -
  few enough that a site of a few hundred records stays under ``--max_bad_sample_fraction`` 0.05;
* about 2 % of the records are exact copies of another (half with the same id, half with a new one),
  and a few records ask a second question about another record's image (they share the file).

Which records carry these extras is drawn from a second generator seeded from ``seed``, spread
evenly over the file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..fileio import atomic_dir

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

# Realistic mode: report paragraphs built around the same facts.
SIGNALS = {"CT": "hyperdense", "MRI": "hyperintense", "X-ray": "radiopaque", "Ultrasound": "hyperechoic"}
MODALITY_NAMES = {
    "CT": "computed tomography",
    "MRI": "magnetic resonance",
    "X-ray": "radiographic",
    "Ultrasound": "ultrasound",
}
MODALITY_CUES = {
    "CT": "round grey cross-section on a dark background",
    "MRI": "soft blue tissue contrast",
    "X-ray": "bright vertical bands on a black background",
    "Ultrasound": "speckled fan-shaped field of view",
}
COUNT_WORDS = {2: "two", 3: "three"}
OPENINGS = (
    "A well-circumscribed {signal} lesion is seen in the {quadrant} quadrant of this {name} image of the {part}.",
    "The {name} image of the {part} demonstrates a well-circumscribed {signal} lesion in the {quadrant} quadrant.",
    "There is a focal {signal} lesion in the {quadrant} quadrant of the {part} on this {name} study.",
)
MULTI_OPENINGS = (
    "Of the {count} {name} images of the {part}, only {ordinal} shows a lesion, a well-circumscribed {signal} focus.",
    "The lesion is seen on {ordinal} of these {count} {name} images of the {part}, as a {signal} focus.",
)
MODALITY_OPENINGS = (
    "This is a {modality} image: the {cue} is typical of {name} imaging.",
    "The study is a {modality} examination of the {part}, recognisable by the {cue}.",
)
FINDINGS = (
    "The lesion measures approximately {size} mm in greatest dimension and has smooth, well-defined margins.",
    "There is no evidence of surrounding edema, mass effect or distortion of the adjacent structures.",
    "No additional focal abnormality is identified elsewhere in the field of view.",
    "The background tissue shows a homogeneous appearance without diffuse abnormality.",
    "No calcification, cavitation or fluid level is seen within the lesion.",
    "The visualized osseous structures are intact, without fracture or destructive change.",
    "Image quality is adequate for interpretation, with no significant motion artifact.",
)
TECHNIQUE = (
    "The acquisition covers the {part} with adequate coverage of the region of interest.",
    "Windowing and contrast are appropriate for the assessment of the soft tissues.",
    "No significant artifact limits the interpretation of this examination.",
    "The field of view is centred on the {part} and includes the adjacent structures.",
)
IMPRESSIONS = (
    "Impression: a solitary {signal} lesion in the {quadrant} quadrant of the {part}; correlation with the "
    "clinical findings is recommended.",
    "In summary, the findings are consistent with a benign-appearing focal lesion in the {quadrant} quadrant, "
    "and follow-up imaging may be considered.",
)
MULTI_IMPRESSION = "Impression: a focal {signal} lesion on {ordinal}; the other images are unremarkable."
MODALITY_IMPRESSION = "Impression: {modality} of the {part}."
DEFECTS = ("empty_file", "truncated_jpeg", "not_an_image", "extreme_aspect_ratio")
DEFECT_SHARE, DUPLICATE_SHARE, SHARED_IMAGE_RECORDS = 0.025, 0.02, 2


@dataclass(frozen=True)
class SyntheticSpec:
    num_records: int = 600
    seed: int = 0
    multi_image_fraction: float = 0.1
    multi_turn_fraction: float = 0.1
    location_by_body_part: bool = False
    realistic: bool = False  # report paragraphs, varied images, defects and duplicates (module docstring)


def vocabulary_sentences() -> list[str]:
    """Every phrase the data set uses, in both modes (the tiny tokenizer is trained on these)."""
    lines = list(QUADRANTS) + list(ORDINALS) + list(MODALITIES) + [MODALITY_QUESTION]
    for modality in MODALITIES:
        for part in BODY_PARTS:
            lines += [q.format(modality=modality, body_part=part) for q in LOCATION_QUESTIONS]
            lines.append(MULTI_IMAGE_QUESTION.format(modality=modality, body_part=part))
    return lines + _realistic_sentences()


def _realistic_sentences() -> list[str]:
    """The realistic mode's report sentences, each template filled a few ways."""
    lines = []
    for i, modality in enumerate(MODALITIES):
        for j, quadrant in enumerate(QUADRANTS):
            fill = _fill(
                modality, BODY_PARTS[(i + j) % len(BODY_PARTS)], quadrant, ORDINALS[j % 3], 2 + j % 2
            )
            for template in (*OPENINGS, *MULTI_OPENINGS, *MODALITY_OPENINGS, *IMPRESSIONS):
                lines.append(template.format(**fill))
            lines += [MULTI_IMPRESSION.format(**fill), MODALITY_IMPRESSION.format(**fill)]
    fill = _fill("CT", "Chest", QUADRANTS[0], ORDINALS[0], 2)
    return lines + [t.format(**fill, size=12) for t in (*FINDINGS, *TECHNIQUE)]


def _background(
    draw, rng: random.Random, modality: str, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
) -> None:
    """Modality-specific backdrop: what the model reads to name the modality."""
    w, h = size
    if modality == "CT":
        draw.rectangle([0, 0, w, h], fill=(20, 20, 20))
        draw.ellipse([4, 6, w - 4, h - 6], fill=(90, 90, 90))
    elif modality == "MRI":
        draw.rectangle([0, 0, w, h], fill=(10, 10, 40))
        draw.ellipse([8, 4, w - 8, h - 4], fill=(60, 60, 110))
    elif modality == "X-ray":
        draw.rectangle([0, 0, w, h], fill=(0, 0, 0))
        for x in range(8, w, 12):
            draw.rectangle([x, 2, x + 3, h - 2], fill=(150, 150, 150))
    else:  # Ultrasound: speckle in a fan
        draw.rectangle([0, 0, w, h], fill=(0, 0, 0))
        draw.pieslice([-w // 2, -h // 4, w + w // 2, h + h // 2], 50, 130, fill=(70, 60, 40))
        for _ in range(60 * w * h // (IMAGE_SIZE * IMAGE_SIZE)):  # 60 at 64x64: one density at any size
            x, y = rng.randrange(w), rng.randrange(h)
            draw.point((x, y), fill=(120, 110, 80))


def draw_scan(
    rng: random.Random, modality: str, quadrant: int | None, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
):
    """A ``size`` (default 64x64) RGB scan; a bright lesion sits in ``quadrant`` (0..3) unless it is None.

    The lesion's jitter and radius scale with the smaller half side (5 and 5..8 px at 64x64), so it
    stays inside its quadrant in a 4:1 image too.
    """
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    _background(draw, rng, modality, size)
    if quadrant is not None:
        half_w, half_h = size[0] // 2, size[1] // 2
        m = min(half_w, half_h)
        jitter = 5 * m // 32
        cx = (quadrant % 2) * half_w + half_w // 2 + rng.randint(-jitter, jitter)
        cy = (quadrant // 2) * half_h + half_h // 2 + rng.randint(-jitter, jitter)
        r = rng.randint(max(2, 5 * m // 32), max(3, 8 * m // 32))
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
    return _record(index, names, turns, modality, body_part)


def _record(
    index: int, names: list[str], turns: list[tuple[str, str]], modality: str, body_part: str
) -> dict:
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


# --------------------------------------------------------------------------- realistic mode


def _fill(modality: str, part: str, quadrant: str, ordinal: str, count: int) -> dict:
    return {
        "modality": modality,
        "name": MODALITY_NAMES[modality],
        "signal": SIGNALS[modality],
        "cue": MODALITY_CUES[modality],
        "part": part.lower(),
        "quadrant": quadrant,
        "ordinal": ordinal,
        "count": COUNT_WORDS.get(count, str(count)),
    }


def _paragraph(
    rng: random.Random, opening: str, middle: tuple[str, ...], k: int, closing: str, fill: dict
) -> str:
    """``opening``, ``k`` of the ``middle`` sentences in a random order, ``closing``: one report."""
    sentences = [opening, *rng.sample(middle, k), closing]
    return " ".join(s.format(**fill, size=rng.randint(4, 30)) for s in sentences)


def location_report(rng: random.Random, modality: str, part: str, quadrant: int) -> str:
    """A 40-120 word report that names the lesion's quadrant (the learnable fact) twice."""
    fill = _fill(modality, part, QUADRANTS[quadrant], "", 1)
    return _paragraph(rng, rng.choice(OPENINGS), FINDINGS, rng.randint(2, 5), rng.choice(IMPRESSIONS), fill)


def multi_image_report(rng: random.Random, modality: str, part: str, target: int, count: int) -> str:
    """A report that names which image shows the lesion ("the second image")."""
    fill = _fill(modality, part, "", ORDINALS[target], count)
    return _paragraph(
        rng, rng.choice(MULTI_OPENINGS), FINDINGS[1:], rng.randint(2, 4), MULTI_IMPRESSION, fill
    )


def modality_report(rng: random.Random, modality: str, part: str) -> str:
    """A report that names the modality ("MRI") and what in the image shows it."""
    fill = _fill(modality, part, "", "", 1)
    opening = rng.choice(MODALITY_OPENINGS)
    return _paragraph(rng, opening, TECHNIQUE, rng.randint(3, 4), MODALITY_IMPRESSION, fill)


def _realistic_size(rng: random.Random) -> tuple[int, int]:
    """(width, height): about 40..160 px a side, mostly near square, up to 4:1 either way."""
    long = rng.randint(64, 160)
    short = max(40, round(long / rng.choice([1, 1, 1, 1.25, 1.5, 2, 3, 4])))
    return (long, short) if rng.random() < 0.5 else (short, long)


def make_realistic_record(index: int, rng: random.Random, spec: SyntheticSpec, images_dir: Path) -> dict:
    """:func:`make_record` with report answers and images of varied size and format (JPEG or PNG)."""
    modality, body_part = rng.choice(MODALITIES), rng.choice(BODY_PARTS)
    kind = rng.random()
    names: list[str] = []

    def save(quadrant: int | None) -> None:
        image = draw_scan(rng, modality, quadrant, _realistic_size(rng))
        fmt = "PNG" if rng.random() < 0.25 else "JPEG"
        name = f"synth_{index:06d}_{len(names)}.{'png' if fmt == 'PNG' else 'jpg'}"
        image.save(images_dir / name, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        names.append(f"images/{name}")

    if kind < spec.multi_image_fraction:
        count = rng.choice([2, 3])
        target = rng.randrange(count)
        for i in range(count):
            save(_pick_quadrant(rng, body_part, spec) if i == target else None)
        question = MULTI_IMAGE_QUESTION.format(modality=modality, body_part=body_part)
        turns = [(question, multi_image_report(rng, modality, body_part, target, count))]
    else:
        quadrant = _pick_quadrant(rng, body_part, spec)
        save(quadrant)
        question = rng.choice(LOCATION_QUESTIONS).format(modality=modality, body_part=body_part)
        turns = [(question, location_report(rng, modality, body_part, quadrant))]
        if kind < spec.multi_image_fraction + spec.multi_turn_fraction:
            turns.append((MODALITY_QUESTION, modality_report(rng, modality, body_part)))
    return _record(index, names, turns, modality, body_part)


def _spread(count: int, n: int) -> list[int]:
    """``count`` positions spread evenly over ``range(n)``."""
    return [int((j + 0.5) * n / count) for j in range(count)] if count else []


def _single_image_at(records: list[dict], start: int, taken: set[int]) -> int:
    """The first record from ``start`` on (wrapping) with one image that is not ``taken``."""
    for step in range(len(records)):
        i = (start + step) % len(records)
        if i not in taken and len(records[i]["image"]) == 1:
            return i
    raise ValueError("no single-image record left for the realistic extras; raise num_records")


def _write_defect(kind: str, record: dict, images_dir: Path) -> None:
    """Replace the record's only image by a defective file of ``kind`` (see :data:`DEFECTS`)."""
    from PIL import Image

    old = images_dir / Path(record["image"][0]).name
    stem = old.stem
    old.unlink()
    name = f"{stem}.png" if kind == "extreme_aspect_ratio" else f"{stem}.jpg"
    path = images_dir / name
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "truncated_jpeg":
        buffer = io.BytesIO()
        draw_scan(random.Random(0), "CT", 0, (96, 96)).save(buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue()[: buffer.tell() // 2])
    elif kind == "not_an_image":
        path.write_text("This is a text file, not an image.\n", encoding="utf-8")
    else:
        Image.new("RGB", (1000, 3), (90, 90, 90)).save(path, format="PNG")
    record["image"] = [f"images/{name}"]


def _extra_counts(n: int) -> tuple[int, int]:
    """(exact duplicates, records sharing another's image) among ``n`` realistic records."""
    duplicates = round(DUPLICATE_SHARE * n)
    return duplicates, min(SHARED_IMAGE_RECORDS, (n - duplicates) // 50)  # "a couple" from 50 records on


def _add_field_extras(records: list[dict], duplicates: int, shared: int, seed: int, images_dir: Path) -> None:
    """Give the base records defective images, then add ``shared`` records that ask about another
    record's image and ``duplicates`` exact copies, at random places.
    """
    extra = random.Random(f"synthetic-realistic-{seed}")  # the base records' draws stay untouched
    n_base, taken = len(records), set()
    for j, pos in enumerate(_spread(round(DEFECT_SHARE * n_base), n_base)):
        i = _single_image_at(records, pos, taken)
        taken.add(i)
        _write_defect(DEFECTS[j % len(DEFECTS)], records[i], images_dir)
    additions = []
    for pos in _spread(shared, n_base):
        i = _single_image_at(records, pos + 1, taken)
        taken.add(i)
        source = records[i]
        answer = modality_report(extra, source["modality"], source["body_part"])
        record = _record(
            0, list(source["image"]), [(MODALITY_QUESTION, answer)], source["modality"], source["body_part"]
        )
        additions.append({**record, "id": f"{source['id']}-b"})
    for k in range(duplicates):
        copy = json.loads(json.dumps(records[extra.randrange(n_base)]))
        if k % 2:
            copy["id"] += "-copy"  # the same record under another id: still a duplicate by content
        additions.append(copy)
    for record in additions:
        records.insert(extra.randrange(len(records) + 1), record)


def generate(output: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the data set to ``output`` atomically (temp dir, then rename); returns the JSON path."""
    out = Path(output)
    with atomic_dir(out) as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "images").mkdir()
        rng = random.Random(spec.seed)
        if spec.realistic:
            duplicates, shared = _extra_counts(spec.num_records)
            n_base = spec.num_records - duplicates - shared
            records = [make_realistic_record(i, rng, spec, tmp / "images") for i in range(n_base)]
            _add_field_extras(records, duplicates, shared, spec.seed, tmp / "images")
        else:
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
    parser.add_argument(
        "--realistic",
        action="store_true",
        help="Report-paragraph answers, varied image sizes and formats, a few defective images and "
        "duplicate records (what the field sends).",
    )
    args = parser.parse_args(argv)
    spec = SyntheticSpec(**{k: v for k, v in vars(args).items() if k != "output"})
    path = generate(args.output, spec)
    print(f"{spec.num_records} synthetic PubMedVision records written to {path}")


if __name__ == "__main__":
    main()
