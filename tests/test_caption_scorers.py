"""Issue 22 scorers: caption metrics against pycocoevalcap, token F1, numeric answers, option letters
followed by a rationale, and ``corpus_score``'s shapes and errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from lvlm_cl.evaluation import caption
from lvlm_cl.evaluation.scorers import (
    SCORERS,
    check_metric,
    corpus_score,
    get_scorer,
    is_corpus_metric,
    is_judge_metric,
    numeric_match,
    parse_number,
    parse_option_letter,
    score,
    score_many,
    token_f1,
)

# A small corpus as a model would write it (case, punctuation) and, by hand, the tokens pycocoevalcap
# must receive: lower case, punctuation to spaces.
PREDICTIONS = [
    "A man riding a horse on the beach.",
    "Two dogs play with a red ball!",
    "A plate of food, with broccoli.",
    "A man's bicycle leaning on a wall",
]
REFERENCES = [
    ["A man rides a horse along the beach.", "A person riding a brown horse on sand."],
    ["Two dogs playing with a ball in the grass.", "Dogs chase a red ball."],
    ["A plate with broccoli and rice.", "Food on a white plate.", "A dish of vegetables."],
    ["A bicycle leans against a brick wall."],
]
TOKENIZED_PREDICTIONS = [
    "a man riding a horse on the beach",
    "two dogs play with a red ball",
    "a plate of food with broccoli",
    "a man s bicycle leaning on a wall",
]
TOKENIZED_REFERENCES = [
    ["a man rides a horse along the beach", "a person riding a brown horse on sand"],
    ["two dogs playing with a ball in the grass", "dogs chase a red ball"],
    ["a plate with broccoli and rice", "food on a white plate", "a dish of vegetables"],
    ["a bicycle leans against a brick wall"],
]


def _coco(scorer, predictions, references):
    """pycocoevalcap called directly on already tokenised text."""
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [prediction] for i, prediction in enumerate(predictions)}
    if isinstance(scorer, Bleu):
        return scorer.compute_score(gts, res, verbose=0)
    return scorer.compute_score(gts, res)


@pytest.mark.parametrize("text, tokens", [
    ("A Dog's T-shirt, 3.5!", "a dog s t shirt 3 5"),
    ("  Two\tdogs\n", "two dogs"),
    ("(red) [blue] {green}", "red blue green"),
    ("...", ""),
    ("", ""),
])
def test_caption_tokenize(text, tokens):
    assert caption.caption_tokenize(text) == tokens


def test_the_tokenised_corpus_is_what_caption_tokenize_gives():
    assert [caption.caption_tokenize(p) for p in PREDICTIONS] == TOKENIZED_PREDICTIONS
    assert [[caption.caption_tokenize(r) for r in refs] for refs in REFERENCES] == TOKENIZED_REFERENCES


def test_bleu_equals_pycocoevalcap_on_the_tokenised_corpus():
    expected, expected_per_sample = _coco(Bleu(4), TOKENIZED_PREDICTIONS, TOKENIZED_REFERENCES)
    result = caption.bleu4(PREDICTIONS, REFERENCES)
    assert result.corpus == pytest.approx(expected[3])
    assert result.per_sample == pytest.approx(expected_per_sample[3])
    assert corpus_score("bleu", PREDICTIONS, REFERENCES) == pytest.approx(100 * expected[3])
    assert 0.0 < expected[3] < 1.0  # the corpus is neither all wrong nor perfect: the comparison means something


def test_rouge_l_equals_pycocoevalcap_on_the_tokenised_corpus():
    expected, expected_per_sample = _coco(Rouge(), TOKENIZED_PREDICTIONS, TOKENIZED_REFERENCES)
    result = caption.rouge_l(PREDICTIONS, REFERENCES)
    assert result.corpus == pytest.approx(expected)
    assert result.per_sample == pytest.approx(list(expected_per_sample))
    assert corpus_score("rouge_l", PREDICTIONS, REFERENCES) == pytest.approx(100 * expected)


def test_cider_equals_pycocoevalcap_on_the_tokenised_corpus():
    expected, expected_per_sample = _coco(Cider(), TOKENIZED_PREDICTIONS, TOKENIZED_REFERENCES)
    result = caption.cider_d(PREDICTIONS, REFERENCES)
    assert result.corpus == pytest.approx(expected)
    assert result.per_sample == pytest.approx(list(expected_per_sample))
    assert corpus_score("cider", PREDICTIONS, REFERENCES) == pytest.approx(100 * expected)
    assert expected > 0.0


def test_bleu4_of_identical_sentences_is_100():
    sentence = "a man is riding a horse on the beach"
    assert corpus_score("bleu", [sentence, sentence.upper() + "."], [[sentence], [sentence]]) == pytest.approx(100.0)
    assert score("bleu", sentence, sentence) == pytest.approx(1.0)


def test_bleu4_without_a_shared_4gram_is_near_zero_and_corpus_bleu_is_not_a_mean():
    # pycocoevalcap keeps zero counts off zero with 1e-15 / 1e-9: no shared 4-gram gives a tiny value, not 0.
    assert score("bleu", "a man riding a horse", "a man rides a horse") < 1e-3
    predictions, references = ["a cat sat on the mat today", "dogs"], [["a cat sat on the mat today"], ["birds fly"]]
    per_sample = score_many("bleu", predictions, [refs[0] for refs in references])
    assert corpus_score("bleu", predictions, references) != pytest.approx(100 * sum(per_sample) / 2)


def test_rouge_l_of_a_known_longest_common_subsequence():
    # LCS("a man riding a horse", "a man is riding a brown horse") = "a man riding a horse": 5 tokens.
    precision, recall, beta = 5 / 5, 5 / 7, 1.2
    expected = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    assert score("rouge_l", "A man riding a horse.", "a man is riding a brown horse") == pytest.approx(expected)
    assert score("rouge_l", "horse", "a man is riding a brown horse") == pytest.approx(
        (1 + beta**2) * 1 * (1 / 7) / (1 / 7 + beta**2 * 1))
    assert score("rouge_l", "zebra", "a horse") == 0.0


def test_cider_of_perfect_captions_sharing_no_word_is_1000():
    # Every n-gram occurs in one of the two samples' references: idf log(2/1) > 0; the hypothesis vector
    # equals the reference vector, so each n-gram cosine is 1, no length penalty: 10 on pycocoevalcap's scale.
    predictions = ["one small red apple lies here", "two tall green trees stand there"]
    assert corpus_score("cider", predictions, [[p] for p in predictions]) == pytest.approx(1000.0)


def test_cider_of_a_single_sample_is_zero_and_score_refuses_it():
    assert corpus_score("cider", ["a red apple"], [["a red apple"]]) == 0.0
    with pytest.raises(ValueError, match="corpus metric"):
        score("cider", "a red apple", "a red apple")
    with pytest.raises(ValueError, match="corpus_score"):
        score_many("cider", ["a"], ["a"])


# --- token F1 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, answer, expected", [
    ("the red car", "red car", 1.0),              # articles dropped, as in the vqa normalisation
    ("a red car", "red truck", 0.5),              # 1 shared of 2 and 2: P = R = 1/2
    ("red red car", "red car", 0.8),              # shared 2 (red once): P = 2/3, R = 1, F = 0.8
    ("Red car, parked.", "car", 0.5),             # P = 1/3, R = 1: F = 2 * (1/3) / (4/3)
    ("blue", "red", 0.0),
    ("two dogs", "2 dogs", 1.0),
    ("", "", 1.0),
    ("", "red", 0.0),
    ("red", "", 0.0),
    ("big cat", "cat|big dog", 2 / 3),            # best alternative: "cat" (P 1/2, R 1)
    ("big dog", "cat|big dog", 1.0),
])
def test_token_f1(prediction, answer, expected):
    assert score("token_f1", prediction, answer) == pytest.approx(expected)


@given(st.text(alphabet="abc d.,", max_size=20), st.text(alphabet="abc d.,", max_size=20))
def test_token_f1_is_symmetric_bounded_and_one_on_itself(a, b):
    assert 0.0 <= token_f1(a, b) <= 1.0
    assert token_f1(a, b) == pytest.approx(token_f1(b, a))
    assert token_f1(a, a) == 1.0


# --- numeric -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, number", [
    ("The answer is 4.", 4.0),
    ("3,000", 3000.0),
    ("There are 3,000, I think", 3000.0),
    ("1,234.5 m", 1234.5),
    ("-2.5", -2.5),
    ("\u22123", -3.0),
    ("1/2", 0.5),
    ("1/0 then 7", 7.0),
    (".5", 0.5),
    ("1e-3", 0.001),
    ("10km", 10.0),
    ("2 + 2 = 4", 4.0),                           # the last number
    ("pages 3-5", 5.0),                           # a hyphen between numbers is not a sign
    ("an A4 sheet", None),                        # glued to a word
    ("four", 4.0),
    ("Twenty-one apples", 21.0),
    ("ninety nine", 99.0),
    ("someone", None),
    ("one and 2", 2.0),                           # digits win over words
    ("no idea", None),
    ("", None),
])
def test_parse_number(text, number):
    assert parse_number(text) == number


@pytest.mark.parametrize("prediction, answer, expected", [
    ("The answer is 4.", "4", 1.0),
    ("4.0000001", "4", 1.0),                      # within the relative tolerance 1e-6
    ("4.001", "4", 0.0),
    ("3,000", "3000", 1.0),
    ("-2.5", "-2.5", 1.0),
    ("2.5", "-2.5", 0.0),
    ("1/2", "0.5", 1.0),
    ("four", "4", 1.0),
    ("0", "0", 1.0),
    ("1e-12", "0", 1.0),                          # within the absolute tolerance 1e-9 ...
    ("1e-6", "0", 0.0),                           # ... and this is not
    ("5", "4|5", 1.0),
    ("no idea", "4", 0.0),
    ("", "4", 0.0),
])
def test_numeric(prediction, answer, expected):
    assert score("numeric", prediction, answer) == expected


def test_numeric_tolerances_are_arguments_and_a_reference_needs_a_number():
    assert numeric_match("4.01", "4") == 0.0
    assert numeric_match("4.01", "4", rel_tol=0.01) == 1.0
    assert numeric_match("0.001", "0", abs_tol=0.01) == 1.0
    with pytest.raises(ValueError, match="no number"):
        score("numeric", "4", "four-ish|unknown")


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
def test_numbers_round_trip_through_text(value):
    assert parse_number(f"The answer is {value!r}.") == value
    assert numeric_match(repr(value), repr(value)) == 1.0


@given(st.integers(min_value=0, max_value=10**12))
def test_thousands_groups_round_trip(value):
    assert parse_number(f"{value:,}") == value


# --- option letter with a rationale ------------------------------------------------------------------

@pytest.mark.parametrize("text, letter", [
    ("B. because the sky is blue", "B"),
    ("(B) The answer is the second one", "B"),
    ("B: the red one, since it is larger", "B"),
    ("B) as shown on the left", "B"),
    ("B.because", "B"),
    ("(B)The answer", "B"),
    ("Answer: B, because the sign says so", "B"),
])
def test_option_letter_followed_by_a_rationale(text, letter):
    assert parse_option_letter(text) == letter
    assert score("multiple_choice", text, letter) == 1.0
    assert score("multiple_choice", text, "C") == 0.0


# --- registry and corpus_score -----------------------------------------------------------------------

def test_new_metrics_are_registered_and_classified():
    for name in ("token_f1", "numeric", "rouge_l", "bleu", "cider", "judge"):
        assert name in SCORERS and check_metric(name) == name
    assert [name for name in SCORERS if is_corpus_metric(name)] == ["bleu", "cider"]
    assert [name for name in SCORERS if is_judge_metric(name)] == ["judge"]
    with pytest.raises(ValueError, match="allowed"):
        is_corpus_metric("meteor")
    with pytest.raises(ValueError, match="judge_many"):
        get_scorer("judge")


def test_corpus_score_of_per_sample_metrics_is_the_mean_of_the_best_reference_in_percent():
    assert corpus_score("vqa", ["two", "cat"], [["3", "2"], ["dog"]]) == 50.0
    assert corpus_score("token_f1", ["a red car", "blue"], [["red truck", "red car"], ["blue"]]) == 100.0
    assert corpus_score("token_f1", ["a red car", "blue"], [["red truck"], ["green"]]) == pytest.approx(25.0)
    assert corpus_score("numeric", ["it is 4", "5"], [["4"], ["6"]]) == 50.0
    assert corpus_score("rouge_l", ["a b c"], [["a b c", "x"]]) == pytest.approx(100.0)


def test_corpus_score_judge_needs_settings_and_questions():
    with pytest.raises(ValueError, match="judge=JudgeSettings"):
        corpus_score("judge", ["yes"], [["yes"]])


@pytest.mark.parametrize("metric", ["bleu", "cider", "rouge_l", "vqa", "token_f1"])
def test_corpus_score_shape_errors(metric):
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        corpus_score(metric, ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="sample 1: empty references list"):
        corpus_score(metric, ["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="sample 0: references must be a list"):
        corpus_score(metric, ["a"], ["a"])
    with pytest.raises(ValueError, match="no samples"):
        corpus_score(metric, [], [])
    with pytest.raises(ValueError, match="allowed"):
        corpus_score("meteor", ["a"], [["a"]])


@pytest.mark.parametrize("metric", ["bleu", "cider", "rouge_l"])
def test_caption_reference_without_words_is_a_data_error(metric):
    with pytest.raises(ValueError, match=r"sample 1: reference 0 \('\.\.\.'\) has no words"):
        corpus_score(metric, ["a dog", "a cat"], [["a dog"], ["...", "a cat"]])


def test_empty_prediction_is_scored_not_refused():
    predictions, references = ["", "a cat on a mat"], [["a dog in a park"], ["a cat on a mat"]]
    for metric in ("bleu", "rouge_l", "cider"):
        value = corpus_score(metric, predictions, references)
        assert math.isfinite(value) and value >= 0.0
    assert caption.rouge_l(predictions, references).per_sample[0] == 0.0


def test_importing_the_scorers_loads_neither_pycocoevalcap_nor_the_judge():
    code = ("import sys; from lvlm_cl.evaluation.scorers import corpus_score, score; "
            "assert 'pycocoevalcap' not in sys.modules and 'lvlm_cl.evaluation.judge' not in sys.modules; "
            "score('vqa', 'a', 'a'); corpus_score('bleu', ['a b c d'], [['a b c d']]); "
            "assert 'pycocoevalcap.bleu.bleu' in sys.modules; "
            "assert 'lvlm_cl.evaluation.judge' not in sys.modules and 'urllib.request' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
