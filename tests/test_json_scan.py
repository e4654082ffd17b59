"""json_scan: the streaming reader (spans, errors, BOM, chunk boundaries), splicing placeholders, split points."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from test_records import rec

from qwen3vl_sft.data import json_scan, records
from qwen3vl_sft.data.json_scan import (
    MisalignedSplit,
    load_records,
    scan_records,
    splice_placeholders,
    split_points,
)
from qwen3vl_sft.data.records import ensure_image_placeholders
from qwen3vl_sft.errors import DataError

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
    monkeypatch.setattr(json_scan, "_CHUNK_BYTES", 7)  # every record and many strings cross a chunk end
    path = write(tmp_path / "d.json", json.dumps(SAMPLE * 3, indent=2, ensure_ascii=False))
    assert load_records(path) == SAMPLE * 3


@pytest.mark.parametrize("chunk", [7, 1 << 23])
def test_malformed_json_names_file_line_and_byte(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(json_scan, "_CHUNK_BYTES", chunk)
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


@pytest.mark.parametrize("jsonl", [False, True])
def test_split_points_cut_at_record_starts(tmp_path, monkeypatch, jsonl):
    monkeypatch.setattr(json_scan, "_MIN_SPLIT_BYTES", 0)
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
