"""PIL drawing for the built-in benchmarks: shapes on a 4×4 grid, rendered text, sklearn digits.

Everything here is a pure function of its arguments (randomness comes in as a ``numpy`` Generator), so
the generators that call it are deterministic. Images are RGB, ``image_size`` × ``image_size``; the grid
cell is ``image_size / 4``, which is exactly one 8×8 vision patch at 32 px: one object per patch keeps the
tasks learnable by a tiny model.

The constants below set how hard the visual side is; change them and bump ``GENERATOR_VERSION`` in
``lvlm_cl.benchmarks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Six saturated colours that differ strongly in at least one RGB channel from each other and from the
# background. The names are the answers, shared by every task (seq5 and pretrain).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 205, 0),
    "purple": (140, 40, 180),
    "orange": (255, 130, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
# Dark colours for text (ocr words, printed digits): never confused with the palette's names.
TEXT_COLOURS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (20, 30, 110), (90, 40, 10), (0, 75, 30))
GRID = 4                      # the scene grid is GRID × GRID cells
SHAPE_MARGIN_FRACTION = 1 / 8  # gap between a shape and its cell border, as a fraction of the cell
TEXT_MARGIN_FRACTION = 1 / 16  # minimal gap between text and the image border
MIN_FONT_SIZE = 6

CORNER_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, GRID - 1): "top right",
    (GRID - 1, 0): "bottom left", (GRID - 1, GRID - 1): "bottom right",
}


@dataclass(frozen=True)
class SceneObject:
    """One filled shape in grid cell (``row``, ``col``), 0-based from the top left."""

    row: int
    col: int
    shape: str
    colour: str

    def phrase(self) -> str:
        """``"a red circle"``, ``"an orange cross"``: the words captions and position answers use."""
        return f"{indefinite_article(self.colour)} {self.colour} {self.shape}"


def indefinite_article(word: str) -> str:
    """Return "an" before a vowel letter, else "a" (enough for the palette and shape names)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def check_image_size(image_size: int) -> None:
    """Raise ``ValueError`` unless the grid divides the image into whole, drawable cells."""
    if not isinstance(image_size, int) or image_size < 4 * GRID or image_size % GRID:
        raise ValueError(f"image_size must be an integer multiple of {GRID} and at least {4 * GRID}, "
                         f"got {image_size!r}")


def blank(image_size: int) -> Image.Image:
    return Image.new("RGB", (image_size, image_size), BACKGROUND)


def cell_box(row: int, col: int, grid: int = GRID) -> tuple[float, float, float, float]:
    """The cell's normalised box ``(x1, y1, x2, y2)`` in [0, 1] on a ``grid`` × ``grid`` layout."""
    return (col / grid, row / grid, (col + 1) / grid, (row + 1) / grid)


def format_box(box: Sequence[float]) -> str:
    """``"[0.25, 0.50, 0.50, 0.75]"``: the grounding answer format (two decimals)."""
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
               colour: tuple[int, int, int]) -> None:
    """Draw a filled ``shape`` inside the inclusive pixel box ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        # Row by row rather than a polygon: rasterised polygons lean to one side on 6-pixel cells.
        span = x1 - x0 + 1
        for i in range(y1 - y0 + 1):
            width = round((i + 1) * span / (y1 - y0 + 1))
            width += (span - width) % 2  # same parity as the span, so the row is centred exactly
            left = x0 + (span - width) // 2
            draw.rectangle((left, y0 + i, left + width - 1, y0 + i), fill=colour)
    elif shape == "cross":
        # Arms a third of the span wide, centred; rounding keeps them symmetric on small cells.
        span = x1 - x0 + 1
        arm = max(1, round(span / 3))
        a0 = x0 + (span - arm) // 2
        draw.rectangle((a0, y0, a0 + arm - 1, y1), fill=colour)
        b0 = y0 + (span - arm) // 2
        draw.rectangle((x0, b0, x1, b0 + arm - 1), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def render_scene(objects: Sequence[SceneObject], image_size: int, grid: int = GRID) -> Image.Image:
    """Draw each object filling most of its cell of a ``grid`` × ``grid`` layout on the plain background."""
    check_image_size(image_size)
    image = blank(image_size)
    draw = ImageDraw.Draw(image)
    cell = image_size // grid
    margin = max(1, round(cell * SHAPE_MARGIN_FRACTION))
    for obj in objects:
        x0, y0 = obj.col * cell + margin, obj.row * cell + margin
        draw_shape(draw, obj.shape, (x0, y0, x0 + cell - 2 * margin - 1, y0 + cell - 2 * margin - 1),
                   PALETTE[obj.colour])
    return image


def sample_scene(rng: np.random.Generator, n_objects: int, grid: int = GRID) -> list[SceneObject]:
    """``n_objects`` shapes in distinct cells with distinct colours (shapes may repeat), row-major order."""
    cells = sorted(int(c) for c in rng.choice(grid * grid, size=n_objects, replace=False))
    colours = [list(PALETTE)[int(i)] for i in rng.choice(len(PALETTE), size=n_objects, replace=False)]
    shapes = [SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=n_objects)]
    return [SceneObject(c // grid, c % grid, s, col) for c, s, col in zip(cells, shapes, colours)]


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled FreeType font (no system fonts: identical glyphs on every machine)."""
    return ImageFont.load_default(size=size)


def text_width(text: str, size: int) -> int:
    left, _, right, _ = font(size).getbbox(text)
    return right - left


def text_margin(image_size: int) -> int:
    return max(1, round(image_size * TEXT_MARGIN_FRACTION))


def fit_font_size(texts: Sequence[str], image_size: int, max_size: int) -> int:
    """The largest font size ≤ ``max_size`` at which every text fits the width with a margin."""
    room = image_size - 2 * text_margin(image_size)
    for size in range(max_size, MIN_FONT_SIZE - 1, -1):
        if all(text_width(t, size) <= room for t in texts):
            return size
    raise ValueError(f"texts {list(texts)!r} do not fit a {image_size}px image even at font size "
                     f"{MIN_FONT_SIZE}; use a larger image_size or shorter words")


def render_text(text: str, image_size: int, size: int, colour: tuple[int, int, int],
                rng: np.random.Generator, max_jitter: int | None = None) -> Image.Image:
    """``text`` on the plain background, centred, then shifted by a random offset.

    The offset is at most ``max_jitter`` pixels per axis (None = anywhere it fits) and never pushes the
    text's ink closer than the margin to the border.
    """
    image = blank(image_size)
    f = font(size)
    left, top, right, bottom = f.getbbox(text)
    margin = text_margin(image_size)
    x = _jittered_start(image_size, right - left, margin, rng, max_jitter) - left
    y = _jittered_start(image_size, bottom - top, margin, rng, max_jitter) - top
    ImageDraw.Draw(image).text((x, y), text, font=f, fill=colour)
    return image


def _jittered_start(image_size: int, extent: int, margin: int, rng: np.random.Generator,
                    max_jitter: int | None) -> int:
    lo, hi = margin, max(margin, image_size - margin - extent)
    centre = (image_size - extent) // 2
    if max_jitter is not None:
        lo, hi = max(lo, centre - max_jitter), min(hi, centre + max_jitter)
        lo, hi = min(lo, centre), max(hi, centre)  # text wider than the room: stay centred
    return int(rng.integers(lo, hi + 1))


def render_sklearn_digit(pixels: np.ndarray, image_size: int) -> Image.Image:
    """An 8×8 sklearn digit (values 0–16) as dark ink on a light background, nearest-neighbour upscaled."""
    grey = np.round(255 - np.asarray(pixels, dtype=np.float64) * (255 / 16)).astype(np.uint8)
    small = Image.fromarray(np.stack([grey] * 3, axis=-1))  # uint8 H×W×3 is RGB
    return small.resize((image_size, image_size), Image.Resampling.NEAREST)
