"""heldout5b, the second user sequence (a development one now): valid records, balanced answers, determinism, recipe.

Only data and the recipe are checked here: training runs on heldout5b are development runs (docs/benchmarks.md),
not tests.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from functools import partial

import numpy as np
import pytest

import benchmark_checks as checks
from benchmark_checks import both_splits, cell_objects, fields, pixels, template_regex
from lvlm_cl.benchmarks import GenerationRequest, available, heldout5, heldout5b, pretrain, seq5
from lvlm_cl.benchmarks.render import GRID, PALETTE, SHAPES
from lvlm_cl.data.records import final_answer, user_text

N_TRAIN, N_TEST = 40, 20
SMALL = dict(train_size=N_TRAIN, test_size=N_TEST)
TASKS = ["colour", "row", "last_letter", "digit_size", "exists"]
METRICS = {"colour": "exact_match", "row": "multiple_choice", "last_letter": "exact_match", "digit_size": "vqa",
           "exists": "exact_match"}
ANSWERS = {
    "colour": set(PALETTE),
    "row": {"A", "B"},
    "last_letter": set(heldout5b.LAST_LETTERS),
    "digit_size": {"yes", "no"},
    "exists": {"yes", "no"},
}

draw = partial(checks.draw, heldout5b)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """heldout5b at a small size, generated once for the module: {task: TaskSpec}."""
    return checks.small_specs("heldout5b", tmp_path_factory.mktemp("benchmarks"), **SMALL)


# --- registry, layout ------------------------------------------------------------------------------

def test_registered_with_seq5_sizes():
    assert "heldout5b" in available()
    assert (heldout5b.DEFAULT_TRAIN_SIZE, heldout5b.DEFAULT_TEST_SIZE) == (1200, 250)
    assert (heldout5b.DEFAULT_TRAIN_SIZE, heldout5b.DEFAULT_TEST_SIZE) == (seq5.DEFAULT_TRAIN_SIZE,
                                                                           seq5.DEFAULT_TEST_SIZE)
    doc = heldout5b.__doc__
    assert "held-out" in doc and "docs/results.md" in doc and "issue 23" in doc


def test_task_ids_and_names_are_new():
    ids = [t.task_id for t in heldout5b.TASKS]
    assert ids == [30, 31, 32, 33, 34]
    others = seq5.TASKS + pretrain.TASKS + heldout5.TASKS
    assert not set(ids) & {t.task_id for t in others}
    assert not set(TASKS) & {t.name for t in others}


def test_five_tasks_in_order_with_their_metrics(specs):
    checks.check_tasks_metrics_and_manifest("heldout5b", specs, TASKS, METRICS, N_TRAIN, N_TEST)


@pytest.mark.parametrize("task", TASKS)
def test_records_validate_and_answers_are_in_the_answer_space(specs, task):
    checks.check_records_in_answer_space(specs[task], task, ANSWERS[task], METRICS[task], N_TRAIN, N_TEST)


def test_answers_are_not_confused_by_the_metrics():
    """Each metric scores every other answer of its task 0 (vqa's normalisation merges none of them)."""
    checks.check_answers_not_confused_by_the_metrics(METRICS, ANSWERS)


@pytest.mark.parametrize("task", TASKS)
def test_every_answer_class_appears_and_classes_are_balanced(task):
    checks.check_answer_classes_balanced(heldout5b, task, ANSWERS[task])


def test_paraphrases_vary_and_are_new_instructions(specs):
    """Each task has several phrasings, none a seq5, heldout5 or pretrain instruction ("colour" = "color")."""
    others = (list(seq5.DIGIT_QUESTIONS) + list(seq5.OCR_QUESTIONS) + list(seq5.GROUNDING_QUESTIONS)
              + [t for ts in seq5.SCIENCEQA_QUESTIONS.values() for t in ts]
              + [t for ts in seq5.VQA_QUESTIONS.values() for t in ts]
              + [t for ts in pretrain.INSTRUCT_QUESTIONS.values() for t in ts] + list(pretrain.CAPTION_QUESTIONS)
              + list(heldout5.POSITION_QUESTIONS) + list(heldout5.COUNTING_QUESTIONS)
              + list(heldout5.PARITY_QUESTIONS) + list(heldout5.SPELLING_QUESTIONS)
              + list(heldout5.RELATION_QUESTIONS))

    def plain(text: str) -> str:
        return text.lower().replace("colour", "color")

    patterns = [template_regex(plain(t)) for t in others]
    for task in TASKS:
        firsts = {plain(user_text(r).splitlines()[0]) for r in both_splits(specs[task])}
        assert len(firsts) >= 3, task
        clash = [q for q in firsts if any(p.fullmatch(q) for p in patterns)]
        assert not clash, (task, clash)


# --- answers match the images ----------------------------------------------------------------------

def test_colour_names_the_colour_of_the_one_shape_of_that_kind(specs):
    for r in both_splits(specs["colour"]):
        objects = cell_objects(pixels(r))
        shapes = [s for s, _ in objects.values()]
        colours = [c for _, c in objects.values()]
        assert 2 <= len(objects) <= 3 and len(set(shapes)) == len(shapes) and len(set(colours)) == len(colours)
        shape = fields(heldout5b.COLOUR_QUESTIONS, user_text(r))["shape"]
        [colour] = [c for s, c in objects.values() if s == shape]
        assert final_answer(r) == colour, r["id"]


def test_row_letter_names_the_half_of_the_named_colour(specs):
    for r in both_splits(specs["row"]):
        [((row, _), (_, colour))] = cell_objects(pixels(r)).items()
        lines = user_text(r).split("\n")
        assert lines[1:] == ["A. top", "B. bottom", seq5.MULTIPLE_CHOICE_SUFFIX]
        assert fields(heldout5b.ROW_QUESTIONS, lines[0])["colour"] == colour, r["id"]
        assert final_answer(r) == ("A" if row < GRID // 2 else "B"), r["id"]


def test_row_uses_every_cell(monkeypatch):
    """The half is drawn first, but the shape can still be in any of the 16 cells."""
    every_cell = {(r, c) for r in range(GRID) for c in range(GRID)}
    assert checks.drawn_cells(monkeypatch, heldout5b, "row", 400) == every_cell


def test_last_letter_word_fits_and_answer_is_a_last_letter(specs):
    for r in both_splits(specs["last_letter"]):
        assert user_text(r) in heldout5b.LAST_LETTER_QUESTIONS
        assert any(w[-1] == final_answer(r) for w in pretrain.WORDS)
        assert checks.word_fits(r), r["id"]


def test_last_letter_answer_is_the_last_letter_of_the_drawn_word(monkeypatch):
    drawn, answers = checks.drawn_words(monkeypatch, heldout5b, "last_letter", 60)
    assert all(len(a) == 1 and a.islower() for a in answers)
    assert [w[-1] for w in drawn] == answers
    assert set(drawn) <= set(pretrain.WORDS)


def test_digit_size_matches_the_sklearn_digit(specs):
    for r in both_splits(specs["digit_size"]):
        assert user_text(r) in heldout5b.DIGIT_SIZE_QUESTIONS
        assert final_answer(r) in {"yes" if d > 4 else "no" for d in checks.sklearn_digits_of(r)}, r["id"]


def test_digit_size_default_split_is_stratified_and_not_another_tasks():
    request = GenerationRequest(0, 33, 8, heldout5b.DEFAULT_TRAIN_SIZE, heldout5b.DEFAULT_TEST_SIZE)
    _, ours = seq5.digit_splits(request, "digit_size", heldout5b.DIGIT_SIZE_PARTITION_STREAM)
    for task_id, stream in ((0, seq5.DIGITS_PARTITION_STREAM), (22, heldout5.PARITY_PARTITION_STREAM)):
        other = dataclasses.replace(request, task_id=task_id)
        _, theirs = seq5.digit_splits(other, "other", stream)
        assert not np.array_equal(ours["test"], theirs["test"]), task_id
    samples = heldout5b.generate_digit_size(request)
    for split, n in (("train", 1200), ("test", 250)):
        answers = Counter(s.answer for s in samples[split])
        assert sum(answers.values()) == n and abs(answers["yes"] - answers["no"]) <= 5, (split, answers)


def test_exists_answers_whether_the_named_kind_is_drawn(specs):
    for r in both_splits(specs["exists"]):
        objects = cell_objects(pixels(r))
        assert 1 <= len(objects) <= 3
        shape = fields(heldout5b.EXISTS_QUESTIONS, user_text(r))["shape"]
        assert shape in SHAPES
        expected = "yes" if any(s == shape for s, _ in objects.values()) else "no"
        assert final_answer(r) == expected, r["id"]


# --- determinism ----------------------------------------------------------------------------------

def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    checks.check_same_seed_identical_bytes_other_seed_differs("heldout5b", tmp_path, **SMALL)


def test_test_split_independent_of_train_size(tmp_path):
    checks.check_test_split_independent_of_train_size("heldout5b", tmp_path)


def test_splits_are_drawn_from_different_streams():
    checks.check_splits_are_drawn_from_different_streams(heldout5b)


# --- recipe ---------------------------------------------------------------------------------------

def test_recipe_is_seq5_on_heldout5b():
    """recipes/heldout5b.yaml is recipes/seq5.yaml but benchmark and output_dir: fails when the two diverge."""
    checks.check_recipe_is_seq5_on("heldout5b")


def test_recipe_can_pick_heldout5b_tasks():
    checks.check_recipe_can_pick_tasks("heldout5b", ["colour", "exists"])
