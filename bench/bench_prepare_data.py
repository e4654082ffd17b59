"""Time ``prepare_data.py`` on a PubMedVision-sized file: wall seconds and peak RSS against the targets.

    python bench/bench_prepare_data.py                       # 647,031 records (~760 MB), 3 IID sites
    python bench/bench_prepare_data.py --records 50000 --images none -- --split modality

The synthetic file mimics PubMedVision_InstructionTuning_VQA.json: a JSON array written with
``indent=4`` and ``ensure_ascii=False`` (some non-ASCII text: units, degrees; ``--ascii`` writes
``\\uXXXX`` escapes instead, as ``json.dump`` does by default), ~1.2 KB per record,
1-3 images per record, short questions without ``<image>`` placeholders in 90 % of the records (so
the placeholder repair runs on most records) and long answers.  It is generated once into
``--work_dir`` and reused.

Images: ``--images touch`` (default) creates one empty file per referenced image (~1.3 M files, made
once), so the run includes the real existence check (one directory listing + set lookups);
``--images none`` creates nothing and passes ``--check_images false``.

Peak RSS is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after the run (the largest child).
Targets: <= 20 s and <= 1.4 GiB for the default 3-site split (NVFlare's script: 106 s / 5.6 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_SECONDS, TARGET_RSS_GIB = 20.0, 1.4
MODALITIES = [
    "Computed Tomography",
    "Magnetic Resonance Imaging",
    "X-Ray",
    "Ultrasound",
    "Microscopy",
    "Endoscopy",
    "Dermoscopy",
    "Fundus Photography",
    "Positron Emission Tomography",
    "Angiography",
]
BODY_PARTS = [
    "Chest",
    "Head",
    "Abdomen",
    "Pelvis",
    "Spine",
    "Upper Limb",
    "Lower Limb",
    "Neck",
    "Cell",
    "Eye",
    "Skin",
    "Heart",
    "Oral Cavity",
    "Breast",
    "Kidney",
]
WORDS = [
    "lesion",
    "mass",
    "opacity",
    "contrast",
    "enhancement",
    "margin",
    "nodule",
    "density",
    "signal",
    "intensity",
    "axial",
    "coronal",
    "sagittal",
    "section",
    "revealed",
    "demonstrates",
    "consistent",
    "with",
    "suggestive",
    "of",
    "infiltration",
    "the",
    "a",
    "of",
    "and",
    "in",
    "with",
    "left",
    "right",
    "lobe",
    "region",
    "tissue",
    "cortex",
    "fracture",
    "effusion",
    "edema",
    "hyperintense",
    "hypodense",
    "calcification",
    "vessel",
    "artery",
    "vein",
    "duct",
    "wall",
    "thickening",
    "measuring",
    "approximately",
]
EXTRA = ["5 μm", "37 °C", "3 × 4 cm", "T2‑weighted", "β-cell", "±2 mm"]


def _sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(8, 20))
    if rng.random() < 0.3:
        words.append(rng.choice(EXTRA))
    return " ".join(words).capitalize() + "."


def _record(i: int, rng: random.Random, sentences: list[str]) -> dict:
    n_images = rng.choices([1, 2, 3], weights=[70, 20, 10])[0]
    images = [f"images/pmc_{i:07d}_fig{k}.jpg" for k in range(n_images)]
    question = " ".join(rng.choices(sentences, k=rng.randint(1, 2)))
    if rng.random() < 0.1:
        question = "<image>\n" * n_images + question
    return {
        "id": f"PubMedVision_{i}",
        "image": images,
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": " ".join(rng.choices(sentences, k=rng.randint(3, 8)))},
        ],
        "modality": rng.choice(MODALITIES),
        "body_part": rng.choice(BODY_PARTS),
    }


def generate(path: str, n: int, ascii_only: bool, seed: int = 0) -> None:
    """Stream ``n`` records into ``path`` as an indent=4 JSON array (constant memory)."""
    rng = random.Random(seed)
    sentences = [_sentence(rng) for _ in range(5000)]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n):
            text = json.dumps(_record(i, rng, sentences), indent=4, ensure_ascii=ascii_only)
            f.write("    " + text.replace("\n", "\n    ") + (",\n" if i < n - 1 else "\n"))
        f.write("]\n")
    os.replace(tmp, path)


def touch_images(data_file: str, images_dir: str) -> int:
    """Create an empty file per image referenced by the generated file (names are derivable)."""
    os.makedirs(images_dir, exist_ok=True)
    count = 0
    with open(data_file, encoding="utf-8") as f:
        for line in f:
            line = line.strip().rstrip(",")
            if line.startswith('"images/'):
                open(os.path.join(images_dir, json.loads(line)[len("images/") :]), "wb").close()
                count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=647_031)
    ap.add_argument("--work_dir", default="/tmp/qwen3vl_bench")
    ap.add_argument("--images", choices=["touch", "none"], default="touch")
    ap.add_argument("--ascii", action="store_true", help="escape non-ASCII text (\\uXXXX)")
    ap.add_argument("extra", nargs="*", help="extra prepare_data.py flags (after --)")
    args = ap.parse_args()

    data_dir = os.path.join(args.work_dir, f"pmv_{args.records}{'_ascii' if args.ascii else ''}")
    data_file = os.path.join(data_dir, "PubMedVision_InstructionTuning_VQA.json")
    os.makedirs(data_dir, exist_ok=True)
    if not os.path.isfile(data_file):
        t = time.perf_counter()
        generate(data_file, args.records, args.ascii)
        print(f"generated {data_file} in {time.perf_counter() - t:.0f} s")
    marker = os.path.join(data_dir, "images", ".complete")
    same_images = os.path.join(args.work_dir, f"pmv_{args.records}", "images")  # --ascii: same names
    reuse = args.ascii and os.path.isfile(os.path.join(same_images, ".complete"))
    if args.images == "touch" and reuse and not os.path.lexists(os.path.join(data_dir, "images")):
        os.symlink(same_images, os.path.join(data_dir, "images"))
    if args.images == "touch" and not os.path.isfile(marker):
        t = time.perf_counter()
        n = touch_images(data_file, os.path.join(data_dir, "images"))
        open(marker, "w").close()
        print(f"created {n} empty image files in {time.perf_counter() - t:.0f} s")

    cmd = [
        sys.executable,
        os.path.join(REPO, "prepare_data.py"),
        "--data_file",
        data_file,
        "--output_dir",
        os.path.join(args.work_dir, "out"),
        *args.extra,
    ]
    if args.images == "none":
        cmd += ["--check_images", "false"]
    size_mb = os.path.getsize(data_file) / 1e6
    print(f"$ {' '.join(cmd)}\n  input: {args.records} records, {size_mb:.0f} MB")
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_gib = usage.ru_maxrss / 2**20  # KiB on Linux; the largest single child process
    print(
        f"wall {wall:.1f} s (target <= {TARGET_SECONDS:.0f} s): {'OK' if wall <= TARGET_SECONDS else 'OVER'}"
    )
    print(
        f"peak RSS {rss_gib:.2f} GiB (target <= {TARGET_RSS_GIB} GiB): {'OK' if rss_gib <= TARGET_RSS_GIB else 'OVER'}"
    )
    print(
        f"CPU {usage.ru_utime + usage.ru_stime:.1f} s (user {usage.ru_utime:.1f} + sys {usage.ru_stime:.1f}) "
        f"on {os.cpu_count()} cores; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        "(other processes make wall time longer)"
    )


if __name__ == "__main__":
    main()
