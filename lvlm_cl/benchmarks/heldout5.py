"""heldout5: a held-out user sequence of five tasks, the same size as seq5, kept aside for validation.

Nobody tunes on it. Methods, their settings and seq5 itself were chosen by looking at seq5; heldout5 checks
that a continual-learning method tuned there still works on a sequence of new instruction formats it was
never tuned on. Never use it to choose a method or a hyper-parameter (that would make it one more tuning
set); docs/results.md reports the methods on it next to seq5.
Its ``position`` task was used once to diagnose why the seed method learned less here (issue 23; see
docs/benchmarks.md#heldout5-a-held-out-user-sequence): heldout5 is no longer untouched. Later its ``position``
and ``counting`` tasks were trained alone over seeds and settings, and 20 epochs per task came from that: it
is a development sequence now. ``heldout5b`` was the next held-out check and became a development sequence in
turn; ``heldout5c`` is the held-out check now.

In training order (``TASKS``), each as metric: example question -> answer:

- ``position`` (exact_match): "Which corner of the image is the red shape in?" -> "top left" (one shape
  on the 4 × 4 grid; four quadrant names).
- ``counting`` (vqa): "How many circles are there?" -> "0" .. "3" (a scene of 1–4 shapes).
- ``parity`` (multiple_choice): "Is this handwritten digit even or odd?" + "A. even" / "B. odd" + LLaVA's
  multiple-choice suffix -> "A" / "B" (a real scikit-learn digit, as in seq5's digits task).
- ``spelling`` (exact_match): "What is the first letter of the word?" -> "l" (one printed word).
- ``relation`` (exact_match): "Is the red shape left of or right of the blue shape?" -> "left" / "right"
  (two shapes in different columns).

Like seq5's, every task picks its instruction from 3–4 paraphrases per sample and has its own answer
format, and each is a new format for a skill the pretrained tiny model has (``pretrain``: colour, shape,
position, words and their letters, the parity of printed digits; parity here is asked of handwritten
digits, which seq5's digits task also brings in). Answers are balanced: the answer class is drawn uniformly
(position: the cell; parity: a digit split stratified by class) and the scene made to fit it, and no scene
is ambiguous (relation's two shapes are always in different columns). Task ids 20–24 share no random
stream with seq5 (0–4) or pretrain (10–11). The default sizes match seq5's: 1200 train / 250 test.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from lvlm_cl.benchmarks import GenerationRequest, Sample, TaskDef, pick, synthetic
from lvlm_cl.benchmarks.pretrain import WORDS, word_task
from lvlm_cl.benchmarks.render import GRID, SHAPES, render_scene, sample_scene
from lvlm_cl.benchmarks.seq5 import digit_task, multiple_choice

DEFAULT_TRAIN_SIZE = 1200
DEFAULT_TEST_SIZE = 250

# position: the quadrant of the 4 × 4 grid the one shape is in (rows/columns 0–1 are top/left).
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
# counting: how many shapes of the named kind, drawn uniformly; the scene has max(1, count)..4 shapes.
COUNTS: tuple[int, ...] = (0, 1, 2, 3)
MAX_OBJECTS = 4
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                           "cross": "crosses"}
# parity: the two options, always in this order (see seq5.scienceqa_sample for why not shuffled).
PARITY_OPTIONS: tuple[str, ...] = ("even", "odd")
OPTION_LETTERS = "AB"
PARITY_PARTITION_STREAM = 3  # the train/test partition of sklearn's digits has its own random stream
# spelling: pretrain's 40 words (the model learned to spell them letter by letter); the answer is drawn
# uniformly among their first letters, then a word starting with it.
FIRST_LETTERS: tuple[str, ...] = tuple(sorted({w[0] for w in WORDS}))
# relation: where the first named shape is, relative to the second.
RELATIONS: tuple[str, ...] = ("left", "right")

POSITION_QUESTIONS = (
    "Which corner of the image is the {colour} shape in?",
    "In which quadrant is the {colour} object? Answer top left, top right, bottom left or bottom right.",
    "Where is the {colour} shape: top left, top right, bottom left or bottom right?",
)
COUNTING_QUESTIONS = (
    "How many {shapes} are there?",
    "Count the {shapes} in the image.",
    "How many {shapes} can you see? Answer with a number.",
    "What is the number of {shapes} in this picture?",
)
PARITY_QUESTIONS = (
    "Is this handwritten digit even or odd?",
    "Is the number written in the image even or odd?",
    "Would you call the handwritten number even or odd?",
)
SPELLING_QUESTIONS = (
    "What is the first letter of the word?",
    "Which letter does the word in the image start with?",
    "Give the first letter of the written word.",
    "The word in the picture begins with which letter?",
)
RELATION_QUESTIONS = (
    "Is the {a} shape left of or right of the {b} shape?",
    "Is the {a} object to the left or to the right of the {b} object?",
    "Compared with the {b} shape, is the {a} shape on the left or on the right?",
)


def quadrant(row: int, col: int) -> str:
    """The quadrant name of a 4 × 4 grid cell (``GRID`` is even, so every cell is in exactly one)."""
    half = GRID // 2
    return f"{'top' if row < half else 'bottom'} {'left' if col < half else 'right'}"


# --- position ------------------------------------------------------------------------------------

def position_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """One shape in a random cell of the 4 × 4 grid (4 cells per quadrant: balanced); answer = quadrant."""
    obj = sample_scene(rng, 1)[0]
    question = pick(rng, POSITION_QUESTIONS).format(colour=obj.colour)
    return Sample(render_scene([obj], image_size), question, quadrant(obj.row, obj.col))


# --- counting ------------------------------------------------------------------------------------

def counting_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """1–4 shapes; exactly ``count`` of them (uniform in ``COUNTS``) have the asked shape, the rest others."""
    count = pick(rng, COUNTS)
    target = pick(rng, SHAPES)
    others = tuple(s for s in SHAPES if s != target)
    n = int(rng.integers(max(1, count), MAX_OBJECTS + 1))
    objects = sample_scene(rng, n)
    chosen = set(int(i) for i in rng.choice(n, size=count, replace=False))
    objects = [dataclasses.replace(o, shape=target if i in chosen else pick(rng, others))
               for i, o in enumerate(objects)]
    question = pick(rng, COUNTING_QUESTIONS).format(shapes=PLURALS[target])
    return Sample(render_scene(objects, image_size), question, str(count))


# --- parity --------------------------------------------------------------------------------------

def generate_parity(request: GenerationRequest) -> dict[str, Iterator[Sample]]:
    """scikit-learn's handwritten digits, split stratified by digit (so by parity too), as seq5's digits."""
    return digit_task(request, "parity", PARITY_PARTITION_STREAM, parity_question,
                      lambda digit: OPTION_LETTERS[digit % 2])   # even -> A, odd -> B


def parity_question(rng: np.random.Generator) -> str:
    return multiple_choice(pick(rng, PARITY_QUESTIONS), PARITY_OPTIONS, OPTION_LETTERS)


# --- spelling ------------------------------------------------------------------------------------

def generate_spelling(request: GenerationRequest) -> dict[str, Iterator[Sample]]:
    """A word of ``pretrain.WORDS``; answer = its first letter."""
    return word_task(request, FIRST_LETTERS, lambda word: word[0], SPELLING_QUESTIONS)


# --- relation ------------------------------------------------------------------------------------

def relation_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """Two shapes of distinct colours in different columns; is the first named one left or right of the other?"""
    answer = pick(rng, RELATIONS)
    while True:  # same column: neither left nor right; redraw (a quarter of the draws)
        objects = sample_scene(rng, 2)
        if objects[0].col != objects[1].col:
            break
    left, right = sorted(objects, key=lambda o: o.col)
    subject, reference = (left, right) if answer == "left" else (right, left)
    question = pick(rng, RELATION_QUESTIONS).format(a=subject.colour, b=reference.colour)
    return Sample(render_scene(objects, image_size), question, answer)


TASKS: tuple[TaskDef, ...] = (
    TaskDef("position", 20, "exact_match", "Name the quadrant (top left ... bottom right) of the one shape of "
            "a named colour on the 4x4 grid.", synthetic(position_sample)),
    TaskDef("counting", 21, "vqa", "Count the shapes of a named kind (0-3) in a scene of 1-4 shapes.",
            synthetic(counting_sample)),
    TaskDef("parity", 22, "multiple_choice", "Two-option question: is a real handwritten digit (scikit-learn, "
            "8x8 upscaled) even or odd; answer the letter.", generate_parity),
    TaskDef("spelling", 23, "exact_match", "Give the first letter of one printed word.", generate_spelling),
    TaskDef("relation", 24, "exact_match", "Say whether the shape of one named colour is left or right of the "
            "shape of another.", synthetic(relation_sample)),
)
