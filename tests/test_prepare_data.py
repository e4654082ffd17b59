"""prepare_data.py end to end on small synthetic PubMedVision files (offline, CPU, tiny JPEGs)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import types
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import prepare_data
from qwen3vl_sft.data import json_scan, sharding
from qwen3vl_sft.data.records import ensure_image_placeholders

REPO = Path(__file__).resolve().parents[1]
MODALITIES = ["CT", "MRI", "X-Ray", "Ultrasound", "Microscopy"]
BODY_PARTS = ["Chest", "Head", "Abdomen", "Pelvis"]
MAX_IMAGES = 3  # images per record: 1..3, each record its own (records sharing one are linked)


def good_record(i: int) -> dict:
    n = 1 + i % 3
    question = "<image>\nWhat is shown?" if i % 5 == 0 and n == 1 else f"Question {i}: what is shown (5 μm)?"
    return {
        "id": f"r{i}",
        "image": [f"images/img{i}_{k}.jpg" for k in range(n)],
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": f"Answer {i}. " * 5},
        ],
        "modality": MODALITIES[i % len(MODALITIES)],
        "body_part": BODY_PARTS[(i // 2) % len(BODY_PARTS)],
    }


BAD_RECORDS = {
    "no_conversations": {"id": "b1", "image": ["images/img0_0.jpg"], "conversations": []},
    "no_gpt_turn": {
        "id": "b2",
        "image": ["images/img0_0.jpg"],
        "conversations": [{"from": "human", "value": "q"}],
    },
    "empty_image_list": {
        "id": "b3",
        "image": [],
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    },
    "missing_image": {
        "id": "b4",
        "image": ["images/nope.jpg"],
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    },
    "image_outside_root": {
        "id": "b5",
        "image": ["../outside.jpg"],
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    },
}


def tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 0, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def image_names(n: int) -> list[str]:
    return [f"img{i}_{k}.jpg" for i in range(n) for k in range(MAX_IMAGES)]


def make_images(folder: Path, n: int = 120) -> None:
    """The images of records r0 .. r{n-1} (one JPEG's bytes under every name: paths are what counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = tiny_jpeg()
    for name in image_names(n):
        (folder / name).write_bytes(data)


def write_dataset(root: Path, n: int = 120, bad: bool = True, jsonl: bool = False) -> Path:
    make_images(root / "images", n)
    data = [good_record(i) for i in range(n)]
    if bad:
        data[3:3] = BAD_RECORDS.values()
    path = root / ("data.jsonl" if jsonl else "data.json")
    if jsonl:
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in data) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(data, indent=4, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "PubMedVision")


def run(data_file, out, *flags, capsys=None) -> tuple[int, str, str]:
    rc = prepare_data.main(["--data_file", str(data_file), "--output_dir", str(out), *map(str, flags)])
    captured = capsys.readouterr() if capsys else None
    return rc, (captured.out if captured else ""), (captured.err if captured else "")


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def ids(path: Path) -> list[str]:
    return [r["id"] for r in load(path)]


def site_files(out: Path, k: int) -> dict[str, Path]:
    files = {"test.json": out / "test.json"}
    for i in range(1, k + 1):
        files[f"site-{i}/train.json"] = out / f"site-{i}" / "train.json"
        files[f"site-{i}/val.json"] = out / f"site-{i}" / "val.json"
    return files


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- happy path


def test_default_split_prints_the_seed_lines_and_partitions_the_usable_records(dataset, tmp_path, capsys):
    out = tmp_path / "data"
    rc, stdout, _ = run(dataset, out, capsys=capsys)
    assert rc == 0
    lines = stdout.splitlines()
    site_lines = [line for line in lines if line.startswith("  site-")]
    assert site_lines == [
        f"  site-{i}: {len(load(out / f'site-{i}' / 'train.json'))} samples -> {out}/site-{i}/train.json"
        for i in (1, 2, 3)
    ]
    assert lines[-1] == f"Done. Client data under {out}"

    parts = [ids(p) for p in site_files(out, 3).values()]
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat))  # no record in two files
    assert set(flat) == {f"r{i}" for i in range(120)}  # every usable record somewhere, no bad one
    assert len(load(out / "test.json")) == 6  # 5 % of 120
    for i in (1, 2, 3):
        assert len(load(out / f"site-{i}" / "val.json")) == 4  # 10 % of 38
        assert len(load(out / f"site-{i}" / "train.json")) == 34


def test_records_are_copied_with_placeholders_ensured(dataset, tmp_path):
    out = tmp_path / "data"
    assert run(dataset, out)[0] == 0
    expected = {f"r{i}": ensure_image_placeholders(good_record(i)) for i in range(120)}
    seen = Counter()
    for path in site_files(out, 3).values():
        for record in load(path):
            assert record == expected[record["id"]]
            question = record["conversations"][0]["value"]
            assert question.count("<image>") == len(record["image"])
            seen[len(record["image"])] += 1
    assert set(seen) == {1, 2, 3}
    r2 = expected["r2"]["conversations"][0]["value"]
    assert r2 == "<image>\n<image>\n<image>\nQuestion 2: what is shown (5 μm)?"


def test_manifest_counts_skips_and_hashes(dataset, tmp_path):
    out = tmp_path / "data"
    assert run(dataset, out, "--subset_size", 30)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {reason: 1 for reason in BAD_RECORDS}
    assert manifest["source"]["records"] == 125 and manifest["usable_records"] == 120
    assert manifest["config"]["subset_size"] == 30 and manifest["config"]["split"] == "iid"
    assert manifest["dropped"]["subset_size"] == 3 * (34 - 30) + 3 * (4 - 3)
    for rel, path in site_files(out, 3).items():
        data = path.read_bytes()
        assert manifest["files"][rel] == {
            "records": len(json.loads(data)),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    for i in (1, 2, 3):
        for part in ("train", "val"):
            data = load(out / f"site-{i}" / f"{part}.json")
            counts = manifest["sites"][f"site-{i}"][part]
            assert counts["count"] == len(data) == (30 if part == "train" else 3)
            assert counts["by_modality"] == dict(Counter(r["modality"] for r in data))
            assert counts["by_body_part"] == dict(Counter(r["body_part"] for r in data))


def test_split_is_deterministic_by_seed(dataset, tmp_path):
    runs = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        assert run(dataset, tmp_path / name, "--seed", seed)[0] == 0
        runs[name] = {rel: p.read_bytes() for rel, p in site_files(tmp_path / name, 3).items()}
    assert runs["a"] == runs["b"]
    assert ids(tmp_path / "a" / "site-1" / "train.json") != ids(tmp_path / "c" / "site-1" / "train.json")


def test_jsonl_input_gives_the_same_shards_as_the_json_array(tmp_path):
    array = write_dataset(tmp_path / "a")
    lines = write_dataset(tmp_path / "b", jsonl=True)
    assert run(array, tmp_path / "out_a")[0] == 0
    assert run(lines, tmp_path / "out_b")[0] == 0
    for rel in site_files(tmp_path / "out_a", 3):
        assert load(tmp_path / "out_a" / rel) == load(tmp_path / "out_b" / rel)


def test_parallel_read_gives_byte_identical_output(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(json_scan, "_MIN_SPLIT_BYTES", 0)  # split even this small file
    assert len(json_scan.split_points(str(dataset), 3)) == 3
    assert run(dataset, tmp_path / "one", "--num_workers", 1)[0] == 0
    assert run(dataset, tmp_path / "three", "--num_workers", 3)[0] == 0
    one, three = tree(tmp_path / "one"), tree(tmp_path / "three")
    assert one.keys() == three.keys()
    assert all(one[k] == three[k] for k in one if k != "manifest.json")
    m1, m3 = (json.loads(t["manifest.json"]) for t in (one, three))
    assert m1["files"] == m3["files"] and m1["sites"] == m3["sites"] and m1["skipped"] == m3["skipped"]


@pytest.mark.parametrize("victim", ["r10", "r110"])  # in the first part, in the last part
def test_parallel_read_reports_the_same_error(dataset, tmp_path, monkeypatch, capsys, victim):
    monkeypatch.setattr(json_scan, "_MIN_SPLIT_BYTES", 0)
    dataset.write_text(dataset.read_text().replace(f'"id": "{victim}",', f'"id": "{victim}"', 1))
    errors = [run(dataset, tmp_path / f"w{w}", "--num_workers", w, capsys=capsys)[2] for w in (1, 3)]
    assert "malformed JSON" in errors[0] and "line " in errors[0]
    assert errors[0] == errors[1]


# --------------------------------------------------------------------------- non-IID splits


def skew(out: Path, key: str, k: int) -> float:
    """Mean over labels of the largest share of that label on one site (1.0 = fully separated)."""
    per_site = [
        Counter(r[key] for part in ("train", "val") for r in load(out / f"site-{i}" / f"{part}.json"))
        for i in range(1, k + 1)
    ]
    labels = set().union(*per_site)
    return sum(max(c[lab] for c in per_site) / sum(c[lab] for c in per_site) for lab in labels) / len(labels)


@pytest.mark.parametrize("key", ["modality", "body_part"])
def test_group_split_puts_each_label_on_one_site(dataset, tmp_path, key):
    out = tmp_path / "data"
    assert run(dataset, out, "--split", key)[0] == 0
    assert skew(out, key, 3) == 1.0
    sizes = [len(load(out / f"site-{i}" / "train.json")) for i in (1, 2, 3)]
    assert min(sizes) > 0
    test_labels = {r[key] for r in load(out / "test.json")}
    assert len(test_labels) > 1  # the held-out set stays global, not one site's labels


def test_dirichlet_small_alpha_is_skewed_and_iid_is_not(tmp_path):
    data = write_dataset(tmp_path / "src", n=600, bad=False)
    assert run(data, tmp_path / "iid")[0] == 0
    assert (
        run(data, tmp_path / "dir", "--split", "dirichlet", "--alpha", 0.1, "--dirichlet_key", "modality")[0]
        == 0
    )
    assert skew(tmp_path / "iid", "modality", 3) < 0.45
    assert skew(tmp_path / "dir", "modality", 3) > 0.75


def test_group_split_with_too_few_groups_is_an_error(dataset, tmp_path, capsys):
    rc, _, err = run(dataset, tmp_path / "data", "--split", "modality", "--num_sites", 6, capsys=capsys)
    assert rc != 0 and "--split modality" in err and "--num_sites" in err


# --------------------------------------------------------------------------- errors


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("prepare_data.py: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_missing_data_file_names_it_and_both_remedies(tmp_path, capsys):
    rc, _, err = run(tmp_path / "nope.json", tmp_path / "data", capsys=capsys)
    assert_one_line_error(
        rc, err, str(tmp_path / "nope.json"), "git lfs", "FreedomIntelligence/PubMedVision", "--data_file ''"
    )
    assert not (tmp_path / "data").exists()


def test_malformed_json_names_the_file_and_line(dataset, tmp_path, capsys):
    text = dataset.read_text(encoding="utf-8").replace('"id": "r7",', '"id": "r7"', 1)
    line = text[: text.index('"id": "r7"')].count("\n") + 2
    dataset.write_text(text, encoding="utf-8")
    rc, _, err = run(dataset, tmp_path / "data", capsys=capsys)
    assert_one_line_error(rc, err, "malformed JSON", str(dataset), f"line {line}")
    assert not list((tmp_path / "data").iterdir())  # nothing half-written


@pytest.mark.parametrize(
    ("flag", "value"), [("--num_sites", 0), ("--num_sites", -2), ("--val_fraction", 1.0), ("--alpha", 0)]
)
def test_bad_flags_name_the_flag(dataset, tmp_path, capsys, flag, value):
    rc, _, err = run(dataset, tmp_path / "data", flag, value, capsys=capsys)
    assert_one_line_error(rc, err, flag)


def test_fewer_records_than_sites(tmp_path, capsys):
    data = write_dataset(tmp_path / "src", n=4)  # 4 usable records, 0 test
    rc, _, err = run(data, tmp_path / "data", "--num_sites", 5, capsys=capsys)
    assert_one_line_error(rc, err, "only 4 usable records", "--num_sites 5")


def test_output_dir_not_writable(dataset, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run(dataset, blocker / "data", capsys=capsys)
    assert_one_line_error(rc, err, "--output_dir", str(blocker / "data"), "not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_dir_without_write_permission(dataset, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    rc, _, err = run(dataset, out, capsys=capsys)
    assert_one_line_error(rc, err, "--output_dir", "not writable")


class _FullDisk:
    """A file object whose writes fail with ENOSPC after ``budget`` bytes."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data: bytes) -> int:
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def test_disk_full_leaves_the_previous_output_untouched(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "data"
    assert run(dataset, out, "--seed", 1)[0] == 0
    before = tree(out)
    failed = []

    def open_on_a_full_disk(path, *args, **kwargs):  # site-2/train.json runs out of space
        f = open(path, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
        if str(path).endswith(os.path.join("site-2", "train.json")):
            failed.append(path)
            return _FullDisk(f, 1000)
        return f

    monkeypatch.setattr(sharding, "open", open_on_a_full_disk, raising=False)
    rc, _, err = run(dataset, out, "--seed", 2, capsys=capsys)
    assert_one_line_error(rc, err, "disk full", str(out / "site-2" / "train.json"))
    assert failed  # the simulated failure really happened
    assert tree(out) == before  # old shards intact, no temp files or staging folder left
    assert sorted(os.listdir(out)) == ["manifest.json", "site-1", "site-2", "site-3", "test.json"]


def test_counted_skips_are_reported(dataset, tmp_path, capsys):
    rc, stdout, _ = run(dataset, tmp_path / "data", capsys=capsys)
    assert rc == 0
    summary = next(line for line in stdout.splitlines() if line.startswith("Read "))
    for reason in BAD_RECORDS:
        assert f"{reason}=1" in summary


def test_all_images_missing_is_an_error_with_the_fix(dataset, tmp_path, capsys):
    rc, _, err = run(dataset, tmp_path / "data", "--image_root", tmp_path / "empty", capsys=capsys)
    assert rc != 0 and "--check_images false" in err
    rc, _, _ = run(dataset, tmp_path / "data", "--image_root", tmp_path / "empty", "--check_images", "false")
    assert rc == 0


def test_subprocess_exit_code_and_stderr(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "prepare_data.py"),
            "--data_file",
            str(tmp_path / "x.json"),
            "--output_dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "x.json does not exist" in proc.stderr


# --------------------------------------------------------------------------- images and hub


def test_image_zips_are_extracted_into_images(tmp_path):
    root = tmp_path / "PubMedVision"
    root.mkdir()
    names = image_names(120)
    half = len(names) // 2
    with zipfile.ZipFile(root / "images_0.zip", "w") as zf:  # paths with a leading images/ folder
        for name in names[:half]:
            zf.writestr(f"images/{name}", tiny_jpeg())
        zf.writestr("images/", "")
    with zipfile.ZipFile(root / "images_1.zip", "w") as zf:  # bare names, and one hostile path
        for name in names[half:]:
            zf.writestr(name, tiny_jpeg())
        zf.writestr("../evil.jpg", "x")
    data = write_dataset(tmp_path / "tmp")  # records + images elsewhere; only the records are used
    (root / "data.json").write_bytes(data.read_bytes())
    out = tmp_path / "data"
    assert run(root / "data.json", out)[0] == 0
    assert sorted(os.listdir(root / "images")) == sorted(names)
    assert not (tmp_path / "evil.jpg").exists() and not (root / "evil.jpg").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["usable_records"] == 120  # every good record found its images


def test_hub_download_is_exported_once_and_used(tmp_path, monkeypatch, capsys):
    calls = []

    class FakeDataset:
        def to_json(self, path, lines, force_ascii):
            assert lines and not force_ascii
            Path(path).write_text("\n".join(json.dumps(good_record(i)) for i in range(30)) + "\n")

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "PubMedVision" / "images", 30)
    rc, stdout, _ = run("", "data", capsys=capsys)
    assert rc == 0, stdout
    assert calls == [
        (("FreedomIntelligence/PubMedVision", "PubMedVision_InstructionTuning_VQA"), {"split": "train"})
    ]
    assert (tmp_path / "PubMedVision" / "PubMedVision_InstructionTuning_VQA.jsonl").is_file()
    assert re.search(r"^  site-1: \d+ samples -> data/site-1/train.json$", stdout, re.M)
    assert run("", "data2")[0] == 0 and len(calls) == 1  # second run reuses the export
