"""heldout5c: a third held-out user sequence of five tasks, the same size as seq5, kept aside for a final check.

Nobody tunes on it, and nobody diagnoses with it; it is first run only once the recipe's settings are fixed,
and nothing is changed from its scores. heldout5b was built for the same purpose and first run once the seed
method's settings were fixed (issue 23: 20 epochs per task, scores in docs/results.md), but the seed method did
not learn its ``exists`` task, and heldout5b became a development sequence so that ``exists`` could be diagnosed
(as heldout5's ``position`` was before; see docs/benchmarks.md, "heldout5b: a second held-out sequence, now a
development sequence"). heldout5c was built then, so that a sequence nobody has looked at remains: it checks that
a continual-learning method tuned on seq5 (and fixed with heldout5's and heldout5b's help) still works on new
instruction formats it was never tuned on. Never use it to choose a method or a hyper-parameter, nor to diagnose
one (that would make it one more tuning set). It was first run once the seed method's learning rate was fixed
(lr 5e-4); docs/results.md reports the methods on it.

In training order (``TASKS``), each as metric: example question -> answer:

- ``twice`` (exact_match): "Which kind of shape is drawn twice?" -> "square" (3–4 shapes of distinct colours;
  exactly one kind appears twice, every other kind at most once).
- ``column`` (multiple_choice): "Counting from the left, in which column of the grid is the red shape?" +
  "A. column 1" .. "D. column 4" + LLaVA's multiple-choice suffix -> "A" .. "D" (one shape on the 4 × 4 grid).
- ``word_length`` (vqa): "How many letters does the word have?" -> "4" / "5" (one printed word).
- ``digit_word`` (exact_match): "Write the handwritten digit as a word." -> "seven" (a real scikit-learn digit).
- ``same_colour`` (exact_match): "Are the two shapes the same colour?" -> "yes" / "no" (two shapes).

Like seq5's, heldout5's and heldout5b's, every task picks its instruction from 3–4 paraphrases per sample, and
each is a new format for a skill the pretrained tiny model has (``pretrain``: colour, shape, position, words and
their letters, printed digits; the digits here are handwritten, which seq5's digits task also brings in). Each
task has its own answer format: a shape name, an option letter, a numeral, a number word and yes / no.
``digit_word`` is scored by exact match because vqa's normalisation reads "seven" as "7": the numeral, seq5's
digits answer, is wrong here. No instruction is a seq5, heldout5, heldout5b or pretrain one (a test checks it,
reading "colour" and "color" as one word), and no task asks one of their questions in new words, which set
three nearer formats aside: the shape of a named colour is seq5's vqa question ("What shape is the {colour}
object?"), so ``twice`` asks for the kind that is drawn twice; left or right half is heldout5b's ``row`` turned
on its side, so ``column`` asks for one of the four columns, numbered as pretrain numbers them ("row 2, column
3"); and four digit options in a new order per sample would need the model to look its answer up among the
option lines, which the tiny model did not learn on seq5's scienceqa (see seq5.scienceqa_sample), so the digit
task answers the digit's name (``digit_word``). Answers are balanced: the answer class is drawn uniformly
(digit_word: a digit split stratified by class) and the scene made to fit it, and no scene is ambiguous (twice:
one kind twice, none more often; same_colour: exactly two shapes). Task ids 40–44 share no random stream with
seq5 (0–4), pretrain (10–11), heldout5 (20–24) or heldout5b (30–34). The default sizes match seq5's: 1200 train
/ 250 test.
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

# twice: the answer kind is drawn uniformly and drawn on exactly two shapes; the other 1–2 shapes are of other,
# distinct kinds. Colours are all distinct (sample_scene), so colour gives no hint of which two are alike.
TWICE_OBJECT_COUNTS: tuple[int, ...] = (3, 4)
# column: the column of the 4 × 4 grid the one shape is in, counted from the left as pretrain's "column 3" is;
# the options always in this order (see seq5.scienceqa_sample for why not shuffled).
COLUMN_OPTIONS: tuple[str, ...] = tuple(f"column {c + 1}" for c in range(GRID))
OPTION_LETTERS = "ABCD"
# word_length: pretrain's 40 words have 4 or 5 letters; the length is drawn uniformly, then a word of it.
WORD_LENGTHS: tuple[int, ...] = tuple(sorted({len(w) for w in WORDS}))
# digit_word: the digit's English name (exact match: vqa's normalisation would read "seven" as "7").
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_WORD_PARTITION_STREAM = 3  # the train/test partition of sklearn's digits has its own random stream
# same_colour: the answer is drawn uniformly, then two shapes of one colour (yes) or of two colours (no).
YES_NO: tuple[str, ...] = ("yes", "no")
COLOURS: tuple[str, ...] = tuple(PALETTE)

TWICE_QUESTIONS = (
    "Which kind of shape is drawn twice?",
    "Two of the shapes are of the same kind. Which kind is it?",
    "Name the shape that appears two times in the picture.",
    "Which shape occurs twice in this image?",
)
COLUMN_QUESTIONS = (
    "Counting from the left, in which column of the grid is the {colour} shape?",
    "Which column, counted from the left, holds the {colour} object?",
    "In which column is the {colour} shape, numbering the columns from the left?",
)
WORD_LENGTH_QUESTIONS = (
    "How many letters does the word have?",
    "Count the letters of the written word.",
    "What is the length of the word in the image, in letters?",
    "The word in the picture is how many letters long?",
)
DIGIT_WORD_QUESTIONS = (
    "Write the handwritten digit as a word.",
    "Which handwritten number is shown? Answer with its English name.",
    "Name the handwritten digit in words.",
    "What is this handwritten number, written out as a word?",
)
SAME_COLOUR_QUESTIONS = (
    "Are the two shapes the same colour?",
    "Do both objects have the same colour?",
    "Is the colour of one shape the same as the colour of the other?",
    "Answer yes or no: are both shapes painted in one colour?",
)


# --- twice ---------------------------------------------------------------------------------------

def twice_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """3–4 shapes of distinct colours: two of the answer kind (uniform in ``SHAPES``), the others of distinct other
    kinds, so exactly one kind appears twice."""
    answer = pick(rng, SHAPES)
    objects = sample_scene(rng, pick(rng, TWICE_OBJECT_COUNTS))
    others = [s for s in SHAPES if s != answer]
    kinds = [answer, answer] + [others[int(i)] for i in rng.choice(len(others), size=len(objects) - 2, replace=False)]
    kinds = [kinds[int(i)] for i in rng.permutation(len(kinds))]
    objects = [dataclasses.replace(o, shape=k) for o, k in zip(objects, kinds)]
    return Sample(render_scene(objects, image_size), pick(rng, TWICE_QUESTIONS), answer)


# --- column --------------------------------------------------------------------------------------

def column_question(rng: np.random.Generator, colour: str) -> str:
    return multiple_choice(pick(rng, COLUMN_QUESTIONS).format(colour=colour), COLUMN_OPTIONS, OPTION_LETTERS)


def column_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """One shape; the column (uniform) is drawn first, then any row; answer = the column's option letter."""
    col = int(rng.integers(GRID))
    obj = dataclasses.replace(sample_scene(rng, 1)[0], col=col)
    return Sample(render_scene([obj], image_size), column_question(rng, obj.colour), OPTION_LETTERS[col])


# --- word_length ---------------------------------------------------------------------------------

def generate_word_length(request: GenerationRequest) -> dict[str, Iterator[Sample]]:
    """A word of ``pretrain.WORDS``; answer = its number of letters."""
    return word_task(request, WORD_LENGTHS, len, WORD_LENGTH_QUESTIONS)


# --- digit_word ----------------------------------------------------------------------------------

def generate_digit_word(request: GenerationRequest) -> dict[str, Iterator[Sample]]:
    """scikit-learn's handwritten digits, split stratified by digit, as seq5's digits; answer = the digit's name."""
    return digit_task(request, "digit_word", DIGIT_WORD_PARTITION_STREAM, partial(pick, options=DIGIT_WORD_QUESTIONS),
                      DIGIT_WORDS.__getitem__)


# --- same_colour ---------------------------------------------------------------------------------

def same_colour_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """Two shapes in distinct cells, of any kinds; yes: one colour, no: two colours. The answer is drawn first."""
    answer = pick(rng, YES_NO)
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=2, replace=False))
    shapes = [pick(rng, SHAPES) for _ in cells]
    if answer == "yes":
        colours = [pick(rng, COLOURS)] * 2
    else:
        colours = [COLOURS[int(i)] for i in rng.choice(len(COLOURS), size=2, replace=False)]
    objects = [SceneObject(c // GRID, c % GRID, s, col) for c, s, col in zip(cells, shapes, colours)]
    return Sample(render_scene(objects, image_size), pick(rng, SAME_COLOUR_QUESTIONS), answer)


TASKS: tuple[TaskDef, ...] = (
    TaskDef("twice", 40, "exact_match", "Name the kind of shape drawn twice in a scene of 3-4 shapes of distinct "
            "colours (every other kind at most once).", synthetic(twice_sample)),
    TaskDef("column", 41, "multiple_choice", "Four-option question: in which column, counted from the left, of the "
            "4x4 grid is the one shape of a named colour; answer the letter.", synthetic(column_sample)),
    TaskDef("word_length", 42, "vqa", "Say how many letters one printed word has.", generate_word_length),
    TaskDef("digit_word", 43, "exact_match", "Name a real handwritten digit (scikit-learn, 8x8 upscaled) in words: "
            "zero ... nine.", generate_digit_word),
    TaskDef("same_colour", 44, "exact_match", "Say yes or no: are the two shapes of a scene the same colour.",
            synthetic(same_colour_sample)),
)
