"""Make a line-intersection counting dataset ("Vision language models are blind", Rahmanzadehgervi et al. 2024).

    python data_prep/make_count_intersections.py --out data/count_intersections --num 1000 --seed 0 \
        --size 384 --line-width 4 --split train --classes 0,1,2

Each image shows two piecewise-linear line plots drawn in two colours on white. As in the paper, each
line is a polyline through 3 points whose x positions are fixed and equally spaced (the same for both
lines) and whose y values are random (integers, so the geometry below is exact). The label is the
number of intersection POINTS between the two polylines, computed geometrically with
`fractions.Fraction`. Writes `OUT/images/{split}_NNNNN.png` and `OUT/{split}.jsonl` with records like

    {"image": "images/train_00000.png", "prefix": "count the intersections", "suffix": "2", "count": 2,
     "lines": [[[x, y], [x, y], [x, y]], [[x, y], [x, y], [x, y]]], "id": "count_intersections-train-00000"}

Counting conventions (`count_intersections`):
- distinct points are counted: a crossing exactly at a vertex of one line (where two of its segments
  meet, so two segment pairs report it) counts once;
- touching counts: two lines that meet at a point without crossing (e.g. a vertex of one line resting
  on the other) have one intersection point there, so it counts as 1, like a crossing;
- a collinear overlap (two segments sharing a stretch of positive length) has infinitely many points:
  `count_intersections` raises `CollinearOverlapError` and the generator rejects (resamples) the pair.

Rejected as too hard to see (`reject_reason`, thresholds `min_gap = 2 * line_width` px): intersection
points closer than min_gap to each other (`points_too_close`) or to the image border (`near_border`),
and a vertex of one line within min_gap of the other line that is not at or near an intersection
(`near_miss`: it would look like a touch). Shallow crossing angles are not rejected.

Classes are balanced by rejection sampling: candidates are drawn from one seeded `random.Random` until
each requested class holds its share of `--num` (the first `num % len(classes)` classes get one
more). With 3 points on shared x positions the count is at most 2, so the classes are within 0..2.
Generate a test split with another seed: `--split test --seed 1 --num 200`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

Point = tuple[float, float]
Line = Sequence[Sequence[float]]

PREFIX = "count the intersections"
NUM_POINTS = 3  # the paper's line plots: 3 points, i.e. 2 segments per line
MAX_COUNT = NUM_POINTS - 1  # shared x positions: each x interval holds at most one crossing
COLORS = ((31, 119, 180), (214, 39, 40))  # blue and red
MIN_SIZE = 32  # px; smaller images leave no room between the margins for three points


class CollinearOverlapError(ValueError):
    """Two segments overlap along a stretch: the lines share infinitely many points."""


# ------------------------------------------------------------------------------------------ geometry
def _cross(
    o: tuple[Fraction, Fraction], a: tuple[Fraction, Fraction], b: tuple[Fraction, Fraction]
) -> Fraction:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _on_segment(p, a, b) -> bool:
    """p is collinear with a-b; is it within the segment's bounding box?"""
    return min(a[0], b[0]) <= p[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= p[1] <= max(a[1], b[1])


def segment_intersection(p1, p2, q1, q2) -> set[tuple[Fraction, Fraction]]:
    """Exact intersection of segments p1-p2 and q1-q2: the empty set or one point.

    Raises CollinearOverlapError when they overlap along a stretch of positive length.
    """
    p1, p2, q1, q2 = (tuple(Fraction(c) for c in pt) for pt in (p1, p2, q1, q2))
    d1, d2 = _cross(q1, q2, p1), _cross(q1, q2, p2)
    d3, d4 = _cross(p1, p2, q1), _cross(p1, p2, q2)
    if d1 == d2 == 0:  # all four points on one line
        shared = {pt for pt in (p1, p2) if _on_segment(pt, q1, q2)} | {
            pt for pt in (q1, q2) if _on_segment(pt, p1, p2)
        }
        if len(shared) > 1:
            raise CollinearOverlapError(f"segments {p1}-{p2} and {q1}-{q2} overlap along a stretch")
        return shared
    if (d1 > 0 and d2 > 0) or (d1 < 0 and d2 < 0) or (d3 > 0 and d4 > 0) or (d3 < 0 and d4 < 0):
        return set()
    # d1 != d2 here (not both zero, and not of the same sign), so the lines are not parallel
    t = d1 / (d1 - d2)
    return {(p1[0] + t * (p2[0] - p1[0]), p1[1] + t * (p2[1] - p1[1]))}


def intersection_points(line_a: Line, line_b: Line) -> set[tuple[Fraction, Fraction]]:
    """Distinct intersection points of two polylines (lists of [x, y]); raises CollinearOverlapError."""
    points: set[tuple[Fraction, Fraction]] = set()
    for p1, p2 in pairwise(line_a):
        for q1, q2 in pairwise(line_b):
            points |= segment_intersection(p1, p2, q1, q2)
    return points


def count_intersections(line_a: Line, line_b: Line) -> int:
    """Number of distinct points where the polylines meet (crossing or touching); see the module docstring.

    Raises CollinearOverlapError when two segments overlap along a stretch.
    """
    return len(intersection_points(line_a, line_b))


def _point_segment_distance(p: Point, a: Point, b: Point) -> float:
    ax, ay, bx, by = a[0], a[1], b[0], b[1]
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else max(0.0, min(1.0, ((p[0] - ax) * dx + (p[1] - ay) * dy) / length2))
    return math.hypot(p[0] - (ax + t * dx), p[1] - (ay + t * dy))


def _point_line_distance(p: Point, line: Line) -> float:
    return min(_point_segment_distance(p, a, b) for a, b in pairwise(line))


# ------------------------------------------------------------------------------------------ sampling
def min_size(line_width: int) -> int:
    """The smallest image side whose margins (`sample_lines`) leave room for the points of a line."""
    return max(MIN_SIZE, 8 * line_width)


def sample_lines(rng: random.Random, size: int, line_width: int) -> list[list[list[int]]]:
    """Two polylines of NUM_POINTS points: shared, equally spaced x; random integer y inside a margin."""
    margin = max(3 * line_width, size // 10)
    xs = [round(margin + i * (size - 1 - 2 * margin) / (NUM_POINTS - 1)) for i in range(NUM_POINTS)]
    return [[[x, rng.randint(margin, size - 1 - margin)] for x in xs] for _ in range(2)]


def reject_reason(line_a: Line, line_b: Line, size: int, line_width: int) -> str | None:
    """Why this pair is not a clean sample (see the module docstring), or None when it is fine."""
    try:
        points = [(float(x), float(y)) for x, y in intersection_points(line_a, line_b)]
    except CollinearOverlapError:
        return "collinear_overlap"
    min_gap = 2 * line_width
    if any(math.dist(p, q) < min_gap for i, p in enumerate(points) for q in points[i + 1 :]):
        return "points_too_close"
    if any(min(x, y, size - 1 - x, size - 1 - y) < min_gap for x, y in points):
        return "near_border"
    for line, other in ((line_a, line_b), (line_b, line_a)):
        for vertex in line:
            vertex = (float(vertex[0]), float(vertex[1]))
            near_point = any(math.dist(vertex, p) < min_gap for p in points)
            if not near_point and _point_line_distance(vertex, other) < min_gap:
                return "near_miss"
    return None


def render(lines: Sequence[Line], size: int, line_width: int) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for line, color in zip(lines, COLORS, strict=True):
        draw.line([tuple(pt) for pt in line], fill=color, width=line_width, joint="curve")
    return image


def class_quotas(num: int, classes: Sequence[int]) -> dict[int, int]:
    """num split over classes as evenly as possible; the first `num % len(classes)` get one more."""
    return {c: num // len(classes) + (i < num % len(classes)) for i, c in enumerate(classes)}


def generate(
    out: str | Path,
    num: int,
    seed: int = 0,
    size: int = 384,
    line_width: int = 4,
    split: str = "train",
    classes: Sequence[int] = (0, 1, 2),
    progress: bool = True,
    max_tries_per_sample: int = 1000,
) -> dict:
    """Write `num` balanced samples to OUT/images/ and OUT/{split}.jsonl; returns a summary dict."""
    classes = list(dict.fromkeys(classes))
    if not classes or any(not 0 <= c <= MAX_COUNT for c in classes):
        raise ValueError(
            f"classes must be a non-empty subset of 0..{MAX_COUNT} (3-point lines), got {classes}"
        )
    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    if line_width < 1:  # a 0-width line draws nothing: blank images labelled with counts
        raise ValueError(f"--line-width must be at least 1, got {line_width}")
    if size < min_size(line_width):
        raise ValueError(f"--size must be at least {min_size(line_width)} for --line-width {line_width}, got {size}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    quotas = class_quotas(num, classes)
    accepted: Counter[int] = Counter()
    rejected: Counter[str] = Counter()
    records = []
    bar = tqdm(total=num, desc=f"count_intersections {split}", disable=not progress)
    tries = 0
    while len(records) < num:
        tries += 1
        if tries > max_tries_per_sample * num:
            raise RuntimeError(
                f"gave up after {tries - 1} candidates; accepted {dict(accepted)}, rejected {dict(rejected)}"
            )
        lines = sample_lines(rng, size, line_width)
        reason = reject_reason(*lines, size, line_width)
        if reason is None:
            count = count_intersections(*lines)
            if count not in quotas:
                reason = "class_not_requested"
            elif accepted[count] >= quotas[count]:
                reason = "class_full"
        if reason is not None:
            rejected[reason] += 1
            continue
        index = len(records)
        image_name = f"images/{split}_{index:05d}.png"
        render(lines, size, line_width).save(out / image_name)
        accepted[count] += 1
        records.append(
            {
                "image": image_name,
                "prefix": PREFIX,
                "suffix": str(count),
                "count": count,
                "lines": lines,
                "id": f"count_intersections-{split}-{index:05d}",
            }
        )
        bar.update(1)
    bar.close()
    with open(out / f"{split}.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return {
        "jsonl": str(out / f"{split}.jsonl"),
        "per_class": {c: accepted[c] for c in classes},
        "rejected": dict(sorted(rejected.items())),
        "candidates": tries,
    }


def build_parser(prog: str = "pg-make-count-intersections") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Make a balanced line-intersection counting dataset (JSONL + PNGs) for PaliGemma.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="Output dir: gets images/ and {split}.jsonl.")
    parser.add_argument("--num", type=int, default=1000, help="Number of samples to make (>= 1).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (use another one per split).")
    parser.add_argument(
        "--size", type=int, default=384,
        help=f"Image side in pixels, >= max({MIN_SIZE}, 8 x line width) (PaliGemma 224/448 resize it).",
    )
    parser.add_argument("--line-width", type=int, default=4, help="Line width in pixels, >= 1.")
    parser.add_argument("--split", default="train", help="Split name: the JSONL file and image name prefix.")
    parser.add_argument(
        "--classes", default="0,1,2", help=f"Comma-separated counts to balance, within 0..{MAX_COUNT}."
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bar and no summary.")
    parser.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)  # older spelling: bar only
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 when the set was written, 2 for bad arguments (argparse's usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--classes: expected comma-separated integers like 0,1,2, got {args.classes!r}")
    try:
        summary = generate(
            args.out, args.num, args.seed, args.size, args.line_width, args.split, classes,
            not (args.quiet or args.no_progress),
        )
    except ValueError as err:
        parser.error(str(err))
    if not args.quiet:
        print(f"wrote {sum(summary['per_class'].values())} samples to {summary['jsonl']}")
        print("per class: " + ", ".join(f"{c}: {n}" for c, n in summary["per_class"].items()))
        rejected = summary["rejected"]
        print(
            f"rejected {sum(rejected.values())} of {summary['candidates']} candidates: "
            + (", ".join(f"{reason}: {n}" for reason, n in rejected.items()) or "none")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
