"""Boxes and labels drawn on an image: the one drawer of the eval page, the run report and predict.

One colour scheme everywhere: ground truth green, predictions red. Each caller keeps its own
display size (`min_side`, `max_side`, `whole`): the eval page enlarges small images (easy-VQA's
are 64 px) so labels stay readable, the report shows thumbnails, predict draws at full size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from PIL import Image, ImageDraw

TRUTH_COLOUR = (30, 170, 60)  # green
PREDICTED_COLOUR = (230, 40, 40)  # red

Box = Sequence[float]


def display_scale(
    size: tuple[int, int], *, min_side: int | None = None, max_side: int | None = None, whole: bool = False
) -> float:
    """Factor that brings the short side up to `min_side` and the long side within `max_side` (the cap
    wins); with `whole`, images are enlarged by whole factors only, so every pixel stays a square."""
    scale = 1.0
    if min_side and min(size) < min_side:
        scale = min_side / max(1, min(size))
    if max_side and max(size) * scale > max_side:
        scale = max_side / max(size)
    if whole and scale > 1:
        scale = float(math.floor(scale))
    return scale


def resize_for_display(
    image: Image.Image, *, min_side: int | None = None, max_side: int | None = None, whole: bool = False
) -> Image.Image:
    """An RGB copy of `image` scaled by `display_scale`: nearest neighbour when enlarging (small images keep
    crisp pixels), Lanczos when shrinking."""
    scale = display_scale(image.size, min_side=min_side, max_side=max_side, whole=whole)
    rgb = image.convert("RGB")  # a copy, even when the image already is RGB
    if scale == 1.0:
        return rgb
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return rgb.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def draw_boxes(
    image: Image.Image,
    truth: Iterable[Sequence] = (),
    predicted: Iterable[Sequence] = (),
    *,
    frame: tuple[float, float] | None = None,
    min_side: int | None = None,
    max_side: int | None = None,
    whole: bool = False,
    line_width: int | None = None,
) -> Image.Image:
    """A display copy of `image` (see `resize_for_display`) with `truth` boxes in green, labelled below
    the box, and `predicted` boxes in red, labelled above it (inside the box where the image ends).

    Each box is `(pixel x1y1x2y2, label, ...)` (a `Drawn` entry fits) in a `frame` of (width, height)
    pixels, by default the image's own, and is rescaled to the copy. `image` itself is not changed.
    """
    canvas = resize_for_display(image, min_side=min_side, max_side=max_side, whole=whole)
    frame_width, frame_height = frame or image.size
    sx, sy = canvas.width / frame_width, canvas.height / frame_height
    width = line_width or max(2, round(min(canvas.size) / 160))
    draw = ImageDraw.Draw(canvas)
    for boxes, colour, below in ((truth, TRUTH_COLOUR, True), (predicted, PREDICTED_COLOUR, False)):
        for box, label, *_ in boxes:
            x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
            if not label:
                continue
            text_height = draw.textbbox((0, 0), label)[3]
            if below:
                fits = y2 + 1 + text_height <= canvas.height
                text_y = y2 + 1 if fits else y2 - width - text_height
            else:
                fits = y1 - 1 - text_height >= 0
                text_y = y1 - 1 - text_height if fits else y1 + width
            draw.text((x1 + width, text_y), label, fill=colour)
    return canvas


def draw_masks(
    image: Image.Image,
    truth: Iterable[Sequence] = (),
    predicted: Iterable[Sequence] = (),
    *,
    frame: tuple[float, float] | None = None,
    min_side: int | None = None,
    max_side: int | None = None,
    whole: bool = False,
    alpha: float = 0.45,
) -> Image.Image:
    """`draw_boxes` with masks: each entry is `(pixel x1y1x2y2 box, label, note, mask)` (a `Drawn` entry
    with a mask after it; without one, only the box is drawn). A mask is a (height, width) bool array in
    `frame` (default: the image's size) or a COCO RLE dict. Masks are blended in first (truth green,
    predictions red, `alpha` opaque; where both cover a pixel the colours mix), then boxes and labels.
    """
    import numpy as np

    truth, predicted = list(truth), list(predicted)
    canvas = resize_for_display(image, min_side=min_side, max_side=max_side, whole=whole)
    pixels = np.asarray(canvas, dtype=np.float32).copy()
    for entries, colour in ((truth, TRUTH_COLOUR), (predicted, PREDICTED_COLOUR)):
        for entry in entries:
            if len(entry) < 4 or entry[3] is None:
                continue
            mask = entry[3]
            if isinstance(mask, dict):
                from pg_finetune.tasks.segment.masks import rle_to_mask

                mask = rle_to_mask(mask)
            scaled = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(
                canvas.size, Image.Resampling.NEAREST
            )
            inside = np.asarray(scaled) > 0
            pixels[inside] = (1 - alpha) * pixels[inside] + alpha * np.asarray(colour, np.float32)
    blended = Image.fromarray(pixels.round().astype(np.uint8))
    return draw_boxes(blended, truth, predicted, frame=frame or image.size)
