"""Image augmentation for training records, as big_vision's PaliGemma transfers do it (`data.augment`).

    data:
      augment: "inception_crop(area_min=50)"          # cococap.py crop='ic'
      augment: "resize_small(256)|random_crop(224)"   # cococap.py crop='rc' at 224 (256 = 224 * 8 // 7)
      augment: "zoomout(max_f=1.5)"                    # refcoco_seg.py crop='zic_mild', first op

The syntax is big_vision's preprocessing string: ops joined by `|`, each `name` or `name(args)` with
numbers as positional or keyword arguments. The ops leave the final resize to the image processor
(it resizes every image to the model's resolution), so big_vision's `size` argument of
`inception_crop(224, ...)` is not taken. Valid ops and their arguments: `OPS` below.

Randomness: every read of record `index` in epoch `epoch` draws from `random.Random` seeded by
(seed, epoch, index): the same triple gives the same image, each epoch another one, and a resumed run
(`EpochCallback` of `tasks/detect/augment.py` sets the epoch from `state.epoch`) sees the stream the
killed run would have seen. Eval records are never augmented: `train.py` wraps only the training set.

Boxes. An op moves pixels by x' = sx * x + tx, y' = sy * y + ty; the composed map is applied to the
record's `<locY1><locX1><locY2><locX2>` groups in the suffix (1024 bins over the image, decoded as
`bin / 1023 * size` and binned again as `round(v / size * 1023)`, `pg_finetune.loc`) and to its pixel
fields `box`, `boxes`, `width`, `height`, so detection, refexp and segmentation targets follow the
image. The 16 `<seg>` codes of a segmentation target describe the mask inside its box and are
unchanged by zooming and resizing. A `mask` field (eval-time reference only) is dropped from an
augmented training record rather than left in the old frame. Crops (`inception_crop`,
`random_crop`) are refused for tasks detect and segment (`augment_problems`): they can cut the
object out of the image, and big_vision never crops a box task that way (refcoco_seg.py's
`zic_mild` uses `inception_box(min_obj_cover=1.0)`, a crop that keeps the whole object, not
implemented here).

This module imports only the standard library at import time (recipe validation reads `OPS`);
PIL is imported when an image is augmented.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import random
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from pg_finetune.epoch_seeded import EpochSeededWrapper
from pg_finetune.loc import decode_value, encode_value

SEPARATOR = "|"
BOX_TASKS = ("detect", "segment")  # tasks whose targets hold boxes; crops are refused for them
_LOC_GROUP = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>")


@dataclass(frozen=True)
class Affine:
    """Pixel map of an op: x' = sx * x + tx, y' = sy * y + ty."""

    sx: float = 1.0
    sy: float = 1.0
    tx: float = 0.0
    ty: float = 0.0

    def then(self, other: Affine) -> Affine:
        """This map followed by `other`."""
        return Affine(
            other.sx * self.sx,
            other.sy * self.sy,
            other.sx * self.tx + other.tx,
            other.sy * self.ty + other.ty,
        )


# ---------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------


def _crop(image: Any, x: int, y: int, w: int, h: int) -> tuple[Any, Affine]:
    return image.crop((x, y, x + w, y + h)), Affine(tx=-x, ty=-y)


def sample_inception_crop(
    width: int,
    height: int,
    rng: random.Random,
    area_range: tuple[float, float],
    aspect_ratio_range: tuple[float, float],
    max_attempts: int = 100,
) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a crop, as TensorFlow's `sample_distorted_bounding_box` draws it for
    big_vision's `inception_crop` (no boxes, `min_object_covered=0`,
    `use_image_if_no_bounding_boxes=True`): up to `max_attempts` times draw an aspect ratio w/h
    uniformly from `aspect_ratio_range` and try a crop whose area fraction lies in `area_range`;
    when every attempt fails, the whole image. Transcribed from the kernel's `GenerateRandomCrop`
    (tensorflow/core/kernels/image/sample_distorted_bounding_box_op.cc), rounding as its `lrintf`
    (halves to even, as Python's round) and `Uniform(n)` as [0, n)."""
    for _ in range(max_attempts):
        aspect = rng.random() * (aspect_ratio_range[1] - aspect_ratio_range[0]) + aspect_ratio_range[0]
        crop = _generate_random_crop(width, height, area_range[0], area_range[1], aspect, rng)
        if crop is not None:
            return crop
    return 0, 0, width, height


def _generate_random_crop(
    width: int, height: int, min_rel_area: float, max_rel_area: float, aspect: float, rng: random.Random
) -> tuple[int, int, int, int] | None:
    if max_rel_area <= 0 or aspect <= 0 or width <= 0 or height <= 0 or min_rel_area > max_rel_area:
        return None
    min_area = min_rel_area * width * height
    max_area = max_rel_area * width * height
    h = round(math.sqrt(min_area / aspect))
    max_h = round(math.sqrt(max_area / aspect))
    if round(max_h * aspect) > width:  # the smallest max_h with round(max_h * aspect) <= width
        max_h = int((width + 0.5 - 1e-7) / aspect)
        if round(max_h * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
        h += rng.randrange(max_h - h + 1)  # closed range [0, max_h - h]
    w = round(h * aspect)
    area = w * h
    for _ in range(2):  # rounding left the area too small: try one or two pixels taller
        if area < min_area:
            h += 1
            w = round(h * aspect)
            area = w * h
    if area < min_area or area > max_area or not 0 < w <= width or not 0 < h <= height:
        return None
    y = rng.randrange(height - h) if h < height else 0
    x = rng.randrange(width - w) if w < width else 0
    return x, y, w, h


@dataclass(frozen=True)
class InceptionCrop:
    """big_vision `inception_crop` (pp/ops_image.py): a random crop with area_min..area_max percent of
    the image and width/height ratio in ratio_min..ratio_max (TensorFlow's default range, which
    big_vision's inception_crop leaves in place). cococap.py crop='ic' uses area_min=50."""

    area_min: float = 5.0
    area_max: float = 100.0
    ratio_min: float = 0.75
    ratio_max: float = 1.33
    name: ClassVar[str] = "inception_crop"
    crops: ClassVar[bool] = True

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.area_min <= self.area_max <= 100:
            out.append(
                f"area_min/area_max are percent with 0 < area_min <= area_max <= 100, got {self.area_min}/{self.area_max}"
            )
        if not 0 < self.ratio_min <= self.ratio_max:
            out.append(
                f"ratio_min/ratio_max need 0 < ratio_min <= ratio_max, got {self.ratio_min}/{self.ratio_max}"
            )
        return out

    def __call__(self, image: Any, rng: random.Random) -> tuple[Any, Affine]:
        x, y, w, h = sample_inception_crop(
            image.width,
            image.height,
            rng,
            (self.area_min / 100, self.area_max / 100),
            (self.ratio_min, self.ratio_max),
        )
        return _crop(image, x, y, w, h)


@dataclass(frozen=True)
class ResizeSmall:
    """big_vision `resize_small(n)`: the shorter side becomes n, aspect kept (each side round(side * n /
    shorter)), area resampling (big_vision's default method 'area'; PIL's BOX filter)."""

    size: int
    name: ClassVar[str] = "resize_small"
    crops: ClassVar[bool] = False

    def problems(self) -> list[str]:
        return (
            []
            if self.size >= 1 and float(self.size).is_integer()
            else [f"size must be a whole number >= 1, got {self.size}"]
        )

    def __call__(self, image: Any, rng: random.Random) -> tuple[Any, Affine]:
        from PIL import Image

        factor = self.size / min(image.width, image.height)
        w, h = round(image.width * factor), round(image.height * factor)
        return image.resize((w, h), Image.Resampling.BOX), Affine(w / image.width, h / image.height)


@dataclass(frozen=True)
class RandomCrop:
    """big_vision `random_crop(n)` or `random_crop(h, w)`: a crop of that size at an offset uniform over
    every position (tf.image.random_crop). Needs a `resize_small` of at least that size before it."""

    height: int
    width: int | None = None
    name: ClassVar[str] = "random_crop"
    crops: ClassVar[bool] = True

    @property
    def size(self) -> tuple[int, int]:
        return int(self.height), int(self.width if self.width is not None else self.height)

    def problems(self) -> list[str]:
        if all(v >= 1 and float(v).is_integer() for v in self.size):
            return []
        return [f"sizes must be whole numbers >= 1, got {self.height}, {self.width}"]

    def __call__(self, image: Any, rng: random.Random) -> tuple[Any, Affine]:
        h, w = self.size
        if image.width < w or image.height < h:  # parse_augment puts a large enough resize_small first
            raise ValueError(f"random_crop({h}, {w}): image is only {image.width} x {image.height} px")
        y = rng.randint(0, image.height - h)
        x = rng.randint(0, image.width - w)
        return _crop(image, x, y, w, h)


@dataclass(frozen=True)
class ZoomOut:
    """refcoco_seg.py's `zoomout(max_f=1.5)`: the image on a black canvas f times its size, f uniform in
    [1, max_f], at a uniformly drawn integer offset; boxes move with it. big_vision's op is not in its
    public repository; this is the usual zoom-out (SSD's expand), with the argument name it uses."""

    max_f: float = 1.5
    name: ClassVar[str] = "zoomout"
    crops: ClassVar[bool] = False

    def problems(self) -> list[str]:
        return [] if 1 <= self.max_f <= 8 else [f"max_f must be in [1, 8] (1 = no zoom), got {self.max_f}"]

    def __call__(self, image: Any, rng: random.Random) -> tuple[Any, Affine]:
        from PIL import Image

        f = rng.uniform(1.0, self.max_f)
        w, h = round(image.width * f), round(image.height * f)
        x, y = rng.randint(0, w - image.width), rng.randint(0, h - image.height)
        canvas = Image.new(image.mode, (w, h))  # zeros: black
        canvas.paste(image, (x, y))
        return canvas, Affine(tx=x, ty=y)


OPS: dict[str, type] = {op.name: op for op in (InceptionCrop, ResizeSmall, RandomCrop, ZoomOut)}
EXAMPLE = "resize_small(256)|random_crop(224)"


# ---------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------


def _signature(cls: type) -> str:
    return (
        f"{cls.name}("
        + ", ".join(
            f.name if f.default is dataclasses.MISSING else f"{f.name}={f.default}"
            for f in dataclasses.fields(cls)
        )
        + ")"
    )


def _number(node: ast.AST) -> float | int | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _number(node.operand)
        return None if inner is None else -inner
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
    ):
        return node.value
    return None


def _parse_op(text: str) -> tuple[Any | None, str | None]:
    """(op, None) or (None, what is wrong)."""
    valid = ", ".join(OPS)
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None, f"cannot read op {text.strip()!r}; write name or name(args), e.g. {EXAMPLE!r}"
    call = node if isinstance(node, ast.Call) else None
    name_node = call.func if call else node
    if not isinstance(name_node, ast.Name):
        return None, f"cannot read op {text.strip()!r}; write name or name(args), e.g. {EXAMPLE!r}"
    name = name_node.id
    if name not in OPS:
        close = difflib.get_close_matches(name, list(OPS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return None, f"unknown op {name!r}{hint} (valid ops: {valid})"
    cls = OPS[name]
    args, kwargs = [], {}
    for arg in call.args if call else ():
        value = _number(arg)
        if value is None:
            return (
                None,
                f"{name}: arguments must be numbers, got {ast.unparse(arg)!r}; signature {_signature(cls)}",
            )
        args.append(value)
    for kw in call.keywords if call else ():
        value = _number(kw.value)
        if kw.arg is None or value is None:
            return (
                None,
                f"{name}: arguments must be numbers, got {ast.unparse(kw)!r}; signature {_signature(cls)}",
            )
        kwargs[kw.arg] = value
    fields = [f.name for f in dataclasses.fields(cls)]
    if name == "inception_crop" and args:  # big_vision's first argument is the output size
        return None, (
            f"{name}: takes no output size (the image processor resizes to the model's resolution); "
            f"use keywords: {_signature(cls)}"
        )
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        return None, f"{name}: unknown argument {unknown[0]!r}; signature {_signature(cls)}"
    try:
        op = cls(*args, **kwargs)
    except TypeError:
        return None, f"{name}: wrong arguments {text.strip()!r}; signature {_signature(cls)}"
    bad = op.problems()
    if bad:
        return None, f"{name}: " + "; ".join(bad)
    return op, None


def parse_augment(spec: str) -> tuple[list[Any], list[str]]:
    """`"resize_small(256)|random_crop(224)"` -> (ops, problems); ops are usable only without problems."""
    ops, problems = [], []
    if not spec.strip():
        return [], [f"empty; give ops joined by '|' (e.g. {EXAMPLE!r}) or null for no augmentation"]
    for part in spec.split(SEPARATOR):
        op, problem = _parse_op(part)
        if problem:
            problems.append(problem)
        else:
            ops.append(op)
    shortest = None  # the shorter side guaranteed by the last resize_small, if any
    for op in ops:
        if isinstance(op, ResizeSmall):
            shortest = op.size
        elif isinstance(op, RandomCrop):
            if shortest is None or max(op.size) > shortest:
                problems.append(
                    f"random_crop{op.size}: needs resize_small(n) with n >= {max(op.size)} before it "
                    f"(an image smaller than the crop cannot be cropped), e.g. {EXAMPLE!r}"
                )
            shortest = min(op.size)
        elif op.crops:  # inception_crop: no size guaranteed after it (zoomout only enlarges)
            shortest = None
    return ops, problems


def augment_problems(spec: str | None, task_name: str) -> list[str]:
    """The `data.augment` problems of a recipe, each naming the key and the fix."""
    if spec is None:
        return []
    ops, problems = parse_augment(spec)
    out = [f"data.augment: {p}" for p in problems]
    if task_name in BOX_TASKS:
        for op in ops:
            if op.crops:
                out.append(
                    f"data.augment: {op.name} is refused for task {task_name!r}: a crop can cut the object out of "
                    "the image and its target would be wrong (big_vision crops box tasks only with a crop that "
                    "keeps the whole object, not implemented here); use zoomout(max_f=...) or resize_small(n)"
                )
    return out


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


def _map_loc_groups(suffix: str, size: tuple[int, int], new_size: tuple[int, int], affine: Affine) -> str:
    (w, h), (nw, nh) = size, new_size

    def one(match: re.Match) -> str:
        y1, x1, y2, x2 = (int(g) for g in match.groups())
        ys = [encode_value(affine.sy * decode_value(b, h) + affine.ty, nh) for b in (y1, y2)]
        xs = [encode_value(affine.sx * decode_value(b, w) + affine.tx, nw) for b in (x1, x2)]
        return f"<loc{ys[0]:04d}><loc{xs[0]:04d}><loc{ys[1]:04d}><loc{xs[1]:04d}>"

    return _LOC_GROUP.sub(one, suffix)


def _map_box(box: Any, new_size: tuple[int, int], affine: Affine) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    nw, nh = new_size
    xs = [min(max(affine.sx * x + affine.tx, 0.0), nw) for x in (x1, x2)]
    ys = [min(max(affine.sy * y + affine.ty, 0.0), nh) for y in (y1, y2)]
    return [xs[0], ys[0], xs[1], ys[1]]


def augment_record(record: dict, ops: list[Any], rng: random.Random) -> dict:
    """A copy of `record` with its image passed through `ops` and its boxes moved with it."""
    image = record["image"]
    size = image.size
    affine = Affine()
    for op in ops:
        image, step = op(image, rng)
        affine = affine.then(step)
    out = dict(record)
    out["image"] = image
    new_size = image.size
    if isinstance(out.get("suffix"), str):
        out["suffix"] = _map_loc_groups(out["suffix"], size, new_size, affine)
    if "box" in out:
        out["box"] = _map_box(out["box"], new_size, affine)
    if isinstance(out.get("boxes"), list):
        out["boxes"] = [_map_box(b, new_size, affine) for b in out["boxes"]]
    if "width" in out or "height" in out:
        out["width"], out["height"] = new_size
    out.pop("mask", None)  # an eval reference in the old frame: never read in training
    return out


class ImageAugment(EpochSeededWrapper):
    """Wraps a training record dataset: each read returns the record with an augmented image.

    data = ImageAugment(train_data, parse_augment("zoomout(max_f=1.5)")[0], seed=42)
    trainer = Trainer(..., train_dataset=data, callbacks=[EpochCallback(data)])
    """

    stream = "image-augment"

    def __init__(self, dataset: Any, ops: list[Any], *, seed: int):
        super().__init__(dataset, seed=seed)
        self.ops = list(ops)

    def __getitem__(self, index: int) -> dict | None:
        record = self.dataset[index]
        if record is None:
            return None
        return augment_record(record, self.ops, self.rng(index))

    def __repr__(self) -> str:
        return f"ImageAugment({self.dataset!r}, ops={[op.name for op in self.ops]}, epoch={self.epoch})"
