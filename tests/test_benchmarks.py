"""The built-in benchmarks: deterministic, valid canonical records, correct answers, safe caching."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from benchmark_checks import folder_bytes, pixels, records, sklearn_digits_of
from lvlm_cl import benchmarks
from lvlm_cl.benchmarks import GenerationRequest, available, materialize, pretrain, seq5
from lvlm_cl.benchmarks.render import BACKGROUND, GRID, PALETTE, SHAPES, SceneObject, render_scene
from lvlm_cl.data.records import final_answer, user_text

SMALL = dict(train_size=24, test_size=12, progress=False)
SEQ5_TASKS = ["digits", "scienceqa", "vqa", "ocr", "grounding"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Every benchmark at a small size, generated once for the module: {name: {task: TaskSpec}}."""
    root = tmp_path_factory.mktemp("benchmarks")
    return {name: {s.name: s for s in materialize(name, root, **SMALL)} for name in available()}


def occupied_cells(image: np.ndarray, grid: int = GRID) -> list[tuple[int, int]]:
    """Grid cells whose centre pixel is not background: every drawn shape covers its cell's centre."""
    cell = image.shape[0] // grid
    return [(r, c) for r in range(grid) for c in range(grid)
            if tuple(image[r * cell + cell // 2, c * cell + cell // 2]) != BACKGROUND]


# --- API ------------------------------------------------------------------------------------------

def test_available_lists_the_benchmarks():
    assert available() == ["heldout5", "heldout5b", "heldout5c", "pretrain", "seq5"]


def test_unknown_name_lists_available(tmp_path):
    with pytest.raises(ValueError, match="heldout5, heldout5b, heldout5c, pretrain, seq5"):
        materialize("nope", tmp_path)


@pytest.mark.parametrize("kwargs", [dict(image_size=30), dict(image_size=8), dict(train_size=0),
                                    dict(test_size=-1), dict(seed=-1)])
def test_invalid_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        materialize("seq5", tmp_path, progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_task_order_metrics_and_layout(small):
    assert list(small["seq5"]) == SEQ5_TASKS
    assert list(small["pretrain"]) == ["caption", "instruct"]
    metrics = {n: s.metric for n, s in small["seq5"].items()}
    assert metrics == {"digits": "contains", "scienceqa": "multiple_choice", "vqa": "vqa", "ocr": "vqa",
                       "grounding": "iou"}
    spec = small["seq5"]["digits"]
    folder = spec.train.parent.parent
    assert folder.name == f"seq5-v{benchmarks.GENERATOR_VERSION}-seed0-img32-n24x12"
    assert spec.train == folder / "digits" / "train.jsonl" and spec.test == folder / "digits" / "test.jsonl"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == SEQ5_TASKS
    assert all(t["counts"] == {"train": 24, "test": 12} for t in manifest["tasks"])
    assert all(s.description for b in small.values() for s in b.values())


# --- records --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bench,task", [("seq5", t) for t in SEQ5_TASKS] + [("pretrain", "caption"),
                                                                              ("pretrain", "instruct")])
def test_records_validate_with_images(small, bench, task):
    spec = small[bench][task]
    for split, n in (("train", 24), ("test", 12)):
        recs = records(spec, split)
        assert len(recs) == n
        assert [r["id"] for r in recs] == [f"{task}-{split}-{k:05d}" for k in range(n)]
        raw = [json.loads(line) for line in getattr(spec, split).read_text().splitlines()]
        assert all(r["images"] == [f"images/{split}-{k:05d}.png"] for k, r in enumerate(raw))
        for r in recs:
            assert r["task"] == task
            with Image.open(r["images"][0]) as im:
                assert (im.mode, im.size) == ("RGB", (32, 32))


def test_paraphrases_vary(small):
    for task in SEQ5_TASKS:
        firsts = {user_text(r).splitlines()[0] for r in records(small["seq5"][task])}
        assert len(firsts) >= 3, task


# --- determinism and caching ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["seq5", "pretrain"])
def test_same_seed_identical_bytes_other_seed_differs(tmp_path, name):
    a = materialize(name, tmp_path / "a", seed=3, **SMALL)[0].train.parent.parent
    b = materialize(name, tmp_path / "b", seed=3, **SMALL)[0].train.parent.parent
    c = materialize(name, tmp_path / "c", seed=4, **SMALL)[0].train.parent.parent
    assert folder_bytes(a) == folder_bytes(b)
    first_task = next(iter(json.loads((a / "manifest.json").read_text())["tasks"]))["name"]
    assert (a / first_task / "train.jsonl").read_bytes() != (c / first_task / "train.jsonl").read_bytes()


def test_deterministic_across_processes_and_hash_seeds(tmp_path, small):
    # A fresh interpreter with another PYTHONHASHSEED: set iteration order or hash() would show up here.
    code = ("import sys; from lvlm_cl.benchmarks import materialize\n"
            "for n in ('seq5', 'pretrain'):\n"
            "    materialize(n, sys.argv[1], train_size=24, test_size=12, progress=False)\n")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env)
    for name in ("seq5", "pretrain"):
        ours = next(iter(small[name].values())).train.parent.parent
        assert folder_bytes(tmp_path / ours.name) == folder_bytes(ours)


def test_test_split_independent_of_train_size(tmp_path):
    a = materialize("seq5", tmp_path, train_size=5, test_size=6, progress=False)
    b = materialize("seq5", tmp_path, train_size=9, test_size=6, progress=False)
    for sa, sb in zip(a, b):
        assert sa.test.read_bytes() == sb.test.read_bytes(), sa.name
        test_images = [p.name for p in sorted((sa.test.parent / "images").glob("test-*.png"))]
        assert len(test_images) == 6
        for name in test_images:
            assert (sa.test.parent / "images" / name).read_bytes() == \
                (sb.test.parent / "images" / name).read_bytes(), (sa.name, name)


def test_cache_is_reused(tmp_path, monkeypatch):
    first = materialize("seq5", tmp_path, **SMALL)
    mtime = first[0].train.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although a complete folder exists")

    monkeypatch.setattr(benchmarks, "_generate", fail)
    assert materialize("seq5", tmp_path, **SMALL) == first
    assert first[0].train.stat().st_mtime_ns == mtime


def test_interrupted_generation_leaves_nothing_reusable(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = seq5.render_scene

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real(*args, **kwargs)

    monkeypatch.setattr(seq5, "render_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        materialize("seq5", tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither a final folder nor a leftover temporary one

    monkeypatch.setattr(seq5, "render_scene", real)
    specs = materialize("seq5", tmp_path, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == [specs[0].train.parent.parent.name]
    assert len(records(specs[-1])) == 24


# --- seq5 tasks -----------------------------------------------------------------------------------

def test_digits_labels_match_sklearn(small):
    for split in ("train", "test"):
        for r in records(small["seq5"]["digits"], split):
            image = pixels(r)
            assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
            assert final_answer(r) in {str(d) for d in sklearn_digits_of(r)}, r["id"]


def test_digits_default_split_is_large_and_stratified():
    request = GenerationRequest(seed=0, task_id=0, image_size=8, train_size=seq5.DEFAULT_TRAIN_SIZE,
                                test_size=seq5.DEFAULT_TEST_SIZE)
    answers = {split: [s.answer for s in samples] for split, samples in seq5.generate_digits(request).items()}
    assert len(answers["train"]) >= 1000 and len(answers["test"]) >= 200
    for split, labels in answers.items():
        counts = [labels.count(str(d)) for d in range(10)]
        assert max(counts) - min(counts) <= 1, (split, counts)


def test_digits_train_capped_by_what_exists():
    request = GenerationRequest(seed=0, task_id=0, image_size=8, train_size=5000, test_size=300)
    samples = seq5.generate_digits(request)
    assert len(list(samples["train"])) == 1797 - 300


def _matches_drawn_object(image: np.ndarray, row: int, col: int, shape: str | None, colour: str | None):
    """True if some object with these attributes (None = any) redraws the image exactly."""
    return any(np.array_equal(np.asarray(render_scene([SceneObject(row, col, s, c)], image.shape[0])), image)
               for s in ([shape] if shape else SHAPES) for c in ([colour] if colour else PALETTE))


def test_scienceqa_options_and_letter(small):
    for r in records(small["seq5"]["scienceqa"]):
        lines = user_text(r).split("\n")
        assert lines[-1] == seq5.MULTIPLE_CHOICE_SUFFIX
        options = lines[1:-1]
        assert [o[:3] for o in options] == ["A. ", "B. ", "C. ", "D. "]
        values = [o[3:] for o in options]
        # Each question type lists its own four values, always in the same order.
        assert tuple(values) in set(seq5.SCIENCEQA_OPTIONS.values())
        letter = final_answer(r)
        assert letter in "ABCD" and len(letter) == 1
        chosen = values["ABCD".index(letter)]
        image = pixels(r)
        [(row, col)] = occupied_cells(image)
        asks_colour = chosen in PALETTE
        assert _matches_drawn_object(image, row, col, None if asks_colour else chosen,
                                     chosen if asks_colour else None), r["id"]
        for other in values:
            if other != chosen:
                assert not _matches_drawn_object(image, row, col, None if asks_colour else other,
                                                 other if asks_colour else None), r["id"]


def test_vqa_answers_match_the_scene(small):
    kinds = set()
    for r in records(small["seq5"]["vqa"]) + records(small["seq5"]["vqa"], "test"):
        question, suffix = user_text(r).split("\n")
        assert suffix == seq5.SHORT_ANSWER_SUFFIX
        image, answer = pixels(r), final_answer(r)
        cells = occupied_cells(image)
        assert 1 <= len(cells) <= 4
        if question in seq5.VQA_QUESTIONS["count"]:
            kinds.add("count")
            assert answer == str(len(cells)), r["id"]
        elif answer in PALETTE:
            kinds.add("colour")
            shape = next(s for s in SHAPES if s in question)
            hits = [cell for cell in cells if _cell_shows(image, cell, shape, None)]
            assert len(hits) == 1, r["id"]  # the named shape occurs exactly once
            assert _cell_shows(image, hits[0], shape, answer), r["id"]
        else:
            kinds.add("shape")
            assert answer in SHAPES
            colour = next(c for c in PALETTE if c in question)
            assert any(_cell_shows(image, cell, answer, colour) for cell in cells), r["id"]
    assert kinds == {"count", "colour", "shape"}


def _cell_shows(image: np.ndarray, cell: tuple[int, int], shape: str | None, colour: str | None) -> bool:
    return _matches_drawn_object(_only_cell(image, *cell), *cell, shape, colour)


def _only_cell(image: np.ndarray, row: int, col: int) -> np.ndarray:
    """The image with every cell but (row, col) blanked to background."""
    cell = image.shape[0] // GRID
    out = np.empty_like(image)
    out[...] = BACKGROUND
    out[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = \
        image[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
    return out


def test_ocr_words_fit_and_come_from_the_list(small):
    assert len(seq5.OCR_WORDS) == 12 and len(set(seq5.OCR_WORDS)) == 12
    assert all(len(w) == 3 and w.islower() for w in seq5.OCR_WORDS)
    assert seq5.ocr_font_size(32) >= 12  # large at 32 px, yet the widest word keeps a margin
    for r in records(small["seq5"]["ocr"]):
        question, suffix = user_text(r).split("\n")
        assert question in seq5.OCR_QUESTIONS and suffix == seq5.SHORT_ANSWER_SUFFIX
        assert final_answer(r) in seq5.OCR_WORDS
        ink = (pixels(r) < 200).any(axis=-1)
        assert ink.any() and not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any())


def parse_box(text: str) -> list[float]:
    match = re.fullmatch(r"\[(\d\.\d\d), (\d\.\d\d), (\d\.\d\d), (\d\.\d\d)\]", text)
    assert match, text
    return [float(v) for v in match.groups()]


@pytest.mark.parametrize("image_size", [32, 48])
def test_grounding_box_points_at_the_named_colour(tmp_path, small, image_size):
    specs = small if image_size == 32 else \
        {"seq5": {s.name: s for s in materialize("seq5", tmp_path, image_size=image_size, **SMALL)}}
    for r in records(specs["seq5"]["grounding"]):
        x1, y1, x2, y2 = parse_box(final_answer(r))
        grid = seq5.GROUNDING_GRID
        assert x2 - x1 == pytest.approx(1 / grid) and y2 - y1 == pytest.approx(1 / grid)
        colour = next(c for c in PALETTE if f" {c} " in user_text(r))
        image = pixels(r)
        assert len(occupied_cells(image, grid)) in seq5.GROUNDING_OBJECT_COUNTS
        cx, cy = int((x1 + x2) / 2 * image_size), int((y1 + y2) / 2 * image_size)
        assert tuple(image[cy, cx]) == PALETTE[colour], r["id"]


# --- pretrain -------------------------------------------------------------------------------------

def test_pretrain_shares_no_question_or_answer_format_with_seq5(small):
    seq5_questions = {user_text(r) for s in small["seq5"].values() for r in records(s)}
    seq5_first_lines = {q.split("\n")[0] for q in seq5_questions}
    pre = [r for s in small["pretrain"].values() for split in ("train", "test") for r in records(s, split)]
    pre_questions = {user_text(r) for r in pre}
    assert not pre_questions & seq5_questions
    assert not pre_questions & seq5_first_lines
    for q in pre_questions:
        assert seq5.MULTIPLE_CHOICE_SUFFIX not in q and seq5.SHORT_ANSWER_SUFFIX not in q
    templates = (list(seq5.DIGIT_QUESTIONS) + list(seq5.OCR_QUESTIONS) + list(seq5.GROUNDING_QUESTIONS)
                 + [t for ts in seq5.SCIENCEQA_QUESTIONS.values() for t in ts]
                 + [t for ts in seq5.VQA_QUESTIONS.values() for t in ts])
    prefixes = {t.split("{")[0] for t in templates}
    assert not any(q.startswith(p) for q in pre_questions for p in prefixes)
    for r in pre:
        answer = final_answer(r)
        assert not re.fullmatch(r"[A-D]", answer) and "[" not in answer, r["id"]


def test_pretrain_word_list_is_disjoint_and_images_are_mixed(small):
    assert len(pretrain.WORDS) == 40 and len(set(pretrain.WORDS)) == 40
    assert all(3 <= len(w) <= 5 for w in pretrain.WORDS)
    assert not set(pretrain.WORDS) & set(seq5.OCR_WORDS)
    captions = [final_answer(r) for r in records(small["pretrain"]["caption"])]
    assert any(c.startswith("the number ") for c in captions)
    assert any(c.startswith('the word "') for c in captions)
    assert any(c.split()[-1] in SHAPES for c in captions)


def test_pretrain_captions_list_objects_in_row_major_order(small):
    for r in records(small["pretrain"]["caption"]):
        answer, image = final_answer(r), pixels(r)
        if answer.startswith(("the number ", "the word ")):
            continue
        phrases = re.split(r", | and ", answer)
        cells = occupied_cells(image)
        assert len(phrases) == len(cells), r["id"]
        for phrase, (row, col) in zip(phrases, cells):
            _, colour, shape = phrase.split()
            assert _cell_shows(image, (row, col), shape, colour), r["id"]


# --- defaults -------------------------------------------------------------------------------------

def test_default_sizes(tmp_path, monkeypatch):
    seen = {}

    def capture(name, tasks, out, *, n_train, n_test, **kwargs):
        seen[name] = (n_train, n_test)
        raise RuntimeError("stop before generating")

    monkeypatch.setattr(benchmarks, "_generate", capture)
    for name in available():
        with pytest.raises(RuntimeError, match="stop"):
            materialize(name, tmp_path, progress=False)
    assert seen == {"seq5": (1200, 250), "heldout5": (1200, 250), "heldout5b": (1200, 250),
                    "heldout5c": (1200, 250), "pretrain": (4000, 200)}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_defaults_generate_quickly_with_documented_counts(tmp_path):
    start = time.perf_counter()
    seq = materialize("seq5", tmp_path, progress=False)
    pre = materialize("pretrain", tmp_path, progress=False)
    assert time.perf_counter() - start < 60
    for specs, (n_train, n_test) in ((seq, (1200, 250)), (pre, (4000, 200))):
        manifest = json.loads((specs[0].train.parent.parent / "manifest.json").read_text())
        assert all(t["counts"] == {"train": n_train, "test": n_test} for t in manifest["tasks"])


def test_multiple_choice_prompt_lines_and_too_many_options():
    text = seq5.multiple_choice("Which half?", ("top", "bottom"))
    assert text.split("\n") == ["Which half?", "A. top", "B. bottom", seq5.MULTIPLE_CHOICE_SUFFIX]
    with pytest.raises(ValueError, match="5 options but only the letters 'ABCD'"):
        seq5.multiple_choice("Which?", ("a", "b", "c", "d", "e"))
