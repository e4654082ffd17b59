"""Answer metrics on literal strings, with the values worked out by hand.

.venv/bin/python -m pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import math

import pytest

from qwen3vl_sft.eval.metrics import exact_match, is_short, normalize, rouge_l, score_answers, token_f1


def test_normalize_and_exact_match_ignore_case_punctuation_and_spacing():
    assert normalize("  Upper   LEFT. ") == "upper left"
    assert exact_match("Upper left.", "upper left")
    assert exact_match("the second image!", "The second image")
    assert not exact_match("upper left", "upper right")
    assert not exact_match("", "upper left")


def test_token_f1_is_squad_overlap_without_articles():
    # pred tokens [upper, left, lobe] ("the" dropped), truth [upper, left]: P 2/3, R 1 -> F1 0.8
    assert token_f1("The upper left lobe", "upper left") == pytest.approx(0.8)
    assert token_f1("upper left", "upper left") == 1.0
    assert token_f1("lower right", "upper left") == 0.0
    # repeated words count once per occurrence: pred [left, left], truth [left]: P 1/2, R 1 -> 2/3
    assert token_f1("left left", "left") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0
    assert token_f1("", "upper left") == 0.0
    assert token_f1("the", "upper left") == 0.0  # only an article: nothing left to match


def test_rouge_l_is_lcs_f_measure():
    # pred 7 tokens, truth 5, LCS "lesion in upper left" = 4: P 4/7, R 4/5 -> F 2/3
    assert rouge_l("The lesion is in the upper left", "lesion in upper left quadrant") == pytest.approx(2 / 3)
    # order matters for ROUGE-L, not for token F1: LCS of "left upper" / "upper left" is 1 token
    assert rouge_l("left upper", "upper left") == pytest.approx(0.5)
    assert token_f1("left upper", "upper left") == 1.0
    assert rouge_l("X-ray", "x ray") == 1.0  # rouge-score tokenises on non-alphanumerics, lower-cased
    assert rouge_l("", "upper left") == 0.0


def test_is_short_up_to_four_words():
    assert is_short("upper left")
    assert is_short("the second image")
    assert not is_short("")
    assert not is_short("An axial CT slice of the chest showing a nodule")


def test_score_answers_averages_and_scores_exact_match_on_short_answers_only():
    predictions = ["upper left", "lower right", "a nodule in the lung apex"]
    truths = ["Upper left.", "upper right", "There is a small nodule in the right lung apex"]
    scores = score_answers(predictions, truths)
    assert scores["exact_match"] == pytest.approx(0.5)  # 1 of the 2 short truths; the long one is not scored
    assert scores["short_answers"] == 2
    assert scores["scored_answers"] == 3
    # token F1: 1, 0.5 (only "right" shared), long: pred [nodule, in, lung, apex] (4),
    # truth [there, is, small, nodule, in, right, lung, apex] (8), common 4: P 1, R 1/2 -> 2/3
    assert scores["token_f1"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    expected_rouge = (rouge_l(*pair) for pair in zip(predictions, truths, strict=True))
    assert scores["rouge_l"] == pytest.approx(sum(expected_rouge) / 3)


def test_score_answers_without_short_answers_reports_nan_exact_match():
    scores = score_answers(["a long free text answer here"], ["another long free text answer here"])
    assert math.isnan(scores["exact_match"])
    assert scores["short_answers"] == 0


def test_score_answers_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions for 1"):
        score_answers(["a", "b"], ["a"])
