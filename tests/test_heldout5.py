"""heldout5, the held-out user sequence: valid records, correct and balanced answers, determinism, recipe."""

from __future__ import annotations

from collections import Counter
from functools import partial

import pytest

import benchmark_checks as checks
from benchmark_checks import both_splits, cell_objects, pixels, template_regex
from lvlm_cl.benchmarks import GenerationRequest, available, heldout5, pretrain, seq5
from lvlm_cl.benchmarks.render import GRID
from lvlm_cl.data.records import final_answer, user_text

N_TRAIN, N_TEST = 40, 20
SMALL = dict(train_size=N_TRAIN, test_size=N_TEST)
TASKS = ["position", "counting", "parity", "spelling", "relation"]
METRICS = {"position": "exact_match", "counting": "vqa", "parity": "multiple_choice", "spelling": "exact_match",
           "relation": "exact_match"}
ANSWERS = {
    "position": set(heldout5.QUADRANTS),
    "counting": {str(c) for c in heldout5.COUNTS},
    "parity": {"A", "B"},
    "spelling": set(heldout5.FIRST_LETTERS),
    "relation": {"left", "right"},
}

draw = partial(checks.draw, heldout5)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """heldout5 at a small size, generated once for the module: {task: TaskSpec}."""
    return checks.small_specs("heldout5", tmp_path_factory.mktemp("benchmarks"), **SMALL)


# --- registry, layout ------------------------------------------------------------------------------

def test_registered_with_seq5_sizes():
    assert "heldout5" in available()
    assert (heldout5.DEFAULT_TRAIN_SIZE, heldout5.DEFAULT_TEST_SIZE) == (1200, 250)
    assert (heldout5.DEFAULT_TRAIN_SIZE, heldout5.DEFAULT_TEST_SIZE) == (seq5.DEFAULT_TRAIN_SIZE,
                                                                         seq5.DEFAULT_TEST_SIZE)
    assert "held-out" in heldout5.__doc__ and "docs/results.md" in heldout5.__doc__


def test_task_ids_and_names_are_new():
    ids = [t.task_id for t in heldout5.TASKS]
    assert ids == [20, 21, 22, 23, 24]
    assert not set(ids) & {t.task_id for t in seq5.TASKS + pretrain.TASKS}
    assert not set(TASKS) & {t.name for t in seq5.TASKS + pretrain.TASKS}


def test_five_tasks_in_order_with_their_metrics(specs):
    checks.check_tasks_metrics_and_manifest("heldout5", specs, TASKS, METRICS, N_TRAIN, N_TEST)


@pytest.mark.parametrize("task", TASKS)
def test_records_validate_and_answers_are_in_the_answer_space(specs, task):
    checks.check_records_in_answer_space(specs[task], task, ANSWERS[task], METRICS[task], N_TRAIN, N_TEST)


@pytest.mark.parametrize("task", TASKS)
def test_every_answer_class_appears_and_classes_are_balanced(task):
    checks.check_answer_classes_balanced(heldout5, task, ANSWERS[task])


def test_paraphrases_vary_and_are_new_instructions(specs):
    """Each task has several phrasings, and none is a seq5 or pretrain instruction: the formats are new."""
    others = (list(seq5.DIGIT_QUESTIONS) + list(seq5.OCR_QUESTIONS) + list(seq5.GROUNDING_QUESTIONS)
              + [t for ts in seq5.SCIENCEQA_QUESTIONS.values() for t in ts]
              + [t for ts in seq5.VQA_QUESTIONS.values() for t in ts]
              + [t for ts in pretrain.INSTRUCT_QUESTIONS.values() for t in ts] + list(pretrain.CAPTION_QUESTIONS))
    patterns = [template_regex(t) for t in others]
    for task in TASKS:
        firsts = {user_text(r).splitlines()[0] for r in both_splits(specs[task])}
        assert len(firsts) >= 3, task
        clash = [q for q in firsts if any(p.fullmatch(q) for p in patterns)]
        assert not clash, (task, clash)


# --- answers match the images ----------------------------------------------------------------------

def test_position_names_the_quadrant_of_the_named_colour(specs):
    for r in both_splits(specs["position"]):
        [((row, col), (_, colour))] = cell_objects(pixels(r)).items()
        assert f" {colour} " in user_text(r), r["id"]
        half = GRID // 2
        expected = ("top " if row < half else "bottom ") + ("left" if col < half else "right")
        assert final_answer(r) == expected, r["id"]


def test_counting_counts_the_named_shape(specs):
    for r in both_splits(specs["counting"]):
        objects = cell_objects(pixels(r))
        assert 1 <= len(objects) <= heldout5.MAX_OBJECTS
        [shape] = [s for s, plural in heldout5.PLURALS.items() if f" {plural} " in user_text(r)]
        assert final_answer(r) == str(sum(s == shape for s, _ in objects.values())), r["id"]


def test_parity_letter_matches_the_sklearn_digit(specs):
    for r in both_splits(specs["parity"]):
        lines = user_text(r).split("\n")
        assert lines[1:] == ["A. even", "B. odd", seq5.MULTIPLE_CHOICE_SUFFIX]
        assert final_answer(r) in {"AB"[d % 2] for d in checks.sklearn_digits_of(r)}, r["id"]


def test_parity_default_split_is_stratified():
    samples = heldout5.generate_parity(GenerationRequest(0, 22, 8, heldout5.DEFAULT_TRAIN_SIZE,
                                                         heldout5.DEFAULT_TEST_SIZE))
    for split, n in (("train", 1200), ("test", 250)):
        answers = Counter(s.answer for s in samples[split])
        assert sum(answers.values()) == n and abs(answers["A"] - answers["B"]) <= 5, (split, answers)


def test_spelling_word_fits_and_answer_is_a_first_letter(specs):
    for r in both_splits(specs["spelling"]):
        assert user_text(r) in heldout5.SPELLING_QUESTIONS
        assert any(w[0] == final_answer(r) for w in pretrain.WORDS)
        assert checks.word_fits(r), r["id"]


def test_spelling_answer_is_the_first_letter_of_the_drawn_word(monkeypatch):
    drawn, answers = checks.drawn_words(monkeypatch, heldout5, "spelling", 60)
    assert all(len(a) == 1 and a.islower() for a in answers)
    assert [w[0] for w in drawn] == answers
    assert set(drawn) <= set(pretrain.WORDS)


def _relation_colours(question: str) -> tuple[str, str]:
    """(subject colour, reference colour) of a relation question, whatever the paraphrase's word order."""
    for template in heldout5.RELATION_QUESTIONS:
        match = template_regex(template).fullmatch(question)
        if match:
            return match["a"], match["b"]
    raise AssertionError(f"not a relation question: {question!r}")


def test_relation_is_unambiguous_and_correct(specs):
    for r in both_splits(specs["relation"]):
        objects = cell_objects(pixels(r))
        assert len(objects) == 2
        col_of = {colour: cell[1] for cell, (_, colour) in objects.items()}
        assert len(set(col_of.values())) == 2, r["id"]  # different columns: left/right is defined
        subject, reference = _relation_colours(user_text(r))
        assert set(col_of) == {subject, reference}, r["id"]
        assert final_answer(r) == ("left" if col_of[subject] < col_of[reference] else "right"), r["id"]


# --- determinism ----------------------------------------------------------------------------------

def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    checks.check_same_seed_identical_bytes_other_seed_differs("heldout5", tmp_path, **SMALL)


def test_test_split_independent_of_train_size(tmp_path):
    checks.check_test_split_independent_of_train_size("heldout5", tmp_path)


def test_splits_are_drawn_from_different_streams():
    checks.check_splits_are_drawn_from_different_streams(heldout5)


# --- recipe ---------------------------------------------------------------------------------------

def test_recipe_is_seq5_on_heldout5():
    checks.check_recipe_is_seq5_on("heldout5")


def test_recipe_can_pick_heldout5_tasks():
    checks.check_recipe_can_pick_tasks("heldout5", ["position", "relation"])
