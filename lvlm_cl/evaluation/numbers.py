"""Numbers in answers: ``parse_number`` reads the last number a text writes, ``numeric_match`` scores a prediction
against a numeric reference within a tolerance (the ``numeric`` metric of ``scorers``)."""

from __future__ import annotations

import math
import re
from types import MappingProxyType

NUMERIC_REL_TOL = 1e-6
NUMERIC_ABS_TOL = 1e-9

# A number not glued to a word or a preceding number ("A4", "v2", "3-5" give no "A4", "v2" or "-5"): a
# fraction "1/2", a comma-grouped "3,000" or "1,234.5", or a plain decimal "-2.5", ".5", "1e-3".
_DIGIT_NUMBER = re.compile(r"""
    (?<![\w.])
    (?P<sign>[-+\u2212]?)
    (?:
        (?P<numerator>\d+)/(?P<denominator>\d+)(?![/\d])
      | (?P<grouped>\d{1,3}(?:,\d{3})+(?:\.\d+)?)(?!,?\d)
      | (?P<plain>(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?)
    )
""", re.VERBOSE)
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_VALUES = MappingProxyType({**{word: i for i, word in enumerate(_UNITS)},
                                 **{word: 20 + 10 * i for i, word in enumerate(_TENS)}})
_WORD_NUMBER = re.compile(rf"\b(?:({'|'.join(_TENS)})(?:[- ]({'|'.join(_UNITS[1:10])}))?|({'|'.join(_UNITS)}))\b",
                          re.IGNORECASE)


def parse_number(text: str) -> float | None:
    """The last number written in ``text``, or ``None``.

    Digits first: signed decimals (``-2.5``, ``.5``, ``1e-3``), thousands groups (``3,000``), fractions
    (``1/2``; a zero denominator is skipped); a unit or ordinal may follow (``10km``, ``3rd``). The
    *last* one is taken, so a model that reasons before it answers is read right ("2 + 2 = 4" -> 4).
    Only when the text holds no digit: number words ``zero``..``ninety-nine`` ("twenty-one", "twenty one").
    """
    values = []
    for match in _DIGIT_NUMBER.finditer(text):
        sign = -1.0 if match["sign"] in ("-", "\u2212") else 1.0
        if match["numerator"] is not None:
            denominator = int(match["denominator"])
            if denominator == 0:
                continue
            values.append(sign * int(match["numerator"]) / denominator)
        else:
            values.append(sign * float((match["grouped"] or match["plain"]).replace(",", "")))
    if values:
        return values[-1]
    words = list(_WORD_NUMBER.finditer(text))
    if not words:
        return None
    tens, unit, single = words[-1].groups()
    if single is not None:
        return float(_WORD_VALUES[single.lower()])
    return float(_WORD_VALUES[tens.lower()] + (_WORD_VALUES[unit.lower()] if unit else 0))


def numeric_match(prediction: str, answer: str, *, rel_tol: float = NUMERIC_REL_TOL,
                  abs_tol: float = NUMERIC_ABS_TOL) -> float:
    """1.0 if the prediction's number (:func:`parse_number`) is within tolerance of the answer's.

    Close means ``math.isclose(predicted, expected, rel_tol=rel_tol, abs_tol=abs_tol)``: the defaults
    accept ``"4.0000001"`` for ``4`` and an exact ``0`` for ``0``. A ``|``-separated answer accepts any
    alternative. A prediction without a number scores 0; an answer alternative without one raises
    ``ValueError``.
    """
    expected = []
    for ref in answer.split("|"):
        value = parse_number(ref)
        if value is None:
            raise ValueError(f"numeric reference {answer!r} holds no number")
        expected.append(value)
    predicted = parse_number(prediction)
    if predicted is None:
        return 0.0
    return float(any(math.isclose(predicted, value, rel_tol=rel_tol, abs_tol=abs_tol) for value in expected))
