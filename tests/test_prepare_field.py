"""prepare_data.py on what the field sends: duplicates, shared images, relative paths, degenerate
splits and records, flags that cannot work, Ctrl-C (offline, CPU, tiny files)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import prepare_data
from qwen3vl_sft.config import DataConfig, PrepareDataConfig
from qwen3vl_sft.data import sharding, synthetic
from qwen3vl_sft.data.records import ImageIndex
from qwen3vl_sft.data.samples import resolve_image_root

REPO = Path(__file__).resolve().parents[1]
SPLITS = [
    ["--split", "iid"],
    ["--split", "modality"],
    ["--split", "body_part"],
    ["--split", "dirichlet", "--alpha", "0.3"],
]


def record(i: int, images: list[str] | None = None, answer: str | None = None, **extra) -> dict:
    return {
        "id": f"r{i}",
        "image": images or [f"images/img{i}.jpg"],
        "conversations": [
            {"from": "human", "value": f"Question {i}?"},
            {"from": "gpt", "value": answer or f"Answer {i}."},
        ],
        "modality": ["CT", "MRI", "X-Ray", "Ultrasound"][i % 4],
        "body_part": ["Chest", "Head", "Abdomen"][i % 3],
        **extra,
    }


def write(root: Path, records: list[dict]) -> Path:
    """The records as a JSON array, with an (empty) file for every image they name."""
    for path in {p for r in records if isinstance(r, dict) for p in r.get("image") or ()}:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")  # existence is all prepare_data checks
    data = root / "data.json"
    data.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return data


def run(data: Path, out: Path, *flags, capsys=None) -> tuple[int, str, str]:
    rc = prepare_data.main(["--data_file", str(data), "--output_dir", str(out), *map(str, flags)])
    captured = capsys.readouterr() if capsys else None
    return rc, (captured.out if captured else ""), (captured.err if captured else "")


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def output_files(out: Path) -> dict[str, list[dict]]:
    """Every shard prepare_data wrote, by its path relative to ``out``."""
    manifest = load_manifest(out)
    return {rel: load(out / rel) for rel in manifest["files"]}


def load_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def where(files: dict[str, list[dict]], key) -> dict:
    """``key(record)`` -> the set of files holding a record with that key."""
    found = collections.defaultdict(set)
    for rel, records in files.items():
        for r in records:
            for k in key(r):
                found[k].add(rel)
    return found


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("prepare_data.py: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# --------------------------------------------------------------------------- finding 3: absolute paths


def test_relative_paths_are_written_absolute_and_resolve_from_another_cwd(tmp_path, monkeypatch, capsys):
    (tmp_path / "imgs").mkdir()
    records = [record(i) for i in range(30)]
    data = write(tmp_path / "imgs", records)
    (tmp_path / "src").mkdir()
    data = data.rename(tmp_path / "src" / "data.json")  # records here, images under ../imgs
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    rc, _, err = run(Path("../src/data.json"), Path("../out"), "--image_root", "../imgs", capsys=capsys)
    assert rc == 0, err
    manifest = load_manifest(tmp_path / "out")
    assert manifest["image_root"] == manifest["config"]["image_root"] == str(tmp_path / "imgs")
    assert manifest["config"]["data_file"] == manifest["source"]["path"] == str(data)
    assert manifest["config"]["output_dir"] == str(tmp_path / "out")
    monkeypatch.chdir(tmp_path)  # a site's working directory is anywhere
    train = tmp_path / "out" / "site-1" / "train.json"
    assert resolve_image_root(DataConfig(), train).resolve() == (tmp_path / "imgs").resolve()


def test_the_default_image_root_is_written_absolute_too(tmp_path, monkeypatch):
    write(tmp_path, [record(i) for i in range(30)])
    monkeypatch.chdir(tmp_path)
    assert run(Path("data.json"), Path("out"))[0] == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["image_root"] == manifest["config"]["image_root"] == str(tmp_path)
    assert all(os.path.isabs(manifest["config"][k]) for k in ("data_file", "image_root", "output_dir"))


# --------------------------------------------------------------------------- finding 5: duplicates, links


def field_records() -> list[dict]:
    """60 unique records plus exact copies, an id reused for other content, and shared images."""
    records = [record(i) for i in range(60)]
    records += [
        dict(records[3]),  # exact copy, same id
        {**records[4], "id": "copy-of-r4"},  # same content under another id
        {**records[5], "id": "copy-of-r5", "modality": "MRI"},  # labels differ: still the same sample
        record(1, answer="A different answer for the same id."),  # id r1, other content: kept
        record(61, images=["images/img7.jpg"]),  # another question about r7's image
        record(62, images=["images/img62.jpg", "images/img8.jpg"]),  # shares with r8 ...
        record(63, images=["./images/img62.jpg"]),  # ... and, spelled differently, with r62
    ]
    return records


def test_exact_duplicates_are_dropped_and_counted(tmp_path, capsys):
    data = write(tmp_path, field_records())
    rc, stdout, _ = run(data, tmp_path / "out", capsys=capsys)
    assert rc == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["skipped"] == {"duplicate": 3}
    assert manifest["duplicates"]["removed"] == 3
    assert manifest["source"]["records"] == 67 and manifest["usable_records"] == 64
    ids = collections.Counter(r["id"] for records in output_files(tmp_path / "out").values() for r in records)
    assert "copy-of-r4" not in ids and "copy-of-r5" not in ids and ids["r4"] == ids["r5"] == 1  # first kept
    assert ids["r3"] == 1 and ids["r1"] == 2
    assert "duplicate=3" in next(line for line in stdout.splitlines() if line.startswith("Read "))


def test_ids_with_different_content_are_reported_and_kept_together(tmp_path, capsys):
    data = write(tmp_path, field_records())
    rc, stdout, _ = run(data, tmp_path / "out", capsys=capsys)
    assert rc == 0
    conflicts = load_manifest(tmp_path / "out")["duplicates"]["ids_with_different_content"]
    assert conflicts == {"ids": 1, "records": 2, "examples": ["r1"]}
    warnings = [line for line in stdout.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "r1" in warnings[0]
    files = output_files(tmp_path / "out")
    assert len(where(files, lambda r: [r["id"]])["r1"]) == 1


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: s[1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_record_and_no_image_sits_on_two_sides_of_a_split(tmp_path, split, seed):
    records = [record(i) for i in range(80)]
    for i in range(0, 80, 8):  # chains: r(i) shares an image with r(i+1), which shares one with r(i+2)
        records[i + 1]["image"] = [records[i]["image"][0], f"images/link{i}.jpg"]
        records[i + 2]["image"] = [f"images/link{i}.jpg"]
    records += [dict(records[k]) for k in (10, 20, 30)]  # and a few exact copies
    data = write(tmp_path, records)
    assert (
        run(data, tmp_path / "out", "--seed", seed, "--val_fraction", 0.2, "--test_fraction", 0.2, *split)[0]
        == 0
    )
    files = output_files(tmp_path / "out")
    content = where(files, lambda r: [json.dumps([r["image"], r["conversations"]])])
    assert all(len(places) == 1 for places in content.values())
    images = where(files, lambda r: [os.path.normpath(p) for p in r["image"]])
    assert all(len(places) == 1 for places in images.values()), {
        k: v for k, v in images.items() if len(v) > 1
    }
    assert sum(len(r) for r in files.values()) == 80
    links = load_manifest(tmp_path / "out")["links"]
    assert links == {"groups": 10, "records": 30, "largest": 3}


def test_shared_image_spelled_differently_is_one_image(tmp_path):
    data = write(tmp_path, field_records())
    assert run(data, tmp_path / "out", "--test_fraction", 0.3)[0] == 0
    files = output_files(tmp_path / "out")
    by_id = where(files, lambda r: [r["id"]])
    assert by_id["r8"] == by_id["r62"] == by_id["r63"]  # r8 - r62 - r63 through img8 and ./img62
    assert by_id["r7"] == by_id["r61"]


def test_unlinked_records_split_exactly_as_the_record_level_algorithm(tmp_path):
    """Without shared images or ids the split is the plain one: a seeded permutation, the test set
    first, np.array_split over the sites, each site's first round(n * val_fraction) as val."""
    data = write(tmp_path, [record(i) for i in range(101)])
    cfg = PrepareDataConfig(data_file=str(data), num_sites=3, seed=5, val_fraction=0.2, test_fraction=0.1)
    pool = sharding.collect(str(data), ImageIndex(str(tmp_path)))
    split = sharding.split_pool(pool, cfg)
    perm = np.random.default_rng(5).permutation(101)
    assert split.test.tolist() == perm[:10].tolist()
    for site, val, train in zip(np.array_split(perm[10:], 3), split.val, split.train, strict=True):
        n_val = round(len(site) * 0.2)
        assert val.tolist() == site[:n_val].tolist() and train.tolist() == site[n_val:].tolist()


def test_realistic_synthetic_data_is_deduplicated_linked_and_absolute(tmp_path, monkeypatch):
    spec = synthetic.SyntheticSpec(num_records=300, seed=2, realistic=True)
    source = synthetic.generate(tmp_path / "synth", spec)
    records = load(source)
    copies = len(records) - len({json.dumps([r["image"], r["conversations"]]) for r in records})
    monkeypatch.chdir(tmp_path)
    assert run(Path("synth") / source.name, Path("out"), "--image_root", "synth")[0] == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["duplicates"]["removed"] == copies > 0
    assert manifest["usable_records"] == len(records) - copies  # defective images exist: not skipped here
    assert manifest["image_root"] == str(tmp_path / "synth") and os.path.isabs(manifest["source"]["path"])
    assert manifest["links"]["groups"] >= 2
    files = output_files(tmp_path / "out")
    images = where(files, lambda r: r["image"])
    assert all(len(places) == 1 for places in images.values())


# --------------------------------------------------------------------------- finding 9: degenerate splits


def test_val_fraction_0_writes_no_val_json_and_says_so(tmp_path, capsys):
    data = write(tmp_path, [record(i) for i in range(40)])
    rc, stdout, _ = run(data, tmp_path / "out", "--val_fraction", 0, capsys=capsys)
    assert rc == 0
    assert not list((tmp_path / "out").glob("site-*/val.json"))
    manifest = load_manifest(tmp_path / "out")
    assert manifest["held_out"] == {"val": False, "test": True}
    assert not [f for f in manifest["files"] if f.endswith("val.json")]
    assert "val: off (--val_fraction 0)" in stdout


def test_test_fraction_0_writes_no_test_json_and_removes_a_stale_one(tmp_path, capsys):
    data = write(tmp_path, [record(i) for i in range(40)])
    out = tmp_path / "out"
    assert run(data, out, "--num_clients", 4)[0] == 0  # the seed README's flag
    assert (out / "test.json").is_file() and (out / "site-4").is_dir()
    rc, stdout, _ = run(data, out, "--test_fraction", 0, "--num_sites", 2, capsys=capsys)
    assert rc == 0
    # a test.json left from the first run would hold records this run trains on; site-3/4 are stale
    assert sorted(os.listdir(out)) == ["manifest.json", "site-1", "site-2"]
    assert load_manifest(out)["held_out"] == {"val": True, "test": False}
    assert "test: off (--test_fraction 0)" in stdout
    assert sum(len(r) for r in output_files(out).values()) == 40


@pytest.mark.parametrize("flags", [["--val_fraction", 0.02], ["--test_fraction", 0.01]])
def test_a_requested_held_out_set_is_never_empty(tmp_path, flags):
    data = write(tmp_path, [record(i) for i in range(24)])  # 0.02 x 8 and 0.01 x 24 round to 0
    assert run(data, tmp_path / "out", *flags)[0] == 0
    files = output_files(tmp_path / "out")
    assert files and all(records for records in files.values())


def test_a_site_too_small_for_a_val_set_is_a_one_line_error(tmp_path, capsys):
    data = write(tmp_path, [record(i) for i in range(5)])
    rc, _, err = run(data, tmp_path / "out", "--num_sites", 4, capsys=capsys)
    assert_one_line_error(rc, err, "site-", "--val_fraction", "--num_sites")
    assert run(data, tmp_path / "out", "--num_sites", 4, "--val_fraction", 0)[0] == 0


def test_a_linked_group_too_large_for_the_sites_is_a_one_line_error(tmp_path, capsys):
    records = [record(i, images=["images/same.jpg"]) for i in range(10)] + [record(10)]
    data = write(tmp_path, records)
    rc, _, err = run(data, tmp_path / "out", "--num_sites", 3, "--test_fraction", 0, capsys=capsys)
    assert_one_line_error(rc, err, "share images", "--num_sites 3")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"from": "gpt", "value": "   "}, "empty_answer"),
        ({"from": "gpt", "value": ""}, "empty_answer"),
        ({"from": "gpt", "value": "An answer with <image> in it."}, "placeholder_in_answer"),
    ],
)
def test_degenerate_records_are_skipped_and_counted(tmp_path, bad, reason):
    records = [record(i) for i in range(20)]
    records[5]["conversations"][1] = bad
    records[6]["conversations"].insert(0, {"from": "gpt", "value": "Hello, how can I help?"})
    data = write(tmp_path, records)
    assert run(data, tmp_path / "out")[0] == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["skipped"] == {reason: 1, "answer_without_question": 1}
    ids = {r["id"] for records in output_files(tmp_path / "out").values() for r in records}
    assert "r5" not in ids and "r6" not in ids and len(ids) == 18


# --------------------------------------------------------------------------- flags that cannot work


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--num_workers", -1], ["--num_workers"]),
        (["--seed", -1], ["--seed"]),
        (["--alpha", "nan"], ["--alpha"]),
        (["--alpha", "inf"], ["--alpha"]),
        (["--val_fraction", "nan"], ["--val_fraction"]),
        (["--test_fraction", -0.1], ["--test_fraction"]),
        (["--subset_size", 0], ["--subset_size"]),
        (
            ["--image_root", "{tmp}/nowhere"],
            ["--image_root", "nowhere", "does not exist", "--check_images false"],
        ),
        (["--image_root", "{tmp}/data.json"], ["--image_root", "is not a folder"]),
    ],
)
def test_flags_that_cannot_work_are_refused_up_front(tmp_path, capsys, flags, fragments):
    data = write(tmp_path, [record(i) for i in range(20)])
    flags = [str(f).replace("{tmp}", str(tmp_path)) for f in flags]
    rc, stdout, err = run(data, tmp_path / "out", *flags, capsys=capsys)
    assert_one_line_error(rc, err, *fragments)
    assert "Reading" not in stdout  # refused before the long read
    assert not (tmp_path / "out").exists()


def test_a_missing_image_root_is_fine_without_the_image_check(tmp_path):
    data = write(tmp_path, [record(i) for i in range(20)])
    assert (
        run(data, tmp_path / "out", "--image_root", tmp_path / "nowhere", "--check_images", "false")[0] == 0
    )


def test_path_flags_that_cannot_work(tmp_path, capsys):
    data = write(tmp_path, [record(i) for i in range(20)])
    rc, _, err = run(data, data, capsys=capsys)
    assert_one_line_error(rc, err, "--output_dir", "is a file")
    rc, _, err = run(tmp_path, tmp_path / "out", capsys=capsys)
    assert_one_line_error(rc, err, "--data_file", "is a folder")
    (tmp_path / "out").mkdir()
    inside = (tmp_path / "out" / "test.json").write_bytes(
        data.read_bytes()
    ) and tmp_path / "out" / "test.json"
    rc, _, err = run(inside, tmp_path / "out", "--image_root", tmp_path, capsys=capsys)
    assert_one_line_error(rc, err, "--data_file", "would be replaced")
    assert (tmp_path / "out" / "test.json").read_bytes() == data.read_bytes()


def test_output_dir_spelled_through_a_folder_the_run_replaces(tmp_path, monkeypatch):
    data = write(tmp_path, [record(i) for i in range(20)])
    monkeypatch.chdir(tmp_path)
    # "out/site-1/.." stops resolving once site-1 is swapped for the new one, unless made absolute first
    assert run(data, Path("out/site-1/.."))[0] == 0
    assert sorted(os.listdir(tmp_path / "out")) == [
        "manifest.json",
        "site-1",
        "site-2",
        "site-3",
        "test.json",
    ]


# --------------------------------------------------------------------------- Ctrl-C


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where_", ["reading", "writing"])
def test_ctrl_c_ends_in_one_line_exit_130_and_leaves_the_output_as_it_was(
    tmp_path, monkeypatch, capsys, where_
):
    data = write(tmp_path, [record(i) for i in range(40)])
    out = tmp_path / "out"
    assert run(data, out, "--seed", 1)[0] == 0
    before = tree(out)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sharding, "_collect_range" if where_ == "reading" else "write_json_array", interrupt)
    rc, _, err = run(data, out, "--seed", 2, capsys=capsys)
    assert rc == 130 and err.count("\n") == 1 and "interrupted" in err and "unchanged" in err
    assert tree(out) == before  # no staging folder, no half-written shard


def test_ctrl_c_while_publishing_finishes_the_new_set_first(tmp_path, monkeypatch, capsys):
    data = write(tmp_path, [record(i) for i in range(40)])
    out = tmp_path / "out"
    publish = sharding.publish

    def publish_and_get_interrupted(stage, dest, names):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, between two renames
        publish(stage, dest, names)

    monkeypatch.setattr(sharding, "publish", publish_and_get_interrupted)
    rc, _, err = run(data, out, capsys=capsys)
    assert rc == 130 and err.count("\n") == 1 and "completely in place" in err
    monkeypatch.undo()
    assert run(data, tmp_path / "again")[0] == 0
    assert tree(out) == {k: v for k, v in tree(tmp_path / "again").items() if k != "manifest.json"} | {
        "manifest.json": (out / "manifest.json").read_bytes()
    }


def test_a_real_sigint_in_a_subprocess_prints_no_traceback(tmp_path):
    data = write(tmp_path, [record(i) for i in range(40)])
    script = (
        "import os, signal, sys, time\n"
        "import prepare_data\n"
        "from qwen3vl_sft.data import sharding\n"
        "def reading(*a):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "sharding._collect_range = reading\n"
        "sys.exit(prepare_data.main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "--data_file", str(data), "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 130
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
