"""Detection prompts and targets: `detect a ; b` and `<locY1><locX1><locY2><locX2> a ; ...`.

The location-token format (1024 bins, y before x) lives in `pg_finetune.loc`; here is what the
detect task builds from a record's `boxes` (pixel x1, y1, x2, y2), `labels`, `width` and `height`,
and the one reader of a `detect a ; b` prompt (used by scoring, constrained decoding and predict).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from pg_finetune.loc import DETECT_PREFIX, detect_prefix, format_detections, parse_detections

T = TypeVar("T")


def prompt_classes(prefix: str | None) -> list[str]:
    """Classes a `detect a ; b` prompt names, whitespace collapsed, duplicates dropped; [] for other prompts."""
    if not prefix or not prefix.startswith(DETECT_PREFIX + " "):
        return []
    classes = (" ".join(c.split()) for c in prefix[len(DETECT_PREFIX) + 1 :].split(";"))
    return list(dict.fromkeys(c for c in classes if c))


def target_problem(suffix: str) -> str | None:
    """None when `suffix` is a well-formed detection target, else what is wrong (the `Task.check_target` hook).

    Read by the parser the scorer uses (`pg_finetune.loc.parse_detections`), so a target trains only
    if the same text, written by the model, would score: four `<locNNNN>` bins in 0..1023 with
    y1 < y2 and x1 < x2, then a label, per object. An empty suffix is not judged here (the record
    reader refuses it as "empty suffix").
    """
    if not suffix.strip():
        return None
    parsed = parse_detections(suffix, 1, 1)  # the image size only scales boxes; bins are checked as written
    if not parsed.malformed:
        return None if parsed.detections else f"no objects, only separators: {suffix!r}"
    shown = "; ".join(parsed.problems[:3]) + (f"; and {len(parsed.problems) - 3} more" if parsed.malformed > 3 else "")
    return (
        f"{parsed.malformed} of {parsed.segments} objects malformed ({shown}); each object must be "
        "'<locY1><locX1><locY2><locX2> label' (4-digit bins 0..1023, y1 < y2, x1 < x2), objects joined by ' ; '"
    )


def shuffle_objects(objects: Sequence[T], rng: random.Random | None = None) -> list[T]:
    """A copy of `objects`, shuffled when `rng` is given (the pipeline reseeds it every epoch).

    PaliGemma's detection transfers train on shuffled object order so the model does not
    learn one arbitrary order as part of the task.
    """
    objects = list(objects)
    if rng is not None:
        rng.shuffle(objects)
    return objects


def make_suffix(
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    width: float,
    height: float,
    *,
    rng: random.Random | None = None,
    max_objects: int | None = None,
) -> str:
    """Target text for a detection record; objects shuffled when `rng` is given, then cut to `max_objects`."""
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    objects = shuffle_objects(list(zip(boxes, labels, strict=True)), rng)
    if max_objects is not None:
        objects = objects[:max_objects]
    return format_detections(objects, width, height)


def make_prefix(
    labels_present: Sequence[str],
    all_classes: Sequence[str] | None = None,
    negatives: int = 0,
    rng: random.Random | None = None,
) -> str:
    """`detect a ; b`: the present classes plus up to `negatives` classes absent from the image.

    Absent classes appear in the prompt but not in the suffix, which teaches the model
    to say nothing for a class it cannot see. Without `rng` the negatives are the first
    absent classes of `all_classes` and the order is kept; with `rng` the negatives are
    sampled and the whole class list is shuffled.
    """
    present = list(dict.fromkeys(labels_present))
    absent = [c for c in dict.fromkeys(all_classes or ()) if c not in set(present)]
    if negatives < 0:
        raise ValueError(f"negatives must be >= 0, got {negatives}")
    count = min(negatives, len(absent))
    picked = rng.sample(absent, count) if rng is not None else absent[:count]
    return detect_prefix(shuffle_objects(present + picked, rng))


def record_prompt(record: dict) -> str:
    """The record's prefix; a bare `detect` (no classes) becomes `detect <its labels>`."""
    prefix = record.get("prefix")
    if (prefix is None or prefix.strip() == DETECT_PREFIX) and record.get("labels"):
        return detect_prefix(record["labels"])
    return prefix or DETECT_PREFIX
