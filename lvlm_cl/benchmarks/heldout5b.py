"""heldout5b: a second user sequence of five tasks, the same size as seq5, built to be kept aside, now for development.

It was first run once the seed method's settings of then were fixed (issue 23: 20 epochs per task, scores in
docs/results.md). heldout5 was built for the same purpose, but its ``position`` task was used to diagnose why the
seed method learned less there, so heldout5b was built after that, so that a sequence nobody had looked at
remained. The seed method then did not learn heldout5b's ``exists`` task, and heldout5b became a development
sequence in turn (``exists`` was trained alone to find why; the recipe's learning rate changed from it: see
docs/benchmarks.md#heldout5b-a-second-held-out-sequence-now-a-development-sequence). ``heldout5c`` was built
before that diagnosis and is the held-out check now.

In training order (``TASKS``), each as metric: example question -> answer:

- ``colour`` (exact_match): "Name the colour of the triangle." -> "purple" (2–3 shapes, all of distinct
  kinds and distinct colours).
- ``row`` (multiple_choice): "Is the red shape in the top half or the bottom half of the image?" +
  "A. top" / "B. bottom" + LLaVA's multiple-choice suffix -> "A" / "B" (one shape on the 4 × 4 grid).
- ``last_letter`` (exact_match): "What is the last letter of the word?" -> "p" (one printed word).
- ``digit_size`` (vqa): "Is this handwritten digit greater than four?" -> "yes" / "no" (a real scikit-learn
  digit: 5–9 yes, 0–4 no).
- ``exists`` (exact_match): "Is any of the shapes in this picture a circle?" -> "yes" / "no" (1–3 shapes).

Like seq5's and heldout5's, every task picks its instruction from 3–4 paraphrases per sample, and each is a
new format for a skill the pretrained tiny model has (``pretrain``: colour, shape, position, words and their
letters, printed digits; the digits here are handwritten, which seq5's digits task also brings in). The
answer formats are a colour name, an option letter, a single letter and yes / no: ``digit_size`` and
``exists`` share yes / no, so a later task answers in an earlier one's words. No instruction is a seq5,
heldout5 or pretrain one (a test checks it, reading "colour" and "color" as one word): pretrain asks "Is
there a {shape} in the image?", so ``exists`` words it otherwise, and seq5's vqa asks "What color is the
{shape}?", so ``colour`` words that otherwise too. Answers are balanced: the answer class is drawn uniformly
(digit_size: a digit split stratified by class, five classes each side) and the scene made to fit it, and no
scene is ambiguous (colour's shapes are all of distinct kinds, so "the triangle" is one shape). Task ids
30–34 share no random stream with seq5 (0–4), pretrain (10–11) or heldout5 (20–24). The default sizes match
seq5's: 1200 train / 250 test.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Iterator

import numpy as np

from lvlm_cl.benchmarks import GenerationRequest, Sample, TaskDef, pick, synthetic
from lvlm_cl.benchmarks.pretrain import WORDS, word_task
from lvlm_cl.benchmarks.render import GRID, PALETTE, SHAPES, SceneObject, render_scene, sample_scene
from lvlm_cl.benchmarks.seq5 import digit_task, multiple_choice

DEFAULT_TRAIN_SIZE = 1200
DEFAULT_TEST_SIZE = 250

# colour: the answer is one of the palette's six names, drawn uniformly; the scene has 2–3 shapes of
# distinct kinds (so the asked shape is unique) and distinct colours.
COLOURS: tuple[str, ...] = tuple(PALETTE)
COLOUR_OBJECT_COUNTS: tuple[int, ...] = (2, 3)
# row: the half of the 4 × 4 grid the one shape is in (rows 0–1 top); the options always in this order.
HALVES: tuple[str, ...] = ("top", "bottom")
OPTION_LETTERS = "AB"
# last_letter: pretrain's 40 words; the answer is drawn uniformly among their last letters, then a word
# ending with it.
LAST_LETTERS: tuple[str, ...] = tuple(sorted({w[-1] for w in WORDS}))
# digit_size: is the handwritten digit greater than SIZE_THRESHOLD (5–9 yes, 0–4 no).
SIZE_THRESHOLD = 4
DIGIT_SIZE_PARTITION_STREAM = 3  # the train/test partition of sklearn's digits has its own random stream
# exists: the answer is drawn uniformly, then a scene of 1–3 shapes with (yes) or without (no) the asked kind.
YES_NO: tuple[str, ...] = ("yes", "no")
EXISTS_OBJECT_COUNTS: tuple[int, ...] = (1, 2, 3)

COLOUR_QUESTIONS = (
    "Name the colour of the {shape}.",
    "Which colour is the {shape} painted in?",
    "The {shape} is drawn in which colour?",
    "Tell me the colour of the {shape} in this picture.",
)
ROW_QUESTIONS = (
    "Is the {colour} shape in the top half or the bottom half of the image?",
    "Is the {colour} object in the upper half or the lower half of the picture?",
    "Which half of the image is the {colour} shape in, top or bottom?",
)
LAST_LETTER_QUESTIONS = (
    "What is the last letter of the word?",
    "Which letter does the word in the image end with?",
    "Give the final letter of the written word.",
    "The word in the picture ends in which letter?",
)
DIGIT_SIZE_QUESTIONS = (
    "Is this handwritten digit greater than four?",
    "Is the number written in the image larger than 4?",
    "Is the handwritten number bigger than four?",
)
EXISTS_QUESTIONS = (
    "Is any of the shapes in this picture a {shape}?",
    "Can a {shape} be found among the shapes drawn here?",
    "Answer yes or no: is at least one {shape} drawn in the image?",
)


def half(row: int) -> str:
    """``"top"`` for rows 0–1 of the 4 × 4 grid, ``"bottom"`` for rows 2–3 (``GRID`` is even)."""
    return "top" if row < GRID // 2 else "bottom"


# --- colour --------------------------------------------------------------------------------------

def colour_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """2–3 shapes of distinct kinds and colours; the asked one has the answer colour (uniform in ``COLOURS``)."""
    answer = pick(rng, COLOURS)
    n = pick(rng, COLOUR_OBJECT_COUNTS)
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=n, replace=False))
    shapes = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=n, replace=False)]
    others = [c for c in COLOURS if c != answer]
    colours = [others[int(i)] for i in rng.choice(len(others), size=n, replace=False)]
    target = int(rng.integers(n))
    colours[target] = answer
    objects = [SceneObject(c // GRID, c % GRID, s, col) for c, s, col in zip(cells, shapes, colours)]
    question = pick(rng, COLOUR_QUESTIONS).format(shape=shapes[target])
    return Sample(render_scene(objects, image_size), question, answer)


# --- row -----------------------------------------------------------------------------------------

def row_question(rng: np.random.Generator, colour: str) -> str:
    return multiple_choice(pick(rng, ROW_QUESTIONS).format(colour=colour), HALVES, OPTION_LETTERS)


def row_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """One shape; the half (uniform) is drawn first, then a row in it; answer = the half's option letter."""
    answer = pick(rng, HALVES)
    rows_in_half = GRID // 2
    row = int(rng.integers(rows_in_half)) + (0 if answer == "top" else rows_in_half)
    obj = dataclasses.replace(sample_scene(rng, 1)[0], row=row)
    return Sample(render_scene([obj], image_size), row_question(rng, obj.colour),
                  OPTION_LETTERS[HALVES.index(answer)])


# --- last_letter ---------------------------------------------------------------------------------

def generate_last_letter(request: GenerationRequest) -> dict[str, Iterator[Sample]]:
    """A word of ``pretrain.WORDS``; answer = its last letter."""
    return word_task(request, LAST_LETTERS, lambda word: word[-1], LAST_LETTER_QUESTIONS)


# --- digit_size ----------------------------------------------------------------------------------

def generate_digit_size(request: GenerationRequest) -> dict[str, Iterator[Sample]]:
    """scikit-learn's handwritten digits, split stratified by digit (so yes/no balanced), as seq5's digits."""
    return digit_task(request, "digit_size", DIGIT_SIZE_PARTITION_STREAM, partial(pick, options=DIGIT_SIZE_QUESTIONS),
                      lambda digit: "yes" if digit > SIZE_THRESHOLD else "no")


# --- exists --------------------------------------------------------------------------------------

def exists_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """1–3 shapes; yes: at least one is the asked kind; no: none is. The answer is drawn uniformly first."""
    answer = pick(rng, YES_NO)
    target = pick(rng, SHAPES)
    others = tuple(s for s in SHAPES if s != target)
    objects = sample_scene(rng, pick(rng, EXISTS_OBJECT_COUNTS))
    if answer == "yes":
        forced = int(rng.integers(len(objects)))  # the others keep their uniformly drawn kind
        objects = [dataclasses.replace(o, shape=target) if i == forced else o for i, o in enumerate(objects)]
    else:
        objects = [dataclasses.replace(o, shape=pick(rng, others)) for o in objects]
    question = pick(rng, EXISTS_QUESTIONS).format(shape=target)
    return Sample(render_scene(objects, image_size), question, answer)


TASKS: tuple[TaskDef, ...] = (
    TaskDef("colour", 30, "exact_match", "Name the colour of the shape of a named kind in a scene of 2-3 "
            "shapes of distinct kinds and colours.", synthetic(colour_sample)),
    TaskDef("row", 31, "multiple_choice", "Two-option question: is the one shape of a named colour in the "
            "top or the bottom half of the 4x4 grid; answer the letter.", synthetic(row_sample)),
    TaskDef("last_letter", 32, "exact_match", "Give the last letter of one printed word.", generate_last_letter),
    TaskDef("digit_size", 33, "vqa", "Say yes or no: is a real handwritten digit (scikit-learn, 8x8 upscaled) "
            "greater than four.", generate_digit_size),
    TaskDef("exists", 34, "exact_match", "Say yes or no: is a shape of a named kind among the 1-3 shapes of a "
            "scene.", synthetic(exists_sample)),
)
