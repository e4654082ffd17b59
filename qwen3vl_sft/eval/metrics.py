"""Answer metrics: exact match, token F1 and ROUGE-L, per answer and averaged over a set.

* ``exact_match``: equal after lower-casing, removing punctuation and collapsing whitespace. Only
  meaningful for short answers (the synthetic set's "upper left"), so sets report it over those.
* ``token_f1``: SQuAD's token-overlap F1 (lower-case, no punctuation, no articles a/an/the), the usual
  partial-credit score for free-text VQA answers.
* ``rouge_l``: ROUGE-L F-measure from Google's ``rouge-score`` package (longest common subsequence of
  lower-cased alphanumeric tokens, no stemming), the usual score for long answers like PubMedVision's.

All scores lie in [0, 1].
"""

from __future__ import annotations

import functools
import logging
import math
import re
import string
from collections import Counter
from collections.abc import Sequence

SHORT_ANSWER_WORDS = 4
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no ASCII punctuation, single spaces."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


def exact_match(prediction: str, truth: str) -> bool:
    return normalize(prediction) == normalize(truth)


def is_short(answer: str) -> bool:
    """Whether exact match is a fair score for ``answer`` (a few words, not a paragraph)."""
    return 0 < len(answer.split()) <= SHORT_ANSWER_WORDS


def _f1_tokens(text: str) -> list[str]:
    return _ARTICLES.sub(" ", normalize(text)).split()


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD token F1: harmonic mean of token precision and recall (bag of words)."""
    pred, gold = _f1_tokens(prediction), _f1_tokens(truth)
    if not pred or not gold:
        return float(pred == gold)  # both empty is a match; one empty scores 0
    common = sum((Counter(pred) & Counter(gold)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer" at INFO
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, truth: str) -> float:
    """ROUGE-L F-measure (0 when either side has no alphanumeric token)."""
    return _rouge_scorer().score(truth, prediction)["rougeL"].fmeasure


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def score_answers(predictions: Sequence[str], truths: Sequence[str]) -> dict[str, float | int]:
    """Mean ROUGE-L and token F1 over all answers; exact-match accuracy over the short truths."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} ground-truth answers")
    pairs = list(zip(predictions, truths, strict=True))
    short = [(p, t) for p, t in pairs if is_short(t)]
    return {
        "rouge_l": _mean([rouge_l(p, t) for p, t in pairs]),
        "token_f1": _mean([token_f1(p, t) for p, t in pairs]),
        "exact_match": _mean([float(exact_match(p, t)) for p, t in short]),
        "scored_answers": len(pairs),
        "short_answers": len(short),
    }
