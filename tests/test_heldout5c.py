"""heldout5c, the third held-out user sequence: valid records, correct and balanced answers, determinism, recipe.

Only data and the recipe are checked here: nothing trains on heldout5c (it is kept aside for a final check).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from functools import partial

import numpy as np
import pytest

import benchmark_checks as checks
from benchmark_checks import both_splits, cell_objects, fields, pixels, plain, template_regex
from lvlm_cl.benchmarks import GenerationRequest, available, heldout5, heldout5b, heldout5c, pretrain, seq5
from lvlm_cl.benchmarks.render import GRID, PALETTE, SHAPES
from lvlm_cl.data.records import final_answer, user_text
from lvlm_cl.evaluation.scorers import score

N_TRAIN, N_TEST = 40, 20
TASKS = ["twice", "column", "word_length", "digit_word", "same_colour"]
METRICS = {"twice": "exact_match", "column": "multiple_choice", "word_length": "vqa", "digit_word": "exact_match",
           "same_colour": "exact_match"}
ANSWERS = {
    "twice": set(SHAPES),
    "column": {"A", "B", "C", "D"},
    "word_length": {"4", "5"},
    "digit_word": set(heldout5c.DIGIT_WORDS),
    "same_colour": {"yes", "no"},
}
QUESTIONS = {
    "twice": heldout5c.TWICE_QUESTIONS,
    "column": heldout5c.COLUMN_QUESTIONS,
    "word_length": heldout5c.WORD_LENGTH_QUESTIONS,
    "digit_word": heldout5c.DIGIT_WORD_QUESTIONS,
    "same_colour": heldout5c.SAME_COLOUR_QUESTIONS,
}
draw = partial(checks.draw, heldout5c)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """heldout5c at a small size, generated once for the module: {task: TaskSpec}."""
    return checks.small_specs("heldout5c", tmp_path_factory.mktemp("benchmarks"), train_size=N_TRAIN,
                              test_size=N_TEST)


# --- registry, layout ------------------------------------------------------------------------------

def test_registered_with_seq5_sizes():
    assert "heldout5c" in available()
    assert (heldout5c.DEFAULT_TRAIN_SIZE, heldout5c.DEFAULT_TEST_SIZE) == (1200, 250)
    assert (heldout5c.DEFAULT_TRAIN_SIZE, heldout5c.DEFAULT_TEST_SIZE) == (seq5.DEFAULT_TRAIN_SIZE,
                                                                           seq5.DEFAULT_TEST_SIZE)
    doc = heldout5c.__doc__
    assert "held-out" in doc and "docs/results.md" in doc and "heldout5b" in doc and "exists" in doc


def test_task_ids_and_names_are_new():
    ids = [t.task_id for t in heldout5c.TASKS]
    assert ids == [40, 41, 42, 43, 44]
    assert {"seq5", "pretrain", "heldout5", "heldout5b"} <= set(checks.other_benchmarks("heldout5c"))
    others = [t for name in checks.other_benchmarks("heldout5c") for t in checks.benchmark_module(name).TASKS]
    assert not set(ids) & {t.task_id for t in others}
    assert not set(TASKS) & {t.name for t in others}


def test_five_tasks_in_order_with_their_metrics(specs):
    checks.check_tasks_metrics_and_manifest("heldout5c", specs, TASKS, METRICS, N_TRAIN, N_TEST)
    assert {"yes", "no"} in ANSWERS.values() and "multiple_choice" in METRICS.values()


@pytest.mark.parametrize("task", TASKS)
def test_records_validate_and_answers_are_in_the_answer_space(specs, task):
    checks.check_records_in_answer_space(specs[task], task, ANSWERS[task], METRICS[task], N_TRAIN, N_TEST)


def test_answers_are_not_confused_by_the_metrics():
    """Each metric scores every other answer of its task 0 (vqa's normalisation merges none of them)."""
    checks.check_answers_not_confused_by_the_metrics(METRICS, ANSWERS)


def test_digit_word_wants_the_word_not_the_numeral():
    """vqa would read "seven" as "7" (seq5's digits answer); exact match does not."""
    assert score("vqa", "7", "seven") == 1.0
    assert score(METRICS["digit_word"], "7", "seven") == 0.0 and score(METRICS["digit_word"], "Seven", "seven") == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_every_answer_class_appears_and_classes_are_balanced(task):
    checks.check_answer_classes_balanced(heldout5c, task, ANSWERS[task])


# --- instructions ----------------------------------------------------------------------------------

def first_lines(module, task: str, n: int = 300) -> set[str]:
    """The instructions (first lines) of ``n`` samples of one task, lower case, "colour" read as "color"."""
    return {plain(s.question.splitlines()[0]) for s in checks.draw(module, task, n)}


def test_every_paraphrase_is_used():
    """Each task picks among its own 3-4 templates, and every one of them comes up."""
    for task in TASKS:
        firsts = {s.question.splitlines()[0] for s in draw(task, 300)}
        for q in firsts:
            fields(QUESTIONS[task], q)  # raises unless one of the task's templates produced it
        used = {t for t in QUESTIONS[task] if any(template_regex(t).fullmatch(q) for q in firsts)}
        assert used == set(QUESTIONS[task]) and 3 <= len(used) <= 4, task
    assert {t for ts in QUESTIONS.values() for t in ts} == set(checks.question_templates(heldout5c))


def test_no_instruction_is_another_benchmarks():
    """No heldout5c instruction is an instruction of seq5, pretrain, heldout5, heldout5b or any other built-in
    benchmark, reading "colour" and "color" as one word: neither one of theirs produces one of ours, nor one of
    ours one of theirs (checked on drawn samples, both ways)."""
    others = checks.other_benchmarks("heldout5c")
    assert {"seq5", "pretrain", "heldout5", "heldout5b"} <= set(others)
    modules = [checks.benchmark_module(name) for name in others]
    theirs = [template_regex(plain(t)) for m in modules for t in checks.question_templates(m)]
    ours = [template_regex(plain(t)) for ts in QUESTIONS.values() for t in ts]
    for task in TASKS:
        clash = [q for q in first_lines(heldout5c, task) if any(p.fullmatch(q) for p in theirs)]
        assert not clash, (task, clash)
    for module in modules:
        for task in (t.name for t in module.TASKS):
            clash = [q for q in first_lines(module, task, 200) if any(p.fullmatch(q) for p in ours)]
            assert not clash, (module.__name__, task, clash)


# --- answers match the images ----------------------------------------------------------------------

def test_twice_names_the_one_kind_drawn_twice(specs):
    for r in both_splits(specs["twice"]):
        assert user_text(r) in heldout5c.TWICE_QUESTIONS
        objects = cell_objects(pixels(r))
        assert len(objects) in heldout5c.TWICE_OBJECT_COUNTS
        colours = [c for _, c in objects.values()]
        assert len(set(colours)) == len(colours), r["id"]
        counts = Counter(s for s, _ in objects.values())
        assert sorted(counts.values()) == [1] * (len(objects) - 2) + [2], r["id"]  # one kind twice, others once
        [twice] = [s for s, k in counts.items() if k == 2]
        assert final_answer(r) == twice, r["id"]


def test_twice_answers_every_kind_in_both_scene_sizes():
    seen = Counter((s.answer, len(cell_objects(np.asarray(s.image)))) for s in draw("twice", 200))
    assert set(seen) == {(shape, n) for shape in SHAPES for n in heldout5c.TWICE_OBJECT_COUNTS}


def test_column_letter_names_the_column_of_the_named_colour(specs):
    for r in both_splits(specs["column"]):
        [((_, col), (_, colour))] = cell_objects(pixels(r)).items()
        lines = user_text(r).split("\n")
        assert lines[1:] == ["A. column 1", "B. column 2", "C. column 3", "D. column 4", seq5.MULTIPLE_CHOICE_SUFFIX]
        assert fields(heldout5c.COLUMN_QUESTIONS, lines[0])["colour"] == colour, r["id"]
        assert final_answer(r) == "ABCD"[col], r["id"]


def test_column_uses_every_cell(monkeypatch):
    """The column is drawn first, but the shape can still be in any of the 16 cells."""
    every_cell = {(r, c) for r in range(GRID) for c in range(GRID)}
    assert checks.drawn_cells(monkeypatch, heldout5c, "column", 400) == every_cell


def test_word_length_word_fits(specs):
    for r in both_splits(specs["word_length"]):
        assert user_text(r) in heldout5c.WORD_LENGTH_QUESTIONS
        assert checks.word_fits(r), r["id"]


def test_word_length_answer_is_the_length_of_the_drawn_word(monkeypatch):
    drawn, answers = checks.drawn_words(monkeypatch, heldout5c, "word_length", 60)
    assert [str(len(w)) for w in drawn] == answers
    assert set(drawn) <= set(pretrain.WORDS) and len(set(drawn)) > 10


def test_digit_word_names_the_sklearn_digit(specs):
    for r in both_splits(specs["digit_word"]):
        assert user_text(r) in heldout5c.DIGIT_WORD_QUESTIONS
        assert final_answer(r) in {heldout5c.DIGIT_WORDS[d] for d in checks.sklearn_digits_of(r)}, r["id"]


def test_digit_word_default_split_is_stratified_and_not_another_tasks():
    request = GenerationRequest(0, 43, 8, heldout5c.DEFAULT_TRAIN_SIZE, heldout5c.DEFAULT_TEST_SIZE)
    _, ours = seq5.digit_splits(request, "digit_word", heldout5c.DIGIT_WORD_PARTITION_STREAM)
    for task_id, stream in ((0, seq5.DIGITS_PARTITION_STREAM), (22, heldout5.PARITY_PARTITION_STREAM),
                            (33, heldout5b.DIGIT_SIZE_PARTITION_STREAM)):
        other = dataclasses.replace(request, task_id=task_id)
        _, theirs = seq5.digit_splits(other, "other", stream)
        assert not np.array_equal(ours["test"], theirs["test"]), task_id
    samples = heldout5c.generate_digit_word(request)
    for split, n in (("train", 1200), ("test", 250)):
        answers = Counter(s.answer for s in samples[split])
        assert sum(answers.values()) == n and set(answers) == set(heldout5c.DIGIT_WORDS), split
        assert max(answers.values()) - min(answers.values()) <= 1, (split, answers)


def test_same_colour_answers_whether_the_two_shapes_share_a_colour(specs):
    for r in both_splits(specs["same_colour"]):
        assert user_text(r) in heldout5c.SAME_COLOUR_QUESTIONS
        objects = cell_objects(pixels(r))
        assert len(objects) == 2, r["id"]
        (_, a), (_, b) = objects.values()
        assert final_answer(r) == ("yes" if a == b else "no"), r["id"]


def test_same_colour_uses_every_colour_both_ways():
    seen = set()
    for s in draw("same_colour", 400):
        (_, a), (_, b) = cell_objects(np.asarray(s.image)).values()
        seen |= {(s.answer, a), (s.answer, b)}
    assert seen == {(answer, c) for answer in ("yes", "no") for c in PALETTE}


# --- determinism ----------------------------------------------------------------------------------

def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    checks.check_same_seed_identical_bytes_other_seed_differs("heldout5c", tmp_path, train_size=N_TRAIN,
                                                              test_size=N_TEST)


def test_test_split_independent_of_train_size(tmp_path):
    checks.check_test_split_independent_of_train_size("heldout5c", tmp_path)


def test_splits_are_drawn_from_different_streams():
    checks.check_splits_are_drawn_from_different_streams(heldout5c)


# --- recipe ---------------------------------------------------------------------------------------

def test_recipe_is_seq5_on_heldout5c():
    """recipes/heldout5c.yaml is recipes/seq5.yaml but benchmark and output_dir: fails when the two diverge."""
    checks.check_recipe_is_seq5_on("heldout5c")
    header = (checks.ROOT / "recipes/heldout5c.yaml").read_text()
    assert "never tuned on or diagnosed with" in header and "tests/test_heldout5c.py" in header


def test_recipe_can_pick_heldout5c_tasks():
    checks.check_recipe_can_pick_tasks("heldout5c", ["twice", "same_colour"])
