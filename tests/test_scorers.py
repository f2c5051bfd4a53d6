"""Per-sample scorers: table-driven cases per metric, the registry, and property tests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lvlm_cl.evaluation.scorers import (
    SCORERS,
    box_iou,
    check_metric,
    get_scorer,
    parse_box,
    parse_option_letter,
    score,
    score_many,
    vqa_normalize,
)


@pytest.mark.parametrize("prediction, answer, expected", [
    ("Paris", "paris", 1.0),
    ("  Paris \n", "PARIS", 1.0),
    ("Paris.", "Paris", 0.0),
    ("the cat", "cat", 0.0),
    ("", "", 1.0),
])
def test_exact_match(prediction, answer, expected):
    assert score("exact_match", prediction, answer) == expected


@pytest.mark.parametrize("text, normalized", [
    ("Two", "2"),
    ("two dogs", "2 dogs"),
    ("None", "0"),
    ("The Cat", "cat"),
    ("a dog and an apple", "dog and apple"),
    ("Yes!", "yes"),
    ("yes.", "yes"),
    ("3.5", "3.5"),
    (".5", ".5"),
    ("It is 3.5.", "it is 3.5"),
    ("1,000", "1000"),
    ("red, blue", "red blue"),
    ("t-shirt", "t shirt"),
    ("don't", "dont"),
    ("dont", "dont"),
    ("u.s.", "us"),
    ("10%", "10%"),
    ("  lots   of\tspace\n", "lots of space"),
    ("twenty", "twenty"),  # only zero..ten are mapped, as in EvalAI
])
def test_vqa_normalize(text, normalized):
    assert vqa_normalize(text) == normalized


@pytest.mark.parametrize("prediction, answer, expected", [
    ("two", "2", 1.0),
    ("2", "Two", 1.0),
    ("The red car.", "red car", 1.0),
    ("Yes", "yes", 1.0),
    ("3.5", "3.5", 1.0),
    ("35", "3.5", 0.0),
    ("red car", "car", 0.0),
    ("blue", "red|blue|green", 1.0),
    ("Blue.", "red | blue", 1.0),
    ("purple", "red|blue|green", 0.0),
    ("", "red", 0.0),
])
def test_vqa(prediction, answer, expected):
    assert score("vqa", prediction, answer) == expected


@pytest.mark.parametrize("text, letter", [
    ("A", "A"),
    ("b", "B"),
    ("C.", "C"),
    ("D)", "D"),
    ("(B)", "B"),
    ("A. a cat", "A"),
    ("(C) a dog", "C"),
    ("B) the sun", "B"),
    ("The answer is D.", "D"),
    ("Answer: (E)", "E"),
    ("I think B", "I"),  # first standalone capital, as in CoIN: "I" wins
    ("the answer is unclear", None),
    ("", None),
    ("a. lower case leading form", None),
])
def test_parse_option_letter(text, letter):
    assert parse_option_letter(text) == letter


@pytest.mark.parametrize("prediction, answer, expected", [
    ("A", "A", 1.0),
    ("A.", "A", 1.0),
    ("A. Paris", "A", 1.0),
    ("(A) Paris", "A.", 1.0),
    ("A", "B", 0.0),
    ("The answer is B.", "B", 1.0),
    ("Paris", "A", 0.0),  # no capital letter word: unparseable
    ("", "C", 0.0),
])
def test_multiple_choice(prediction, answer, expected):
    assert score("multiple_choice", prediction, answer) == expected


def test_multiple_choice_reference_without_letter_raises():
    with pytest.raises(ValueError, match="option letter"):
        score("multiple_choice", "A", "paris")


@pytest.mark.parametrize("prediction, answer, expected", [
    ("it is a 7", "7", 1.0),
    ("17", "7", 0.0),
    ("7.5", "7", 0.0),
    ("The digit is seven.", "7", 1.0),
    ("a golden retriever dog", "golden retriever", 1.0),
    ("a golden dog retriever", "golden retriever", 0.0),
    ("Tabby cat!", "cat", 1.0),
    ("category", "cat", 0.0),
    ("a dog", "cat|dog", 1.0),
    ("", "cat", 0.0),
    ("a", "a", 1.0),  # reference normalises to nothing: exact match decides
    ("b", "a", 0.0),
])
def test_contains(prediction, answer, expected):
    assert score("contains", prediction, answer) == expected


@pytest.mark.parametrize("text, box", [
    ("[0.1, 0.2, 0.5, 0.6]", (0.1, 0.2, 0.5, 0.6)),
    ("0.1,0.2,0.5,0.6", (0.1, 0.2, 0.5, 0.6)),
    ("(0.1, 0.2, 0.5, 0.6)", (0.1, 0.2, 0.5, 0.6)),
    ("[ 0.1 ,  0.2,0.5 , 0.6 ]", (0.1, 0.2, 0.5, 0.6)),
    ("0.1 0.2 0.5 0.6", (0.1, 0.2, 0.5, 0.6)),
    ("The box is [0, .25, 1, 1].", (0.0, 0.25, 1.0, 1.0)),
    ("[0.1, 0.2, 0.5]", None),
    ("[0.1, 0.2, 0.5, 0.6, 0.7]", None),
    ("no box here", None),
    ("", None),
])
def test_parse_box(text, box):
    assert parse_box(text) == box


@pytest.mark.parametrize("a, b, iou", [
    ((0, 0, 1, 1), (0, 0, 1, 1), 1.0),
    ((0, 0, 1, 1), (2, 2, 3, 3), 0.0),
    ((0, 0, 2, 1), (1, 0, 3, 1), 1 / 3),  # overlap 1, union 2 + 2 - 1 = 3
    ((0, 0, 1, 1), (0, 0, 0.5, 1), 0.5),
    ((0.5, 0.5, 0.5, 0.9), (0, 0, 1, 1), 0.0),  # zero width
    ((0.6, 0.6, 0.2, 0.2), (0, 0, 1, 1), 0.0),  # inverted
])
def test_box_iou(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)


@pytest.mark.parametrize("prediction, answer, expected", [
    ("[0.1, 0.1, 0.5, 0.5]", "[0.1, 0.1, 0.5, 0.5]", 1.0),
    ("0.1, 0.1, 0.5, 0.5", "[0.12, 0.1, 0.5, 0.52]", 1.0),
    # IoU exactly 0.5: half the reference box -> not > 0.5
    ("[0.0, 0.0, 0.5, 1.0]", "[0.0, 0.0, 1.0, 1.0]", 0.0),
    ("[0.0, 0.0, 0.6, 1.0]", "[0.0, 0.0, 1.0, 1.0]", 1.0),
    ("[0.6, 0.6, 0.9, 0.9]", "[0.0, 0.0, 0.5, 0.5]", 0.0),
    ("a dog on the left", "[0.0, 0.0, 0.5, 0.5]", 0.0),
    ("[0.5, 0.5, 0.1, 0.1]", "[0.1, 0.1, 0.5, 0.5]", 0.0),  # degenerate prediction
    ("", "[0.1, 0.1, 0.5, 0.5]", 0.0),
])
def test_iou(prediction, answer, expected):
    assert score("iou", prediction, answer) == expected


@pytest.mark.parametrize("answer", ["not a box", "[0.5, 0.5, 0.1, 0.1]"])
def test_iou_bad_reference_raises(answer):
    with pytest.raises(ValueError, match="reference"):
        score("iou", "[0.1, 0.1, 0.5, 0.5]", answer)


def test_registry_lists_every_scorer_and_rejects_unknown_names():
    assert set(SCORERS) == {"exact_match", "vqa", "multiple_choice", "contains", "iou",
                            "token_f1", "numeric", "rouge_l", "bleu", "cider", "judge"}
    for name in SCORERS:
        assert check_metric(name) == name
        if name in ("cider", "judge"):  # no per-sample scorer: corpus_score only (tests/test_caption_scorers.py)
            with pytest.raises(ValueError, match="corpus_score"):
                get_scorer(name)
        else:
            assert callable(get_scorer(name))
    with pytest.raises(ValueError) as info:
        get_scorer("meteor")
    message = str(info.value)
    assert "meteor" in message and all(name in message for name in SCORERS)
    with pytest.raises(ValueError, match="allowed"):
        score("accuracy", "a", "a")


def test_score_many_pairs_up_and_checks_lengths():
    assert score_many("vqa", ["two", "cat", "dog"], ["2", "a cat", "cat"]) == [1.0, 1.0, 0.0]
    assert score_many("exact_match", [], []) == []
    with pytest.raises(ValueError, match="2 predictions but 1 answers"):
        score_many("vqa", ["a", "b"], ["a"])


# --- properties ----------------------------------------------------------------------------------

coordinate = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False)
boxes = st.tuples(coordinate, coordinate, coordinate, coordinate)
valid_boxes = st.tuples(coordinate, coordinate,
                        st.floats(min_value=1e-3, max_value=2.0),
                        st.floats(min_value=1e-3, max_value=2.0)).map(
    lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3]))


@given(boxes, boxes)
def test_box_iou_is_symmetric_and_bounded(a, b):
    iou = box_iou(a, b)
    assert 0.0 <= iou <= 1.0
    assert iou == pytest.approx(box_iou(b, a))


@given(valid_boxes)
def test_box_iou_with_itself_is_one(box):
    assert box_iou(box, box) == pytest.approx(1.0)


@given(valid_boxes)
def test_box_round_trips_through_text(box):
    text = "[" + ", ".join(repr(value) for value in box) + "]"
    assert parse_box(text) == pytest.approx(box)
    assert score("iou", text, text) == 1.0


@given(st.text())
def test_vqa_normalize_is_idempotent(text):
    once = vqa_normalize(text)
    assert vqa_normalize(once) == once


@given(st.text(), st.text(), st.sampled_from(["exact_match", "vqa", "multiple_choice", "contains"]))
def test_text_scorers_return_zero_or_one(prediction, answer, metric):
    if metric == "multiple_choice" and parse_option_letter(answer) is None:
        return
    assert score(metric, prediction, answer) in (0.0, 1.0)
