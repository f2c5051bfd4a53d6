"""Helpers shared by the benchmark tests (tests/test_heldout5*.py, tests/test_benchmarks.py): reading generated
records and images back, telling which scikit-learn digit an image is and which shapes a scene holds, reading
question templates, and the checks every held-out sequence passes the same way (determinism, independent
splits, its recipe in step with recipes/seq5.yaml)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from lvlm_cl import benchmarks
from lvlm_cl.benchmarks import GenerationRequest, available, materialize
from lvlm_cl.benchmarks.render import BACKGROUND, GRID, PALETTE, SHAPES, SceneObject, render_scene
from lvlm_cl.config import load_recipe
from lvlm_cl.data.records import final_answer, load_records
from lvlm_cl.evaluation.scorers import SCORERS, score

ROOT = Path(__file__).resolve().parent.parent


# --- generated records and images ------------------------------------------------------------------

def small_specs(name: str, root: Path, **sizes) -> dict:
    """Benchmark ``name`` generated under ``root`` at the given sizes: {task: TaskSpec}, in training order."""
    return {s.name: s for s in materialize(name, root, progress=False, **sizes)}


def records(spec, split="train"):
    return load_records(getattr(spec, split), check_images=True)


def both_splits(spec):
    return records(spec, "train") + records(spec, "test")


def pixels(record) -> np.ndarray:
    with Image.open(record["images"][0]) as im:
        return np.asarray(im.convert("RGB"))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def draw(module: ModuleType, task: str, n: int, seed: int = 0, split: str = "train") -> list:
    """``n`` samples of one task of a benchmark ``module`` straight from its generator (no files)."""
    task_def = next(t for t in module.TASKS if t.name == task)
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


def calls_of(monkeypatch, module: ModuleType, function: str) -> list:
    """Spy on ``module.function``: the returned list receives the first argument of every call from then on."""
    seen, real = [], getattr(module, function)

    def spy(first, *args, **kwargs):
        seen.append(first)
        return real(first, *args, **kwargs)
    monkeypatch.setattr(module, function, spy)
    return seen


def drawn_words(monkeypatch, module: ModuleType, task: str, n: int) -> tuple[list[str], list[str]]:
    """(the words rendered, the answers) of ``n`` samples of a word task (``pretrain.word_task``)."""
    from lvlm_cl.benchmarks import pretrain
    words = calls_of(monkeypatch, pretrain, "render_text")
    return words, [s.answer for s in draw(module, task, n)]


def drawn_cells(monkeypatch, module: ModuleType, task: str, n: int) -> set[tuple[int, int]]:
    """The (row, col) cells of every shape ``module.render_scene`` drew for ``n`` samples of ``task``."""
    scenes = calls_of(monkeypatch, module, "render_scene")
    draw(module, task, n)
    return {(o.row, o.col) for objects in scenes for o in objects}


@functools.cache
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.reshape(len(data.images), -1), data.target


def sklearn_digits_of(record) -> set[int]:
    """The labels of the scikit-learn digits whose 8 x 8 image the record's 32 x 32 image is (nearest-neighbour
    upscaling: one pixel per 4 x 4 block); fails, naming the record, when it is none of them."""
    flat, target = _sklearn_digits()
    small8 = pixels(record)[::4, ::4, 0].astype(float)
    values = np.round((255 - small8) * 16 / 255).reshape(-1)
    matches = np.flatnonzero((flat == values).all(axis=1))
    assert len(matches) > 0, record["id"]
    return {int(target[i]) for i in matches}


def word_fits(record) -> bool:
    """The record's image has ink, and none of it on the border (a printed word was not cut off)."""
    ink = (pixels(record) < 200).any(axis=-1)
    return bool(ink.any() and not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any()))


# --- question templates ----------------------------------------------------------------------------

def template_regex(template: str) -> re.Pattern:
    """A question template (``str.format`` fields) as a regex matching its instances."""
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[a-z0-9 ]+)", re.escape(template)))


def fields(templates, question: str) -> dict[str, str]:
    """The ``str.format`` fields of ``question``, read back through whichever template produced it."""
    for template in templates:
        match = template_regex(template).fullmatch(question)
        if match:
            return match.groupdict()
    raise AssertionError(f"no template produced {question!r}")


def plain(text: str) -> str:
    """Lower case, "colour" read as "color": two instructions that differ only so are one instruction."""
    return text.lower().replace("colour", "color")


def benchmark_module(name: str) -> ModuleType:
    """The module of built-in benchmark ``name`` (benchmark names are their module names)."""
    return importlib.import_module(f"lvlm_cl.benchmarks.{name}")


def question_templates(module: ModuleType) -> list[str]:
    """Every instruction template of a benchmark module: its ``*_QUESTIONS`` constants (tuples, or dicts of
    tuples), each template once."""
    found = []
    for attribute, value in vars(module).items():
        if attribute.endswith("_QUESTIONS"):
            groups = value.values() if isinstance(value, dict) else [value]
            found += [t for group in groups for t in group]
    return list(dict.fromkeys(found))


def other_benchmarks(name: str) -> list[str]:
    """Every built-in benchmark but ``name``."""
    return [other for other in available() if other != name]


# --- checks every held-out sequence passes the same way --------------------------------------------

def check_tasks_metrics_and_manifest(name: str, specs: dict, tasks: list[str], metrics: dict[str, str],
                                     n_train: int, n_test: int) -> None:
    """The generated tasks come in order with their metrics, in a folder named by the generation, with a manifest."""
    assert list(specs) == tasks
    assert {n: s.metric for n, s in specs.items()} == metrics
    assert all(m in SCORERS and m in benchmarks.METRICS for m in metrics.values())
    folder = specs[tasks[0]].train.parent.parent
    assert folder.name == f"{name}-v{benchmarks.GENERATOR_VERSION}-seed0-img32-n{n_train}x{n_test}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["benchmark"] == name
    assert all(t["counts"] == {"train": n_train, "test": n_test} for t in manifest["tasks"])
    assert all(s.description for s in specs.values())


def check_records_in_answer_space(spec, task: str, answers: set[str], metric: str, n_train: int, n_test: int) -> None:
    """Every record of both splits validates (images included), is numbered in order, is 32 x 32 RGB, and its
    answer is one of ``answers`` and scores 1 against itself."""
    for split, n in (("train", n_train), ("test", n_test)):
        recs = records(spec, split)
        assert len(recs) == n
        assert [r["id"] for r in recs] == [f"{task}-{split}-{k:05d}" for k in range(n)]
        for r in recs:
            assert r["task"] == task and final_answer(r) in answers, r["id"]
            with Image.open(r["images"][0]) as im:
                assert (im.mode, im.size) == ("RGB", (32, 32))
            assert score(metric, final_answer(r), final_answer(r)) == 1.0


def check_answers_not_confused_by_the_metrics(metrics: dict[str, str], answers: dict[str, set[str]]) -> None:
    """Each metric scores every other answer of its task 0 (vqa's normalisation merges none of them)."""
    for task, metric in metrics.items():
        for a in answers[task]:
            for b in answers[task] - {a}:
                assert score(metric, b, a) == 0.0, (task, a, b)


def check_answer_classes_balanced(module: ModuleType, task: str, answers: set[str], n: int = 800) -> None:
    """Every answer class appears in ``n`` drawn samples, each within 0.6–1.4 times its even share."""
    counts = Counter(s.answer for s in draw(module, task, n))
    assert set(counts) == answers
    share = n / len(answers)
    assert min(counts.values()) >= 0.6 * share and max(counts.values()) <= 1.4 * share, counts


def check_same_seed_identical_bytes_other_seed_differs(name: str, tmp_path: Path, **sizes) -> None:
    a = materialize(name, tmp_path / "a", seed=3, progress=False, **sizes)
    b = materialize(name, tmp_path / "b", seed=3, progress=False, **sizes)
    c = materialize(name, tmp_path / "c", seed=4, progress=False, **sizes)
    assert folder_bytes(a[0].train.parent.parent) == folder_bytes(b[0].train.parent.parent)
    for sa, sc in zip(a, c):
        for split in ("train", "test"):
            assert getattr(sa, split).read_bytes() != getattr(sc, split).read_bytes(), (sa.name, split)


def check_test_split_independent_of_train_size(name: str, tmp_path: Path) -> None:
    a = materialize(name, tmp_path, train_size=5, test_size=6, progress=False)
    b = materialize(name, tmp_path, train_size=9, test_size=6, progress=False)
    for sa, sb in zip(a, b):
        assert sa.test.read_bytes() == sb.test.read_bytes(), sa.name
        for k in range(6):
            image = f"images/test-{k:05d}.png"
            assert (sa.test.parent / image).read_bytes() == (sb.test.parent / image).read_bytes(), (sa.name, k)


def check_splits_are_drawn_from_different_streams(module: ModuleType) -> None:
    for task in (t.name for t in module.TASKS):
        train, test = draw(module, task, 30, split="train"), draw(module, task, 30, split="test")
        assert [(s.image.tobytes(), s.question) for s in train] != [(s.image.tobytes(), s.question) for s in test]


def check_recipe_is_seq5_on(name: str) -> None:
    """recipes/<name>.yaml is recipes/seq5.yaml but benchmark and output_dir: fails when the two diverge."""
    cfg = load_recipe(ROOT / f"recipes/{name}.yaml", [])
    ref = load_recipe(ROOT / "recipes/seq5.yaml", [])
    assert cfg.benchmark.name == name and cfg.output_dir == f"runs/{name}"
    assert dataclasses.replace(cfg, benchmark=ref.benchmark, output_dir=ref.output_dir) == ref
    header = (ROOT / f"recipes/{name}.yaml").read_text().splitlines()[0]
    assert header == f"# accelerate launch lvlm_cl/train.py recipes/{name}.yaml"


def check_recipe_can_pick_tasks(name: str, tasks: list[str]) -> None:
    cfg = load_recipe(ROOT / f"recipes/{name}.yaml",
                      [f"benchmark={{name: {name}, tasks: [{', '.join(tasks)}], train_size: 8, test_size: 4}}"])
    assert cfg.benchmark.tasks == tasks and cfg.benchmark.train_size == 8
