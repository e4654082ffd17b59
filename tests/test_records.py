"""records.py: streaming loader (spans, errors, BOM, chunk boundaries), validation, placeholders, paths."""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

import pytest

from qwen3vl_sft.data import records
from qwen3vl_sft.data.records import (
    DataError,
    ImageIndex,
    MisalignedSplit,
    check_record,
    ensure_image_placeholders,
    load_records,
    resolve_image_path,
    scan_records,
    splice_placeholders,
    split_points,
)


def rec(i: int, question: str = "What is shown?", n_images: int = 1, **extra) -> dict:
    return {
        "id": f"r{i}",
        "image": [f"images/r{i}_{k}.jpg" for k in range(n_images)],
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": f"Answer {i}."}],
        "modality": "CT",
        "body_part": "Chest",
        **extra,
    }


SAMPLE = [
    rec(0),
    rec(1, "Größe 5 μm? “quoted” \\ back/slash \t tab", n_images=2),
    rec(2, "<image>\nAlready there", n_images=1),
    rec(3, "😀 emoji outside the BMP", n_images=3),
]


def write(path, text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(data)
    return str(path)


@pytest.fixture(params=["array-indent", "array-compact", "array-ascii", "jsonl", "array-bom", "jsonl-bom"])
def sample_file(request, tmp_path) -> str:
    kind = request.param
    if kind.startswith("jsonl"):
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in SAMPLE) + "\n\n"
    elif kind == "array-compact":
        text = json.dumps(SAMPLE, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(SAMPLE, indent=4, ensure_ascii=kind == "array-ascii")
    prefix = codecs.BOM_UTF8 if kind.endswith("bom") else b""
    return write(tmp_path / "data.json", prefix + text.encode("utf-8"))


def test_every_format_loads_the_same_records_with_exact_byte_spans(sample_file):
    assert load_records(sample_file) == SAMPLE
    data = Path(sample_file).read_bytes()
    for scanned, expected in zip(scan_records(sample_file), SAMPLE, strict=True):
        assert json.loads(data[scanned.offset : scanned.offset + scanned.length]) == expected


def test_records_spanning_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "_CHUNK_BYTES", 7)  # every record and many strings cross a chunk end
    path = write(tmp_path / "d.json", json.dumps(SAMPLE * 3, indent=2, ensure_ascii=False))
    assert load_records(path) == SAMPLE * 3


@pytest.mark.parametrize("chunk", [7, 1 << 23])
def test_malformed_json_names_file_line_and_byte(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(records, "_CHUNK_BYTES", chunk)
    text = json.dumps(SAMPLE, indent=4)
    lines = text.split("\n")
    bad_line = next(i for i, line in enumerate(lines) if '"r2"' in line)  # 0-based
    lines[bad_line] = lines[bad_line].rstrip(",")  # drop the comma after the id of r2
    path = write(tmp_path / "broken.json", "\n".join(lines))
    with pytest.raises(DataError) as err:
        load_records(path)
    msg = str(err.value)
    assert "\n" not in msg and path in msg
    assert f"line {bad_line + 2}" in msg and "byte " in msg  # the error is at the next key


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[{"id": 1}', "unterminated array"),
        ('[{"id": 1}] x', "extra data"),
        ('[{"id": 1},]', "Expecting"),
        ('[{"id": 1} {"id": 2}]', "expected ',' or ']'"),
        ("[1, 2]", "expected a record object"),
        ('"just a string"', "expected '['"),
        ("", "is empty"),
        ('{"id": 1}\n{"id": \n', "line 2"),
        ('{"id": 1}\n[1]\n', "line 2"),
    ],
)
def test_malformed_inputs_raise_one_line_errors(tmp_path, text, fragment):
    path = write(tmp_path / "bad.json", text)
    with pytest.raises(DataError) as err:
        load_records(path)
    assert fragment in str(err.value) and path in str(err.value) and "\n" not in str(err.value)


def test_invalid_utf8_is_an_error(tmp_path):
    path = write(tmp_path / "latin1.json", b'[{"id": "caf' + b"\xe9" + b'"}]')
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(path)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({**rec(0), "conversations": []}, "no_conversations"),
        ({k: v for k, v in rec(0).items() if k != "conversations"}, "no_conversations"),
        ({**rec(0), "conversations": [{"from": "human", "value": "q"}]}, "no_gpt_turn"),
        ({**rec(0), "conversations": [{"from": "gpt", "value": "a"}]}, "no_human_turn"),
        (
            {**rec(0), "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
            "malformed_turn",
        ),
        ({**rec(0), "image": []}, "empty_image_list"),
        ({**rec(0), "image": [""]}, "empty_image_list"),
        (rec(0, "<image>\n<image>\nq", n_images=1), "too_many_placeholders"),
        ("not a dict", "not_an_object"),
        (rec(0), None),
    ],
)
def test_check_record_reasons(record, reason):
    assert check_record(record) == reason
    assert reason is None or reason in records.SKIP_REASONS


def turns(*pairs: tuple[str, str], n_images: int = 1) -> dict:
    return {**rec(0, n_images=n_images), "conversations": [{"from": f, "value": v} for f, v in pairs]}


# Degenerate conversations that would train the model on nothing, or on an answer to nothing.
@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (turns(("human", "q"), ("gpt", "")), "empty_answer"),
        (turns(("human", "q"), ("gpt", " \n\t ")), "empty_answer"),
        (turns(("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "  ")), "empty_answer"),
        (turns(("gpt", "Hello."), ("human", "q"), ("gpt", "a")), "answer_without_question"),
        (turns(("human", "q"), ("gpt", "a"), ("gpt", "and more")), "answer_without_question"),
        (turns(("human", "q"), ("gpt", "a"), ("human", "  "), ("gpt", "b")), "empty_question"),
        (turns(("human", ""), ("gpt", "a"), ("human", "<image>\nq2"), ("gpt", "b")), "empty_question"),
        (
            turns(("human", ""), ("gpt", "a"), ("human", "  "), ("gpt", "b")),
            "empty_question",
        ),  # 2nd blank too
        (turns(("human", "q"), ("gpt", "See <image> here.")), "placeholder_in_answer"),
        (turns(("human", "q"), ("assistant", "a")), "unknown_role"),
        (turns(("system", "be nice"), ("human", "q"), ("gpt", "a")), "unknown_role"),
        (turns(("gpt", "a")), "no_human_turn"),
        # kept: the image goes into the empty first question; a trailing question supervises nothing
        (turns(("human", ""), ("gpt", "a")), None),
        (turns(("human", "<image>"), ("gpt", "a")), None),
        (turns(("human", "q"), ("gpt", "a"), ("human", "q2")), None),
        (turns(("human", "q"), ("human", "more context"), ("gpt", "a")), None),
    ],
)
def test_degenerate_conversations_are_skip_reasons(record, reason):
    assert check_record(record) == reason
    assert reason is None or reason in records.SKIP_REASONS


def test_the_training_loader_counts_the_same_skip_reasons():
    """valid_records (what the training loader calls) applies the same rule as prepare_data."""
    bad = [turns(("human", "q"), ("gpt", " ")), turns(("gpt", "hi"), ("human", "q"), ("gpt", "a"))]
    kept, skipped = records.valid_records([rec(1), *bad, rec(2)])
    assert [r["id"] for r in kept] == ["r1", "r2"]
    assert skipped == {"empty_answer": 1, "answer_without_question": 1}


@pytest.mark.parametrize(
    ("question", "n_images", "expected"),
    [
        ("Q?", 1, "<image>\nQ?"),
        ("Q?", 2, "<image>\n<image>\nQ?"),
        ("Q?", 3, "<image>\n<image>\n<image>\nQ?"),
        ("<image>\nQ?", 2, "<image>\n<image>\nQ?"),  # one present, one missing
        ("Compare <image> and <image>.", 2, "Compare <image> and <image>."),  # complete: untouched
    ],
)
def test_ensure_image_placeholders(question, n_images, expected):
    record = rec(0, question, n_images)
    before = json.dumps(record)
    fixed = ensure_image_placeholders(record)
    assert fixed["conversations"][0]["value"] == expected
    assert fixed["conversations"][1] == record["conversations"][1]
    assert json.dumps(record) == before  # input not modified
    assert (fixed is record) == (question == expected)


def test_placeholders_go_into_the_first_human_turn_and_string_images_become_lists():
    record = {
        "image": "images/a.jpg",
        "conversations": [
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ],
    }
    fixed = ensure_image_placeholders(record)
    assert fixed["image"] == ["images/a.jpg"]
    assert [t["value"] for t in fixed["conversations"]] == ["<image>\nQ1", "A1", "Q2", "A2"]


SPLICE_CASES = [
    rec(0),
    rec(1, "Größe 5 μm? “quoted” \\ back/slash", n_images=2),
    rec(2, "😀 emoji", n_images=3),
    rec(3, "", n_images=1),  # empty question
    {**rec(4), "conversations": [{"value": "Same", "from": "human"}, {"from": "gpt", "value": "Same"}]},
    {**rec(5), "conversations": [{"from": "human", "value": "Echo"}, {"from": "gpt", "value": "Echo"}]},
    {**rec(6), "note": {"value": "What is shown?"}},  # a look-alike "value" key before the turns
]


@pytest.mark.parametrize("ensure_ascii", [False, True])
@pytest.mark.parametrize("indent", [None, 4])
def test_splicing_raw_bytes_equals_fixing_the_record(tmp_path, ensure_ascii, indent):
    text = json.dumps(SPLICE_CASES, ensure_ascii=ensure_ascii, indent=indent).replace("/", "\\/")
    path = write(tmp_path / "d.json", text)
    data = Path(path).read_bytes()
    for scanned, record in zip(scan_records(path), SPLICE_CASES, strict=True):
        at = scanned.placeholder_offset()
        assert at >= 0, record["id"]
        raw = data[scanned.offset : scanned.offset + scanned.length]
        missing = records.missing_placeholders(record)
        assert json.loads(splice_placeholders(raw, at, missing)) == ensure_image_placeholders(record)


def test_resolve_image_path_confines_paths(tmp_path):
    root = str(tmp_path)
    assert resolve_image_path(root, "images/a.jpg") == os.path.join(root, "images", "a.jpg")
    assert resolve_image_path(root, "images/../images/a.jpg") == os.path.join(root, "images", "a.jpg")
    assert resolve_image_path(root, os.path.join(root, "b.jpg")) == os.path.join(root, "b.jpg")
    for bad in ["../secret.jpg", "images/../../secret.jpg", "/etc/passwd", "..\\..\\x.jpg"]:
        with pytest.raises(DataError, match="record pmc_7") as err:
            resolve_image_path(root, bad, record_id="pmc_7")
        assert "outside the image root" in str(err.value)


def test_image_index_reports_missing_and_escaping_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"x")
    index = ImageIndex(str(tmp_path))
    assert index.problem({"image": ["images/a.jpg"]}) is None
    assert index.problem({"image": ["./images/a.jpg"]}) is None
    assert index.problem({"image": ["images/a.jpg", "images/b.jpg"]}) == "missing_image"
    assert index.problem({"image": ["nodir/a.jpg"]}) == "missing_image"
    assert index.problem({"image": ["../images/a.jpg"]}) == "image_outside_root"
    assert ImageIndex(str(tmp_path), check_exists=False).problem({"image": ["images/b.jpg"]}) is None
    assert (
        ImageIndex(str(tmp_path), check_exists=False).problem({"image": ["/x/b.jpg"]}) == "image_outside_root"
    )


@pytest.mark.parametrize("jsonl", [False, True])
def test_split_points_cut_at_record_starts(tmp_path, monkeypatch, jsonl):
    monkeypatch.setattr(records, "_MIN_SPLIT_BYTES", 0)
    many = [rec(i, "q " * (i % 7), n_images=1 + i % 3) for i in range(300)]
    text = "\n".join(json.dumps(r) for r in many) if jsonl else json.dumps(many, indent=2)
    path = write(tmp_path / "d.json", text)
    points = split_points(path, 3)
    assert len(points) == 3 and points[0] == 0
    parts = [list(scan_records(path, a, b)) for a, b in zip(points, [*points[1:], None], strict=True)]
    assert all(parts)
    assert [s.record for part in parts for s in part] == many


def test_a_split_point_inside_a_record_is_detected(tmp_path):
    path = write(tmp_path / "d.json", json.dumps([rec(i) for i in range(5)], indent=2))
    data = Path(path).read_bytes()
    inside = data.index(b'"r3"')
    with pytest.raises(MisalignedSplit):
        list(scan_records(path, 0, inside))
