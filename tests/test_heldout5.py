"""heldout5, the held-out user sequence: valid records, correct and balanced answers, determinism, recipe."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlm_cl import benchmarks
from lvlm_cl.benchmarks import GenerationRequest, available, heldout5, materialize, pretrain, seq5
from lvlm_cl.benchmarks.render import BACKGROUND, GRID, PALETTE, SHAPES, SceneObject, render_scene
from lvlm_cl.config import load_recipe
from lvlm_cl.data.records import final_answer, load_records, user_text
from lvlm_cl.evaluation.scorers import SCORERS, score

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, N_TEST = 40, 20
SMALL = dict(train_size=N_TRAIN, test_size=N_TEST, progress=False)
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


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """heldout5 at a small size, generated once for the module: {task: TaskSpec}."""
    return {s.name: s for s in materialize("heldout5", tmp_path_factory.mktemp("benchmarks"), **SMALL)}


def records(spec, split="train"):
    return load_records(getattr(spec, split), check_images=True)


def both_splits(spec):
    return records(spec, "train") + records(spec, "test")


def pixels(record) -> np.ndarray:
    with Image.open(record["images"][0]) as im:
        return np.asarray(im.convert("RGB"))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def draw(task: str, n: int, seed: int = 0, split: str = "train") -> list:
    """``n`` samples of one task straight from its generator (no files)."""
    task_def = next(t for t in heldout5.TASKS if t.name == task)
    request = GenerationRequest(seed, task_def.task_id, 32, n, n)
    return list(task_def.generate(request)[split])


def cell_objects(image: np.ndarray) -> dict[tuple[int, int], tuple[str, str]]:
    """{(row, col): (shape, colour)} of every drawn cell, found by redrawing each candidate alone."""
    cell = image.shape[0] // GRID
    found = {}
    for r in range(GRID):
        for c in range(GRID):
            patch = image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
            if (patch == BACKGROUND).all():
                continue
            hits = [(s, col) for s in SHAPES for col in PALETTE
                    if np.array_equal(np.asarray(render_scene([SceneObject(r, c, s, col)], image.shape[0]))
                                      [r * cell:(r + 1) * cell, c * cell:(c + 1) * cell], patch)]
            assert len(hits) == 1, (r, c, hits)
            found[(r, c)] = hits[0]
    return found


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
    assert list(specs) == TASKS
    assert {n: s.metric for n, s in specs.items()} == METRICS
    assert all(m in SCORERS and m in benchmarks.METRICS for m in METRICS.values())
    folder = specs["position"].train.parent.parent
    assert folder.name == f"heldout5-v{benchmarks.GENERATOR_VERSION}-seed0-img32-n{N_TRAIN}x{N_TEST}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["benchmark"] == "heldout5"
    assert all(t["counts"] == {"train": N_TRAIN, "test": N_TEST} for t in manifest["tasks"])
    assert all(s.description for s in specs.values())


@pytest.mark.parametrize("task", TASKS)
def test_records_validate_and_answers_are_in_the_answer_space(specs, task):
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        recs = records(specs[task], split)
        assert len(recs) == n
        assert [r["id"] for r in recs] == [f"{task}-{split}-{k:05d}" for k in range(n)]
        for r in recs:
            assert r["task"] == task and final_answer(r) in ANSWERS[task], r["id"]
            with Image.open(r["images"][0]) as im:
                assert (im.mode, im.size) == ("RGB", (32, 32))
            assert score(METRICS[task], final_answer(r), final_answer(r)) == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_every_answer_class_appears_and_classes_are_balanced(task):
    answers = Counter(s.answer for s in draw(task, 800))
    assert set(answers) == ANSWERS[task]
    share = 800 / len(ANSWERS[task])
    assert min(answers.values()) >= 0.6 * share and max(answers.values()) <= 1.4 * share, answers


def template_regex(template: str) -> re.Pattern:
    """A question template (``str.format`` fields) as a regex matching its instances."""
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[a-z0-9 ]+)", re.escape(template)))


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
    from sklearn.datasets import load_digits

    data = load_digits()
    flat = data.images.reshape(len(data.images), -1)
    for r in both_splits(specs["parity"]):
        lines = user_text(r).split("\n")
        assert lines[1:] == ["A. even", "B. odd", seq5.MULTIPLE_CHOICE_SUFFIX]
        small8 = pixels(r)[::4, ::4, 0].astype(float)  # nearest-neighbour 8 -> 32: one pixel per block
        values = np.round((255 - small8) * 16 / 255).reshape(-1)
        matches = np.flatnonzero((flat == values).all(axis=1))
        assert len(matches) > 0, r["id"]
        assert final_answer(r) in {"AB"[int(data.target[i]) % 2] for i in matches}, r["id"]


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
        ink = (pixels(r) < 200).any(axis=-1)
        assert ink.any() and not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any())


def test_spelling_answer_is_the_first_letter_of_the_drawn_word(monkeypatch):
    drawn = []
    real = heldout5.render_text

    def spy(text, *args, **kwargs):
        drawn.append(text)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(heldout5, "render_text", spy)
    answers = [s.answer for s in draw("spelling", 60)]
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
    a = materialize("heldout5", tmp_path / "a", seed=3, **SMALL)
    b = materialize("heldout5", tmp_path / "b", seed=3, **SMALL)
    c = materialize("heldout5", tmp_path / "c", seed=4, **SMALL)
    assert folder_bytes(a[0].train.parent.parent) == folder_bytes(b[0].train.parent.parent)
    for sa, sc in zip(a, c):
        for split in ("train", "test"):
            assert getattr(sa, split).read_bytes() != getattr(sc, split).read_bytes(), (sa.name, split)


def test_test_split_independent_of_train_size(tmp_path):
    a = materialize("heldout5", tmp_path, train_size=5, test_size=6, progress=False)
    b = materialize("heldout5", tmp_path, train_size=9, test_size=6, progress=False)
    for sa, sb in zip(a, b):
        assert sa.test.read_bytes() == sb.test.read_bytes(), sa.name
        for k in range(6):
            name = f"images/test-{k:05d}.png"
            assert (sa.test.parent / name).read_bytes() == (sb.test.parent / name).read_bytes(), (sa.name, k)


def test_splits_are_drawn_from_different_streams():
    for task in TASKS:
        train, test = draw(task, 30, split="train"), draw(task, 30, split="test")
        assert [(s.image.tobytes(), s.question) for s in train] != [(s.image.tobytes(), s.question) for s in test]


# --- recipe ---------------------------------------------------------------------------------------

def test_recipe_is_seq5_on_heldout5():
    cfg = load_recipe(ROOT / "recipes/heldout5.yaml", [])
    ref = load_recipe(ROOT / "recipes/seq5.yaml", [])
    assert cfg.benchmark.name == "heldout5" and cfg.output_dir == "runs/heldout5"
    assert dataclasses.replace(cfg, benchmark=ref.benchmark, output_dir=ref.output_dir) == ref
    header = (ROOT / "recipes/heldout5.yaml").read_text().splitlines()[0]
    assert header == "# accelerate launch lvlm_cl/train.py recipes/heldout5.yaml"


def test_recipe_can_pick_heldout5_tasks():
    cfg = load_recipe(ROOT / "recipes/heldout5.yaml",
                      ["benchmark={name: heldout5, tasks: [position, relation], train_size: 8, test_size: 4}"])
    assert cfg.benchmark.tasks == ["position", "relation"] and cfg.benchmark.train_size == 8
