"""Object detection: prefix `detect a ; b`, suffix `<locY1><locX1><locY2><locX2> a ; ...`.

Records carry `boxes` (pixel x1, y1, x2, y2), `labels`, `width` and `height`; the
location-token format lives in `pg_finetune.loc`. Parsing needs the image size, so
`parse` only strips the text and `references(record)` packs the ground truth and the
image size into one JSON string, which `score` decodes.

Scoring matches predictions to ground truth one-to-one per image and label with the
Hungarian algorithm on IoU (a greedy match can pair a prediction with the wrong box
and lose a match). Metrics, pooled over all ground-truth boxes / predictions:
miou (IoU of each GT box with its match, 0 when unmatched), acc@0.5 (RefCOCO-style:
fraction of GT boxes matched at IoU >= 0.5; equals recall@0.5 under one-to-one
matching), precision@0.5, recall@0.5, and invalid_rate (malformed segments / segments).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from scipy.optimize import linear_sum_assignment

from pg_finetune.loc import DETECT_PREFIX, detect_prefix, format_detections, parse_detections
from pg_finetune.tasks.base import Task

IOU_THRESHOLD = 0.5
T = TypeVar("T")


# ---- building prompts and targets ---------------------------------------------------------------


def shuffle_objects(objects: Sequence[T], rng: random.Random | None = None) -> list[T]:
    """A copy of `objects`, shuffled when `rng` is given (the pipeline reseeds it every epoch).

    PaliGemma's detection transfers train on shuffled object order so the model does
    not learn one arbitrary order as part of the task.
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


# ---- scoring --------------------------------------------------------------------------------------


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two pixel x1, y1, x2, y2 boxes (0 when both are empty)."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]]) -> list[float]:
    """IoU of each ground-truth box with its one-to-one match (0 when unmatched), maximising total IoU."""
    ious = [0.0] * len(truth)
    if not predicted or not truth:
        return ious
    matrix = np.array([[box_iou(p, t) for t in truth] for p in predicted])
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    for r, c in zip(rows, cols, strict=True):
        ious[c] = float(matrix[r, c])
    return ious


def _prefix_classes(prefix: str | None) -> list[str]:
    if not prefix or not prefix.startswith(DETECT_PREFIX + " "):
        return []
    return [c.strip() for c in prefix[len(DETECT_PREFIX) + 1 :].split(";") if c.strip()]


def detection_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return dict.fromkeys(("miou", "acc@0.5", "precision@0.5", "recall@0.5", "invalid_rate"), 0.0)
    iou_sum = 0.0
    n_truth = n_predicted = n_hits = n_segments = n_malformed = 0
    for text, refs in zip(predictions, references, strict=True):
        if len(refs) != 1:
            raise ValueError(f"a detection reference is one JSON string, got {len(refs)}")
        ref = json.loads(refs[0])
        labels = ref["labels"]
        parsed = parse_detections(
            text, ref["width"], ref["height"], allowed_labels=ref.get("classes", labels)
        )
        n_segments += parsed.segments
        n_malformed += parsed.malformed
        n_predicted += len(parsed.detections)
        n_truth += len(labels)
        for label in set(labels):
            truth = [box for box, lab in zip(ref["boxes"], labels, strict=True) if lab == label]
            predicted = [d.box for d in parsed.detections if d.label == label]
            ious = match_boxes(predicted, truth)
            iou_sum += sum(ious)
            n_hits += sum(iou >= IOU_THRESHOLD for iou in ious)
    # Nothing to find and nothing predicted is a perfect answer, not a division by zero.
    recall = n_hits / n_truth if n_truth else float(n_predicted == 0)
    return {
        "miou": iou_sum / n_truth if n_truth else float(n_predicted == 0),
        "acc@0.5": recall,
        "precision@0.5": n_hits / n_predicted if n_predicted else float(n_truth == 0),
        "recall@0.5": recall,
        "invalid_rate": n_malformed / n_segments if n_segments else 0.0,
    }


@dataclass(frozen=True)
class DetectTask(Task):
    """Detection needs the image size to parse, so references carry it as one JSON string."""

    def references(self, record: dict) -> list[str]:
        missing = [k for k in ("boxes", "labels", "width", "height") if k not in record]
        if missing:
            raise KeyError(f"detection record {record.get('id', '?')!r} lacks {missing}")
        labels = list(record["labels"])
        # Classes named in the prompt (absent negatives included) are valid answers, just wrong ones.
        classes = list(dict.fromkeys(_prefix_classes(record.get("prefix")) + labels))
        ref = {
            "boxes": [list(map(float, box)) for box in record["boxes"]],
            "labels": labels,
            "width": record["width"],
            "height": record["height"],
            "classes": classes,
        }
        return [json.dumps(ref)]


DETECT = DetectTask(
    name="detect",
    default_prefix=DETECT_PREFIX,
    reference_field="objects",
    parse=str.strip,
    score=detection_scores,
    max_new_tokens=128,  # about 7 tokens an object (4 locations, label, ` ;`): room for ~16 objects
)
