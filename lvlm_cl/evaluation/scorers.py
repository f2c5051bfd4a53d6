"""Scorers: ``score(metric, prediction, answer) -> float`` in [0, 1], and ``corpus_score`` for a test set.

The conventions follow CoIN (zackschen/CoIN: ETrain/Eval/LLaVA/CoIN/) and lmms-eval's
``EvalAIAnswerProcessor``; see docs/metrics.md for examples.

==================  ===========================================================================
``exact_match``     stripped, case-insensitive equality
``vqa``             equality after VQA normalisation (:func:`vqa_normalize`); ``a|b`` = either
``multiple_choice`` option letter parsed from the prediction equals the answer letter
``contains``        normalised answer occurs in the normalised prediction as whole words; ``a|b``
``iou``             IoU of ``[x1, y1, x2, y2]`` boxes > 0.5
``token_f1``        SQuAD-style F1 of the VQA-normalised word bags; ``a|b`` = best of them
``numeric``         last number of the prediction equals the answer's within a tolerance; ``a|b``
``rouge_l``         ROUGE-L F-measure (pycocoevalcap, :mod:`lvlm_cl.evaluation.caption`)
``bleu``            BLEU-4 (pycocoevalcap); corpus level in ``corpus_score``, one sentence in ``score``
``cider``           CIDEr-D (pycocoevalcap); corpus level only
``judge``           a language model says whether the prediction matches (:mod:`lvlm_cl.evaluation.judge`)
==================  ===========================================================================

A malformed *reference* (no option letter, no box, no number, no word) raises ``ValueError``: it is a
data error, not a wrong answer. A malformed *prediction* scores 0.

A task's value is ``corpus_score(metric, predictions, references)``, in percent. For the per-sample
metrics it is ``100 * mean(score)``; ``bleu`` and ``cider`` pool statistics over the whole test set
(:func:`is_corpus_metric`), and ``judge`` asks a model (:func:`is_judge_metric`), so ``score`` refuses
``cider`` and ``judge``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Sequence

from lvlm_cl.evaluation import caption
from lvlm_cl.evaluation.numbers import numeric_match, parse_number  # noqa: F401  (parse_number: part of the API)

if TYPE_CHECKING:
    from lvlm_cl.evaluation.judge import JudgeSettings

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


def token_f1(prediction: str, answer: str) -> float:
    """F1 of the word bags of prediction and answer after :func:`vqa_normalize` (SQuAD's token F1).

    Precision = shared words / predicted words, recall = shared words / reference words, counted with
    multiplicity. Two empty bags score 1, one empty bag scores 0. A ``|``-separated answer scores its
    best alternative.
    """
    predicted = vqa_normalize(prediction).split()
    return max(_bag_f1(predicted, vqa_normalize(ref).split()) for ref in answer.split("|"))


def _bag_f1(predicted: list[str], reference: list[str]) -> float:
    if not predicted or not reference:
        return float(predicted == reference)
    shared = sum((Counter(predicted) & Counter(reference)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(reference)
    return 2 * precision * recall / (precision + recall)


# --- caption metrics on one sample ---------------------------------------------------------------

def rouge_l_match(prediction: str, answer: str) -> float:
    """ROUGE-L F-measure of one prediction against one reference sentence, in [0, 1]."""
    return caption.rouge_l([prediction], [[answer]]).corpus


def bleu_match(prediction: str, answer: str) -> float:
    """Sentence BLEU-4 of one prediction against one reference, in [0, 1].

    pycocoevalcap does not smooth, only keeps zero counts off zero with 1e-15 / 1e-9: a sentence with
    no 4-gram in common scores near 0, and one of fewer than 4 words scores at most about 0.03 even
    when identical. The corpus BLEU of :func:`corpus_score` pools counts and is not the mean of these.
    """
    return caption.bleu4([prediction], [[answer]]).corpus


# --- registry ------------------------------------------------------------------------------------

_SCORERS: MappingProxyType[str, Callable[[str, str], float]] = MappingProxyType({
    "exact_match": exact_match,
    "vqa": vqa_match,
    "multiple_choice": multiple_choice_match,
    "contains": contains_match,
    "iou": iou_match,
    "token_f1": token_f1,
    "numeric": numeric_match,
    "rouge_l": rouge_l_match,
    "bleu": bleu_match,
})
# Statistics pooled over the test set: the value is not the mean of per-sample scores.
_CORPUS = frozenset({"bleu", "cider"})
_JUDGE = "judge"
_NO_PER_SAMPLE = MappingProxyType({
    "cider": "cider (CIDEr-D) is a corpus metric: its idf weights come from the references of the whole test "
             "set, and one sample alone always scores 0; use corpus_score",
    _JUDGE: "judge asks a language model and needs its settings and the questions; use "
            "corpus_score(..., questions=..., judge=JudgeSettings(...)) or lvlm_cl.evaluation.judge.judge_many",
})

SCORERS: tuple[str, ...] = (*_SCORERS, *_NO_PER_SAMPLE)
"""The metric names a task may name in its config."""


def check_metric(name: str) -> str:
    """Return ``name`` if it is a known metric, else raise ``ValueError`` listing the allowed names."""
    if name not in SCORERS:
        raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(SCORERS)}")
    return name


def is_corpus_metric(name: str) -> bool:
    """True for ``bleu`` and ``cider``: their test-set value pools statistics over all samples, so it must
    come from :func:`corpus_score`, not from the mean of :func:`score_many`."""
    return check_metric(name) in _CORPUS


def is_judge_metric(name: str) -> bool:
    """True for ``judge``: scoring asks a model; :func:`corpus_score` needs ``questions`` and ``judge``."""
    return check_metric(name) == _JUDGE


def get_scorer(name: str) -> Callable[[str, str], float]:
    """The scorer ``(prediction, answer) -> float in [0, 1]`` registered under ``name``.

    ``cider`` and ``judge`` have none: asking raises ``ValueError`` saying what to call instead.
    """
    if check_metric(name) in _NO_PER_SAMPLE:
        raise ValueError(_NO_PER_SAMPLE[name])
    return _SCORERS[name]


def score(metric: str, prediction: str, answer: str) -> float:
    """Score one prediction against its reference with the named metric; a float in [0, 1]."""
    return get_scorer(metric)(prediction, answer)


def score_many(metric: str, predictions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Score predictions against answers pairwise; the sequences must have the same length."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers; they must pair up")
    scorer = get_scorer(metric)
    return [scorer(prediction, answer) for prediction, answer in zip(predictions, answers)]


_CAPTION = MappingProxyType({"bleu": caption.bleu4, "rouge_l": caption.rouge_l, "cider": caption.cider_d})


def corpus_score(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                 questions: Sequence[str] | None = None, judge: JudgeSettings | None = None) -> float:
    """A test set's value for the named metric, in percent: ``references[i]`` lists sample i's references.

    - ``bleu``: corpus BLEU-4 x 100; ``rouge_l``: pycocoevalcap's mean ROUGE-L x 100 (with several
      references, its precision and recall are each the max over them); both in [0, 100].
    - ``cider``: CIDEr-D x 100 as papers print it (pycocoevalcap's 1.17 is 117), in [0, 1000].
    - ``judge``: 100 x the share of "yes" verdicts; needs ``questions`` (one per sample) and ``judge``
      settings; a sample's references are shown to the judge joined by ``" | "``. The judge module is
      imported here only, so no other metric touches the network or its code.
    - every other metric: 100 x the mean over samples of the best :func:`score` over the sample's
      references, in [0, 100].

    ``questions`` and ``judge`` are ignored by the other metrics. Raises ``ValueError`` for an unknown
    metric, lengths that do not pair up, no samples, or a sample with no reference (naming its index).
    """
    check_metric(metric)
    caption.check_corpus(predictions, references)
    if metric in _CAPTION:
        return 100.0 * _CAPTION[metric](predictions, references).corpus
    if metric == _JUDGE:
        if judge is None or questions is None:
            raise ValueError("metric 'judge' needs judge=JudgeSettings(...) and questions=[one per sample]")
        if len(questions) != len(predictions):
            raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions; they must pair up")
        from lvlm_cl.evaluation.judge import judge_many

        verdicts = judge_many(judge, questions, predictions, [" | ".join(refs) for refs in references])
        return 100.0 * sum(verdicts) / len(verdicts)
    scorer = get_scorer(metric)
    best = [max(scorer(prediction, ref) for ref in refs) for prediction, refs in zip(predictions, references)]
    return 100.0 * sum(best) / len(best)
