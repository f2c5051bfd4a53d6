"""pretrain: a general vision–language corpus that teaches a randomly initialised model to see.

A real LLaVA starts continual instruction tuning already able to see: its projector was aligned on
captions (stage 1) and the whole model instruction-tuned (stage 2). This corpus plays both stages for the
tiny model, on the visual skills seq5 needs (colour, shape, position, printed digits, letters) but with
none of seq5's instructions or answer formats (no option letters, no boxes, no seq5 paraphrase, a word
list disjoint from seq5's OCR words, printed rather than handwritten digits), so every seq5 task is a new
format of known skills.

Tasks, in order: ``caption`` (stage 1, exact_match) and ``instruct`` (stage 2, vqa). Both draw the same
three kinds of image: scenes of 1–4 shapes on the 4×4 grid, printed digits, rendered words.

- caption: "Describe the image." -> "a red circle and an orange cross" | "the number 7" | 'the word "lamp"'
- instruct: yes/no ("Is there a green shape in the image?", "Is there text in the image?"), listing
  ("List the colors you see." -> "red, blue"), by position ("What is in the top left corner?",
  "What is in row 2, column 3?" -> "a red circle" | "nothing"), parity of a digit ("even"/"odd") and
  spelling of a word ("l-a-m-p").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from lvlm_cl.benchmarks import GenerationRequest, Sample, TaskDef, per_split, pick
from lvlm_cl.benchmarks.render import (CORNER_NAMES, GRID, MIN_FONT_SIZE, PALETTE, SHAPES, TEXT_COLOURS, SceneObject,
                                       fit_font_size, indefinite_article, render_scene, render_text, sample_scene)

DEFAULT_TRAIN_SIZE = 4000
DEFAULT_TEST_SIZE = 200

# 40 words of 3–5 letters, disjoint from seq5.OCR_WORDS (a test checks it) and from colour/shape names.
WORDS: tuple[str, ...] = (
    "lamp", "apple", "chair", "house", "bread", "clock", "table", "horse", "glass", "spoon",
    "shoe", "boat", "kite", "rose", "leaf", "coin", "desk", "nest", "sock", "drum",
    "bike", "milk", "rain", "snow", "wind", "rock", "sand", "lion", "bear", "duck",
    "goat", "wolf", "tent", "road", "hill", "farm", "king", "rope", "pear", "corn",
)
IMAGE_KINDS = ("scene", "digit", "word")
IMAGE_KIND_WEIGHTS = (0.5, 0.25, 0.25)
SCENE_OBJECT_COUNTS = (1, 2, 3, 4)
# Printed digits: font size drawn uniformly from this fraction range of the image size.
DIGIT_FONT_FRACTION = (0.4, 0.8)
# Words: the largest font size that fits each word (≤ this fraction of the image), minus 0–2 points.
WORD_MAX_FONT_FRACTION = 0.45
WORD_FONT_SHRINK = 2
# The word tasks of the held-out sequences (``word_task``): a word is moved by up to this fraction of the image.
WORD_TASK_MAX_JITTER_FRACTION = 1 / 16

CAPTION_QUESTIONS = ("Describe the image.", "Write a short caption.", "What is in this picture?")
INSTRUCT_QUESTIONS = {
    "has_colour": ("Is there {a} {colour} shape in the image?", "Do you see anything {colour}?",
                   "Does the image contain {a} {colour} object?"),
    "has_shape": ("Is there a {shape} in the image?", "Do you see a {shape}?",
                  "Does the image contain a {shape}?"),
    "has_text": ("Is there text in the image?", "Does the image contain any writing?",
                 "Is anything written in this picture?"),
    "has_number": ("Is there a number in this image?", "Does the image show a number?",
                   "Can you see a number in the picture?"),
    "is_number": ("Is the number {digit} shown in the image?", "Does the picture show the number {digit}?"),
    "is_word": ('Is the word "{word}" written in the image?', 'Does the picture say "{word}"?'),
    "parity": ("Is the number shown even or odd?", "Is the number in the image odd or even?",
               "Tell me whether the number in the picture is even or odd."),
    "spell": ("Spell the word in the image.", "Spell out the written text letter by letter.",
              "Which letters are written in the picture, in order?"),
    "list_colours": ("List the colors you see.", "Which colors appear in the image?",
                     "Name all the colors in the picture."),
    "list_shapes": ("List the shapes you see.", "Which shapes appear in the image?",
                    "Name all the shapes in the picture."),
    "corner": ("What is in the {corner} corner?", "What do you see in the {corner} corner?",
               "What is in the {corner} corner of the image?"),
    "cell": ("What is in row {row}, column {col}?", "What do you see at row {row}, column {col}?",
             "What is at row {row}, column {col} of the grid?"),
}
# Which instruct questions make sense for which kind of image, with their relative weights. Scenes
# favour the questions that teach position and listing (the skills grounding and vqa build on) over the
# trivial "no" of has_text / has_number.
INSTRUCT_TYPES = {
    "scene": {"has_colour": 2, "has_shape": 2, "has_text": 1, "has_number": 1, "list_colours": 2,
              "list_shapes": 1, "corner": 2, "cell": 3},
    "digit": {"has_number": 1, "is_number": 2, "parity": 2},
    "word": {"has_text": 1, "has_number": 1, "is_word": 2, "spell": 2},
}


@dataclass(frozen=True)
class Picture:
    """A generated image and what it shows (exactly one of objects / digit / word is set)."""

    image: Image.Image
    kind: str
    objects: tuple[SceneObject, ...] = ()
    digit: int | None = None
    word: str | None = None


def word_font_sizes(image_size: int) -> dict[str, int]:
    """The largest fitting font size per word at this image size (computed once per generation)."""
    cap = round(image_size * WORD_MAX_FONT_FRACTION)
    return {w: fit_font_size([w], image_size, max_size=cap) for w in WORDS}


def word_task(request: GenerationRequest, classes: tuple, key: Callable[[str], object], questions: tuple[str, ...],
              answer: Callable[[object], str] = str) -> dict[str, Iterator[Sample]]:
    """A task on one printed word of ``WORDS`` (heldout5's spelling, heldout5b's last_letter, heldout5c's
    word_length): the class is drawn uniformly from ``classes``, then a word whose ``key(word)`` is that class,
    rendered at its largest fitting size in a random text colour, jittered by up to ``WORD_TASK_MAX_JITTER_FRACTION``
    of the image; the answer is ``answer(class)``."""
    sizes = word_font_sizes(request.image_size)
    jitter = max(1, round(request.image_size * WORD_TASK_MAX_JITTER_FRACTION))

    def sample(rng: np.random.Generator) -> Sample:
        value = pick(rng, classes)
        word = pick(rng, tuple(w for w in WORDS if key(w) == value))
        image = render_text(word, request.image_size, sizes[word], pick(rng, TEXT_COLOURS), rng, max_jitter=jitter)
        return Sample(image, pick(rng, questions), answer(value))
    return per_split(request, sample)


def sample_picture(rng: np.random.Generator, image_size: int, word_sizes: dict[str, int]) -> Picture:
    """A scene, a printed digit or a rendered word, in ``IMAGE_KIND_WEIGHTS`` proportions."""
    kind = IMAGE_KINDS[int(rng.choice(len(IMAGE_KINDS), p=IMAGE_KIND_WEIGHTS))]
    if kind == "scene":
        objects = tuple(sample_scene(rng, pick(rng, SCENE_OBJECT_COUNTS)))
        return Picture(render_scene(objects, image_size), kind, objects=objects)
    colour = pick(rng, TEXT_COLOURS)
    if kind == "digit":
        digit = int(rng.integers(10))
        lo, hi = (round(image_size * f) for f in DIGIT_FONT_FRACTION)
        size = int(rng.integers(lo, hi + 1))
        return Picture(render_text(str(digit), image_size, size, colour, rng), kind, digit=digit)
    word = pick(rng, WORDS)
    fit = word_sizes[word]
    size = int(rng.integers(max(MIN_FONT_SIZE, fit - WORD_FONT_SHRINK), fit + 1))
    return Picture(render_text(word, image_size, size, colour, rng), kind, word=word)


def describe_objects(objects: tuple[SceneObject, ...]) -> str:
    """``"a red circle, a blue square and a green cross"`` (row-major order, as drawn)."""
    phrases = [o.phrase() for o in objects]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(picture: Picture) -> str:
    if picture.kind == "scene":
        return describe_objects(picture.objects)
    if picture.kind == "digit":
        return f"the number {picture.digit}"
    return f'the word "{picture.word}"'


def caption_sample(rng: np.random.Generator, image_size: int, word_sizes: dict[str, int]) -> Sample:
    picture = sample_picture(rng, image_size, word_sizes)
    return Sample(picture.image, pick(rng, CAPTION_QUESTIONS), caption(picture))


def instruct_sample(rng: np.random.Generator, image_size: int, word_sizes: dict[str, int]) -> Sample:
    picture = sample_picture(rng, image_size, word_sizes)
    types = INSTRUCT_TYPES[picture.kind]
    weights = np.array(list(types.values()), dtype=float)
    kind = list(types)[int(rng.choice(len(types), p=weights / weights.sum()))]
    question, answer = _INSTRUCT_BUILDERS[kind](rng, picture)
    return Sample(picture.image, question, answer)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _ask(rng: np.random.Generator, kind: str, **fields) -> str:
    return pick(rng, INSTRUCT_QUESTIONS[kind]).format(**fields)


def _present_or_absent(rng: np.random.Generator, present: list, universe) -> tuple[object, bool]:
    """Half the time a value that is present (when any), else one that is absent: balanced yes/no."""
    absent = [v for v in universe if v not in present]
    if present and (not absent or rng.random() < 0.5):
        return pick(rng, present), True
    return pick(rng, absent), False


def _has_colour(rng, picture):
    colour, present = _present_or_absent(rng, [o.colour for o in picture.objects], list(PALETTE))
    return _ask(rng, "has_colour", a=indefinite_article(colour), colour=colour), _yes_no(present)


def _has_shape(rng, picture):
    shape, present = _present_or_absent(rng, sorted({o.shape for o in picture.objects}), SHAPES)
    return _ask(rng, "has_shape", shape=shape), _yes_no(present)


def _has_text(rng, picture):
    return _ask(rng, "has_text"), _yes_no(picture.kind == "word")


def _has_number(rng, picture):
    return _ask(rng, "has_number"), _yes_no(picture.kind == "digit")


def _is_number(rng, picture):
    digit, present = _present_or_absent(rng, [picture.digit], range(10))
    return _ask(rng, "is_number", digit=digit), _yes_no(present)


def _is_word(rng, picture):
    word, present = _present_or_absent(rng, [picture.word], WORDS)
    return _ask(rng, "is_word", word=word), _yes_no(present)


def _parity(rng, picture):
    return _ask(rng, "parity"), "even" if picture.digit % 2 == 0 else "odd"


def _spell(rng, picture):
    return _ask(rng, "spell"), "-".join(picture.word)  # "l-a-m-p": letters, not seq5's whole-word answer


def _list_colours(rng, picture):
    return _ask(rng, "list_colours"), ", ".join(o.colour for o in picture.objects)


def _list_shapes(rng, picture):
    shapes = list(dict.fromkeys(o.shape for o in picture.objects))  # first appearance, row-major
    return _ask(rng, "list_shapes"), ", ".join(shapes)


def _at_cell(picture: Picture, row: int, col: int) -> str:
    found = [o for o in picture.objects if (o.row, o.col) == (row, col)]
    return found[0].phrase() if found else "nothing"


def _choose_cell(rng, picture, cells: list[tuple[int, int]]) -> tuple[int, int]:
    occupied = [(o.row, o.col) for o in picture.objects if (o.row, o.col) in cells]
    cell, _ = _present_or_absent(rng, occupied, cells)  # "nothing" must not dominate the answers
    return cell


def _corner(rng, picture):
    row, col = _choose_cell(rng, picture, list(CORNER_NAMES))
    return _ask(rng, "corner", corner=CORNER_NAMES[(row, col)]), _at_cell(picture, row, col)


def _cell(rng, picture):
    row, col = _choose_cell(rng, picture, [(r, c) for r in range(GRID) for c in range(GRID)])
    return _ask(rng, "cell", row=row + 1, col=col + 1), _at_cell(picture, row, col)


_INSTRUCT_BUILDERS: dict[str, Callable[[np.random.Generator, Picture], tuple[str, str]]] = {
    "has_colour": _has_colour, "has_shape": _has_shape, "has_text": _has_text, "has_number": _has_number,
    "is_number": _is_number, "is_word": _is_word, "parity": _parity, "spell": _spell,
    "list_colours": _list_colours,
    "list_shapes": _list_shapes, "corner": _corner, "cell": _cell,
}


def _with_word_sizes(sample: Callable[..., Sample]
                     ) -> Callable[[GenerationRequest], dict[str, Iterator[Sample]]]:
    def generate(request: GenerationRequest) -> dict[str, Iterator[Sample]]:
        sizes = word_font_sizes(request.image_size)
        return per_split(request, partial(sample, image_size=request.image_size, word_sizes=sizes))
    return generate


TASKS: tuple[TaskDef, ...] = (
    TaskDef("caption", 10, "exact_match", "Stage-1 alignment: caption scenes of shapes, printed digits "
            "and rendered words.", _with_word_sizes(caption_sample)),
    TaskDef("instruct", 11, "vqa", "Stage-2 instruction tuning: yes/no, listing, by-position, parity and "
            "spelling questions about the same kinds of image.", _with_word_sizes(instruct_sample)),
)
