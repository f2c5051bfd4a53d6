"""Per-sample scorers: ``score(metric, prediction, answer) -> float`` in [0, 1].

The conventions follow CoIN (zackschen/CoIN: ETrain/Eval/LLaVA/CoIN/) and lmms-eval's
``EvalAIAnswerProcessor``; see docs/metrics.md for examples.

==================  ===========================================================================
``exact_match``     stripped, case-insensitive equality
``vqa``             equality after VQA normalisation (:func:`vqa_normalize`); ``a|b`` = either
``multiple_choice`` option letter parsed from the prediction equals the answer letter
``contains``        normalised answer occurs in the normalised prediction as whole words; ``a|b``
``iou``             IoU of ``[x1, y1, x2, y2]`` boxes > 0.5
==================  ===========================================================================

A malformed *reference* (no option letter, no box) raises ``ValueError``: it is a data error, not a
wrong answer. A malformed *prediction* scores 0.
"""

from __future__ import annotations

import re
import string
from types import MappingProxyType
from typing import Callable, Sequence

Box = tuple[float, float, float, float]

IOU_THRESHOLD = 0.5

# --- VQA normalisation ---------------------------------------------------------------------------

_NUMBER_WORDS = MappingProxyType({
    # "none" -> "0" is the EvalAI convention ("how many ...?" "none").
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
})
_ARTICLES = frozenset({"a", "an", "the"})
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
# A period survives only before a digit ("3.5", ".5"); "5." and "u.s." lose theirs (as in EvalAI).
_NON_DECIMAL_PERIOD = re.compile(r"\.(?!\d)")
# Units and currency stay: "10%" is not "10". Periods and apostrophes are handled separately.
_STRIPPED = "".join(sorted(set(string.punctuation) - set(".'%$&")))
_PUNCTUATION = re.compile("[" + re.escape(_STRIPPED) + "]")
_APOSTROPHES = re.compile("['\u2019]")


def vqa_normalize(text: str) -> str:
    """Normalise a VQA answer the way EvalAI does, in a simpler, idempotent form.

    Lower case; thousands commas dropped ("1,000" -> "1000"); periods dropped unless a digit
    follows ("3.5" and ".5" stay); apostrophes dropped, so contractions match with or without them
    ("don't" == "dont"); other punctuation except ``% $ &`` becomes a space; number words
    zero..ten (and "none") become digits; articles a/an/the are dropped; whitespace is collapsed.
    """
    text = text.lower()
    text = _THOUSANDS_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _APOSTROPHES.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    words = (_NUMBER_WORDS.get(word, word) for word in text.split())
    return " ".join(word for word in words if word not in _ARTICLES)


# --- scorers -------------------------------------------------------------------------------------

def exact_match(prediction: str, answer: str) -> float:
    """1.0 if the stripped strings are equal ignoring case."""
    return float(prediction.strip().casefold() == answer.strip().casefold())


def vqa_match(prediction: str, answer: str) -> float:
    """1.0 if the normalised prediction equals any normalised ``|``-separated reference."""
    normalized = vqa_normalize(prediction)
    return float(any(normalized == vqa_normalize(ref) for ref in answer.split("|")))


def contains_match(prediction: str, answer: str) -> float:
    """1.0 if any normalised ``|``-separated reference occurs in the prediction as whole words.

    "7" is found in "it is a 7" but not in "17". A reference that normalises to nothing (say the
    label "a") falls back to :func:`exact_match`.
    """
    padded = f" {vqa_normalize(prediction)} "
    for ref in answer.split("|"):
        normalized = vqa_normalize(ref)
        if normalized and f" {normalized} " in padded:
            return 1.0
        if not normalized and exact_match(prediction, ref):
            return 1.0
    return 0.0


_LONE_LETTER = re.compile(r"\(?([A-Za-z])[.):]?")
_LEADING_LETTER = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.):])(?=\s|$)")
_STANDALONE_CAPITAL = re.compile(r"\b([A-Z])\b")


def parse_option_letter(text: str) -> str | None:
    """The option letter a model answered, upper case, or ``None``.

    Tried in order (CoIN's ScienceQA rule): the whole text is one letter, optionally with ``.``,
    ``)`` or ``:`` or in parentheses ("B", "b.", "(C)"); the text starts with "A." / "A)" / "A:" /
    "(A)" followed by a space; the first standalone capital letter word ("The answer is D").
    """
    text = text.strip()
    if match := _LONE_LETTER.fullmatch(text):
        return match.group(1).upper()
    if match := _LEADING_LETTER.match(text):
        return match.group(1) or match.group(2)
    if match := _STANDALONE_CAPITAL.search(text):
        return match.group(1)
    return None


def multiple_choice_match(prediction: str, answer: str) -> float:
    """1.0 if the option letter parsed from the prediction equals the answer's letter.

    Raises ``ValueError`` if the answer holds no option letter.
    """
    expected = parse_option_letter(answer)
    if expected is None:
        raise ValueError(f"multiple_choice reference {answer!r} holds no option letter (A-Z)")
    return float(parse_option_letter(prediction) == expected)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# Numbers separated only by commas and/or spaces form one run; a box is a run of exactly four.
_NUMBER_RUN = re.compile(rf"{_NUMBER}(?:(?:\s*,\s*|\s+){_NUMBER})*")


def parse_box(text: str) -> Box | None:
    """The first ``x1, y1, x2, y2`` box in ``text`` as floats, or ``None``.

    Square brackets, parentheses, or none; commas and/or spaces between numbers
    ("[0.1, 0.2, 0.5, 0.6]", "(0.1,0.2,0.5,0.6)", "0.1 0.2 0.5 0.6"). A run of more or fewer than
    four numbers is not a box. The box is not checked for x2 > x1: see :func:`is_valid_box`.
    """
    for run in _NUMBER_RUN.finditer(text):
        numbers = re.findall(_NUMBER, run.group())
        if len(numbers) == 4:
            x1, y1, x2, y2 = (float(value) for value in numbers)
            return (x1, y1, x2, y2)
    return None


def is_valid_box(box: Sequence[float]) -> bool:
    """True if the box has positive width and height."""
    x1, y1, x2, y2 = box
    return x2 > x1 and y2 > y1


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes, in [0, 1].

    A degenerate box (zero or negative width or height) has area 0, so its IoU is 0.
    """
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = inter_w * inter_h
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - intersection
    if union <= 0.0:
        return 0.0
    return min(1.0, max(0.0, intersection / union))


def iou_match(prediction: str, answer: str) -> float:
    """1.0 if the predicted box overlaps the reference box with IoU > 0.5 (exactly 0.5 scores 0).

    An unparseable or degenerate prediction scores 0; an unparseable or degenerate reference
    raises ``ValueError``.
    """
    reference = parse_box(answer)
    if reference is None or not is_valid_box(reference):
        raise ValueError(f"iou reference {answer!r} is not a box [x1, y1, x2, y2] with x2 > x1, y2 > y1")
    predicted = parse_box(prediction)
    if predicted is None or not is_valid_box(predicted):
        return 0.0
    return float(box_iou(predicted, reference) > IOU_THRESHOLD)


# --- registry ------------------------------------------------------------------------------------

_SCORERS: MappingProxyType[str, Callable[[str, str], float]] = MappingProxyType({
    "exact_match": exact_match,
    "vqa": vqa_match,
    "multiple_choice": multiple_choice_match,
    "contains": contains_match,
    "iou": iou_match,
})

SCORERS: tuple[str, ...] = tuple(_SCORERS)
"""The metric names a task may name in its config."""


def check_metric(name: str) -> str:
    """Return ``name`` if it is a known scorer, else raise ``ValueError`` listing the allowed names."""
    if name not in _SCORERS:
        raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(SCORERS)}")
    return name


def get_scorer(name: str) -> Callable[[str, str], float]:
    """The scorer ``(prediction, answer) -> float in [0, 1]`` registered under ``name``."""
    return _SCORERS[check_metric(name)]


def score(metric: str, prediction: str, answer: str) -> float:
    """Score one prediction against its reference with the named metric; a float in [0, 1]."""
    return get_scorer(metric)(prediction, answer)


def score_many(metric: str, predictions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Score predictions against answers pairwise; the sequences must have the same length."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers; they must pair up")
    scorer = get_scorer(metric)
    return [scorer(prediction, answer) for prediction, answer in zip(predictions, answers)]
