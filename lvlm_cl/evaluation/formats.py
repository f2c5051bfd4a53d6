"""Format against content: is a prediction an answer of the task's kind at all?

A wrong prediction is wrong in one of two ways. Its *format* is wrong when it is not in the task's answer
space: empty, no option letter where the task answers with a letter, no number where it answers with a
number, no box where it answers with a box, or another task's format (a box or a lone option letter where
the task answers in words). Otherwise its format is right and its *content* is wrong. The two are different
failures of continual learning: a later task's answer style taking over (forgetting the format) against
forgetting the knowledge. ``evaluation.pipeline`` counts both for every task after every stage.

A task's kind comes from its metric where the metric fixes it (``multiple_choice`` answers with a letter,
``iou`` with a box, ``numeric`` with a number), else from its references: all boxes, all lone option
letters, or all numbers; anything else is free text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lvlm_cl.evaluation.numbers import parse_number
from lvlm_cl.evaluation.scorers import is_valid_box, parse_box, parse_option_letter

KINDS = ("letter", "number", "box", "text")
_BY_METRIC = {"multiple_choice": "letter", "iou": "box", "numeric": "number"}
# Metrics whose per-sample score is right (1) or wrong (0); graded ones (token_f1, rouge_l, bleu) have no
# "wrong answer" to split.
BINARY_METRICS = frozenset({"exact_match", "vqa", "contains", "multiple_choice", "iou", "numeric"})
_LONE_LETTER = re.compile(r"\s*\(?([A-Za-z])[.):]?\s*")
_LONE_NUMBER = re.compile(r"\s*[-+]?(?:\d+(?:[.,]\d+)*|\.\d+)\s*%?\s*")


def _is_box(text: str) -> bool:
    box = parse_box(text)
    return box is not None and is_valid_box(box)


def answer_kind(metric: str, references: Sequence[str]) -> str:
    """The task's answer kind: ``letter``, ``number``, ``box`` or ``text`` (see the module docstring)."""
    if metric in _BY_METRIC:
        return _BY_METRIC[metric]
    alternatives = [alt for ref in references for alt in ref.split("|")]
    if not alternatives:
        return "text"
    if all(_is_box(a) for a in alternatives):
        return "box"
    if all(_LONE_LETTER.fullmatch(a) for a in alternatives):
        return "letter"
    if all(_LONE_NUMBER.fullmatch(a) for a in alternatives):
        return "number"
    return "text"


def well_formed(kind: str, prediction: str) -> bool:
    """Whether ``prediction`` is an answer of ``kind`` (its content may still be wrong)."""
    if not prediction.strip():
        return False
    if kind == "letter":
        return parse_option_letter(prediction) is not None
    if kind == "number":
        return parse_number(prediction) is not None
    if kind == "box":
        return _is_box(prediction)
    # Free text: anything but another task's format (a box, a lone option letter).
    return not _is_box(prediction) and not _LONE_LETTER.fullmatch(prediction)


def format_flags(metric: str, predictions: Sequence[str], references: Sequence[str]) -> tuple[str, list[bool]]:
    """The task's kind and, per prediction, whether its format is right."""
    kind = answer_kind(metric, references)
    return kind, [well_formed(kind, p) for p in predictions]


__all__ = ["BINARY_METRICS", "KINDS", "answer_kind", "format_flags", "well_formed"]
