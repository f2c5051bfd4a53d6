"""seq5: five continual instruction-tuning tasks modelled on CoIN's task types, small enough for CPU.

In training order (``TASKS``):

=========== ======================= ================= =====================================
task        modelled on (CoIN)      metric            answer
=========== ======================= ================= =====================================
digits      ImageNet classification contains          "7"
scienceqa   ScienceQA               multiple_choice   "C"
vqa         VQAv2 / GQA             vqa               "3", "red", "circle"
ocr         OCR-VQA / TextVQA       vqa               "fish"
grounding   Grounding (RefCOCO)     iou               "[0.25, 0.50, 0.50, 0.75]"
=========== ======================= ================= =====================================

Every task draws its instruction from ≥3 paraphrases per sample and has its own answer format. The
visual skills (colour, shape, position, digits, letters) are the ones ``pretrain`` teaches, so each task
is mostly a new *format* for known skills, as CoIN's tasks are for a pretrained LLaVA.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Iterator

import numpy as np

from lvlm_cl.benchmarks import GenerationRequest, Sample, TaskDef, per_split, pick, synthetic
from lvlm_cl.benchmarks.render import (PALETTE, SHAPES, TEXT_COLOURS, cell_box, fit_font_size, format_box, render_scene,
                                       render_sklearn_digit, render_text, sample_scene)

DEFAULT_TRAIN_SIZE = 1200
DEFAULT_TEST_SIZE = 250

# LLaVA-1.5's answer-format suffixes (its ScienceQA and VQAv2/TextVQA prompts).
MULTIPLE_CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
OPTION_LETTERS = "ABCD"

# The four options of each scienceqa question type, in their fixed order (see scienceqa_sample).
SCIENCEQA_OPTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow"),
    "shape": ("circle", "square", "triangle", "cross"),
}

# 12 common 3-letter words: no colour, shape or number words, disjoint from pretrain's list.
OCR_WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "car", "bus", "hat", "cup", "box", "key", "pen", "map", "egg",
)
# The OCR font is the largest size ≤ this fraction of the image at which every word fits the width
# with a margin (32 px → size 10, widest word 26 px). Jitter: at most this fraction of the image.
OCR_MAX_FONT_FRACTION = 0.45
OCR_MAX_JITTER_FRACTION = 1 / 16
VQA_OBJECT_COUNTS = (1, 2, 3, 4)
GROUNDING_OBJECT_COUNTS = (1,)
GROUNDING_GRID = 2  # grounding scenes: a quadrant layout
DIGITS_PARTITION_STREAM = 3  # the train/test partition of sklearn's digits has its own random stream

DIGIT_QUESTIONS = (
    "What digit is shown in the image?",
    "Which handwritten digit is this?",
    "Identify the number written in this picture.",
    "What number between 0 and 9 is drawn here?",
)
SCIENCEQA_QUESTIONS = {
    "colour": (
        "What is the color of the shape in the image?",
        "Which color is the object shown?",
        "What color does the figure in this picture have?",
    ),
    "shape": (
        "What is the shape of the object in the image?",
        "Which shape is shown?",
        "What kind of figure is drawn in this picture?",
    ),
}
VQA_QUESTIONS = {
    "count": (
        "How many shapes are there?",
        "How many objects are in the image?",
        "Count the shapes in this picture.",
    ),
    "colour_of_shape": (
        "What color is the {shape}?",
        "Which color does the {shape} have?",
        "What is the color of the {shape}?",
    ),
    "shape_of_colour": (
        "What shape is the {colour} object?",
        "Which shape is {colour}?",
        "What is the shape of the {colour} object?",
    ),
}
OCR_QUESTIONS = (
    "What word is written in the image?",
    "Read the text in the image.",
    "What does the text in this image say?",
)
GROUNDING_QUESTIONS = (
    "Give the bounding box of the {colour} shape.",
    "Where is the {colour} object? Answer with a bounding box.",
    "Locate the {colour} shape and output its box coordinates.",
)


# --- digits -------------------------------------------------------------------------------------

def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All indices, each class shuffled, then interleaved class by class: every prefix is stratified."""
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    longest = max(len(p) for p in per_class)
    return np.array([int(p[r]) for r in range(longest) for p in per_class if r < len(p)])


def digit_splits(request: GenerationRequest, task: str, stream: int) -> tuple[object, dict[str, np.ndarray]]:
    """scikit-learn's 1797 real handwritten digits and each split's indices into them, stratified by digit
    (from the partition generator ``stream``); train capped by what is left. Used by seq5's digits,
    heldout5's parity and heldout5b's digit_size."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    if request.test_size >= len(data.target):
        raise ValueError(f"{task} has {len(data.target)} images; test_size {request.test_size} leaves "
                         "none for training")
    partition = request.rng(stream)
    order = stratified_order(data.target, partition)
    return data, {
        "test": order[:request.test_size],
        # A prefix of the interleaved order is stratified; shuffle it so classes do not come round-robin.
        "train": partition.permutation(order[request.test_size:request.test_size + request.train_size]),
    }


def digit_task(request: GenerationRequest, task: str, stream: int, question: Callable[[np.random.Generator], str],
               answer: Callable[[int], str]) -> dict[str, Iterator[Sample]]:
    """A task on scikit-learn's handwritten digits (``digit_splits``): per split, each digit's image with
    ``question(rng)`` (the split's generator) and ``answer(digit)``."""
    data, split_indices = digit_splits(request, task, stream)

    def draw(indices: np.ndarray, rng: np.random.Generator) -> Iterator[Sample]:
        for i in indices:
            yield Sample(render_sklearn_digit(data.images[i], request.image_size), question(rng),
                         answer(int(data.target[i])))
    return {split: draw(idx, request.split_rng(split)) for split, idx in split_indices.items()}


def generate_digits(request: GenerationRequest) -> dict[str, Iterator[Sample]]:
    """scikit-learn's 1797 real handwritten digits, split stratified; train capped by what is left."""
    return digit_task(request, "digits", DIGITS_PARTITION_STREAM, partial(pick, options=DIGIT_QUESTIONS), str)


# --- scienceqa ----------------------------------------------------------------------------------

def multiple_choice(question: str, options: tuple[str, ...], letters: str = OPTION_LETTERS) -> str:
    """LLaVA's multiple-choice prompt: the question, one "A. option" line per option, then the suffix."""
    if len(options) > len(letters):
        raise ValueError(f"{len(options)} options but only the letters {letters!r}")
    return "\n".join([question, *(f"{letter}. {value}" for letter, value in zip(letters, options)),
                      MULTIPLE_CHOICE_SUFFIX])


def scienceqa_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """One coloured shape; a 4-option question about its colour or its shape; answer = the letter.

    The options of a question type are always the same four values in the same order
    (``SCIENCEQA_OPTIONS``), so the letter stands for a value. Options in a random order per sample would
    need the model to look the image's value up among the option lines: measured, the tiny model stays at
    chance on that after 600 steps at 2 and 4 layers, so it would only measure the model's size.
    """
    attribute = pick(rng, ("colour", "shape"))
    options = SCIENCEQA_OPTIONS[attribute]
    correct = pick(rng, options)
    obj = sample_scene(rng, 1)[0]
    obj = dataclasses.replace(obj, **{attribute: correct})
    question = multiple_choice(pick(rng, SCIENCEQA_QUESTIONS[attribute]), options)
    return Sample(render_scene([obj], image_size), question, OPTION_LETTERS[options.index(correct)])


# --- vqa ----------------------------------------------------------------------------------------

def vqa_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """A scene of 1–4 shapes; a count, colour-of-shape or shape-of-colour question (uniformly)."""
    kind = pick(rng, tuple(VQA_QUESTIONS))
    while True:  # a colour-of-shape question needs a shape that occurs once: redraw the rare misses
        objects = sample_scene(rng, pick(rng, VQA_OBJECT_COUNTS))
        if kind == "count":
            question, answer = pick(rng, VQA_QUESTIONS[kind]), str(len(objects))
        elif kind == "colour_of_shape":
            shapes = [o.shape for o in objects]
            unique = [o for o in objects if shapes.count(o.shape) == 1]
            if not unique:
                continue
            target = pick(rng, unique)
            question, answer = pick(rng, VQA_QUESTIONS[kind]).format(shape=target.shape), target.colour
        else:
            target = pick(rng, objects)  # colours are distinct within a scene
            question, answer = pick(rng, VQA_QUESTIONS[kind]).format(colour=target.colour), target.shape
        return Sample(render_scene(objects, image_size), f"{question}\n{SHORT_ANSWER_SUFFIX}", answer)


# --- ocr ----------------------------------------------------------------------------------------

def ocr_font_size(image_size: int) -> int:
    """The one font size for every OCR word at this image size (largest that fits with a margin)."""
    return fit_font_size(OCR_WORDS, image_size, max_size=round(image_size * OCR_MAX_FONT_FRACTION))


def ocr_sample(rng: np.random.Generator, image_size: int, font_size: int) -> Sample:
    """One word from ``OCR_WORDS`` in a dark colour, slightly jittered; answer = the word."""
    word = pick(rng, OCR_WORDS)
    colour = pick(rng, TEXT_COLOURS)
    jitter = max(1, round(image_size * OCR_MAX_JITTER_FRACTION))
    image = render_text(word, image_size, font_size, colour, rng, max_jitter=jitter)
    return Sample(image, f"{pick(rng, OCR_QUESTIONS)}\n{SHORT_ANSWER_SUFFIX}", word)


def generate_ocr(request: GenerationRequest) -> dict[str, Iterator[Sample]]:
    size = ocr_font_size(request.image_size)
    return per_split(request, partial(ocr_sample, image_size=request.image_size, font_size=size))


# --- grounding ----------------------------------------------------------------------------------

def grounding_sample(rng: np.random.Generator, image_size: int) -> Sample:
    """One shape filling one quadrant; answer = its normalised box.

    Measured on the tiny model (375 steps, alone): one shape on quadrants 100%; one shape on the 4 × 4
    grid 70.8%; 2–3 shapes of distinct colours on quadrants 36% (34% after 750 steps) and on the 4 × 4
    grid 12%: binding a colour to a position among distractors is beyond it, so the task is localisation.
    """
    objects = sample_scene(rng, pick(rng, GROUNDING_OBJECT_COUNTS), grid=GROUNDING_GRID)
    target = pick(rng, objects)
    question = pick(rng, GROUNDING_QUESTIONS).format(colour=target.colour)
    return Sample(render_scene(objects, image_size, grid=GROUNDING_GRID), question,
                  format_box(cell_box(target.row, target.col, grid=GROUNDING_GRID)))


TASKS: tuple[TaskDef, ...] = (
    TaskDef("digits", 0, "contains", "Classify real handwritten digits (scikit-learn, 8x8 upscaled); "
            "answer the numeral. Modelled on CoIN's ImageNet.", generate_digits),
    TaskDef("scienceqa", 1, "multiple_choice", "Four-option question about the colour or shape of one "
            "object; answer the letter. Modelled on CoIN's ScienceQA.", synthetic(scienceqa_sample)),
    TaskDef("vqa", 2, "vqa", "Short-answer questions about a scene of 1-4 shapes: count, colour, shape. "
            "Modelled on CoIN's VQAv2/GQA.", synthetic(vqa_sample)),
    TaskDef("ocr", 3, "vqa", "Read one printed word; answer it in lower case. Modelled on CoIN's "
            "OCR-VQA/TextVQA.", generate_ocr),
    TaskDef("grounding", 4, "iou", "Output the normalised bounding box of the object of a named colour. "
            "Modelled on CoIN's Grounding.", synthetic(grounding_sample)),
)
