"""records: the record schema's checks (skip reasons), placeholders, and image paths kept inside the root."""

from __future__ import annotations

import json
import os

import pytest

from qwen3vl_sft.data import records
from qwen3vl_sft.data.records import ImageIndex, check_record, ensure_image_placeholders, resolve_image_path
from qwen3vl_sft.errors import DataError


def rec(i: int, question: str = "What is shown?", n_images: int = 1, **extra) -> dict:
    return {
        "id": f"r{i}",
        "image": [f"images/r{i}_{k}.jpg" for k in range(n_images)],
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": f"Answer {i}."}],
        "modality": "CT",
        "body_part": "Chest",
        **extra,
    }


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
