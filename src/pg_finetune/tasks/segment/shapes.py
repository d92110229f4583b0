"""Generated shape masks (ellipses, rectangles, triangles, polygons, rotated, sometimes two overlapping),
for training a small mask codec offline and for tests.

    masks = shape_masks64(1000, seed=0)     # (1000, 64, 64) float32: each crop to its extent, resized
    mask = random_shape_mask(np.random.default_rng(0), 120, 90)   # one (90, 120) bool full mask
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("ellipse", "rectangle", "triangle", "polygon")


def _polygon(rng: np.random.Generator, kind: str, cx: float, cy: float, rx: float, ry: float) -> list[tuple]:
    if kind == "ellipse":
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        radii = np.ones_like(angles)
    elif kind == "rectangle":
        angles = np.array([1, 3, 5, 7]) * math.pi / 4
        radii = np.ones(4)
    elif kind == "triangle":
        angles = np.sort(rng.uniform(0, 2 * math.pi, 3))
        angles = angles if np.diff(np.r_[angles, angles[0] + 2 * math.pi]).max() < 1.6 * math.pi else np.array(
            [0.5, 2.6, 4.7]) + rng.uniform(0, 1)  # fmt: skip
        radii = np.ones(3)
    else:
        k = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, k))
        radii = rng.uniform(0.5, 1.0, k)
    turn = rng.uniform(0, 2 * math.pi)
    cos, sin = math.cos(turn), math.sin(turn)
    pts = []
    for a, r in zip(angles, radii, strict=True):
        x, y = r * rx * math.cos(a), r * ry * math.sin(a)
        pts.append((cx + x * cos - y * sin, cy + x * sin + y * cos))
    return pts


def random_shape_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One (height, width) bool mask: a rotated shape, a third of the time the union of two."""
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    for _ in range(1 if rng.random() < 0.67 else 2):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        rx, ry = rng.uniform(0.1, 0.45) * width, rng.uniform(0.1, 0.45) * height
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        draw.polygon(_polygon(rng, kind, cx, cy, rx, ry), fill=255)
    mask = np.asarray(image) > 0
    if not mask.any():
        mask[height // 2, width // 2] = True
    return mask


def shape_masks64(n: int, seed: int) -> np.ndarray:
    """n masks as the codec sees them: random canvases, each mask cropped to its extent, 64x64 in [0, 1]."""
    from pg_finetune.tasks.segment.masks import crop_to_64

    rng = np.random.default_rng(seed)
    out = np.empty((n, 64, 64), np.float32)
    for i in range(n):
        width, height = (int(v) for v in rng.integers(48, 160, 2))
        out[i] = crop_to_64(random_shape_mask(rng, width, height))
    return out
