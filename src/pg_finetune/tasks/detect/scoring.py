"""Object detection: prefix `detect a ; b`, suffix `<locY1><locX1><locY2><locX2> a ; ...`.

Records carry `boxes` (pixel x1, y1, x2, y2), `labels`, `width` and `height`; the
location-token format lives in `pg_finetune.loc`. Parsing needs the image size, so
`parse` only strips the text and `references(record)` packs the ground truth and the
image size into one JSON string, which `score` decodes.

Scoring matches predictions to ground truth one-to-one per image and label. Metrics,
pooled over all ground-truth boxes / predictions:
miou (IoU of each GT box with its match in the matching of largest total IoU, Hungarian;
0 when unmatched); at a threshold t, the hits are a maximum one-to-one matching among the
pairs with IoU >= t (`metrics.boxes.hits_at`: the largest-total-IoU matching can lose a hit):
acc@0.5 (RefCOCO-style: hits / GT boxes; equals recall@0.5), acc@0.75, precision@0.5
(hits / predicted boxes), recall@0.5, and invalid_rate (malformed segments / segments).
IoU and matching live in `pg_finetune.metrics.boxes`; the eval suite adds COCO mAP
(`evaluate_detections(..., with_map=True)`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from pg_finetune.loc import DETECT_PREFIX, ParseResult, detect_prefix, format_detections, parse_detections
from pg_finetune.metrics.boxes import ImageBoxes, box_iou, coco_map, hits_at, match_boxes
from pg_finetune.tasks.base import Task

__all__ = [
    "DETECT", "DetectTask", "DetectionEvaluation", "box_iou", "detection_reference", "detection_scores",
    "evaluate_detections", "make_prefix", "make_suffix", "match_boxes", "shuffle_objects",
]  # fmt: skip

IOU_THRESHOLDS = (0.5, 0.75)  # acc@t for each; precision and recall at the first
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


def prefix_classes(prefix: str | None) -> list[str]:
    if not prefix or not prefix.startswith(DETECT_PREFIX + " "):
        return []
    return [c.strip() for c in prefix[len(DETECT_PREFIX) + 1 :].split(";") if c.strip()]


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def detection_reference(record: dict) -> dict:
    """`{"boxes", "labels", "width", "height", "classes"}` from a detection record, checked.

    Raises KeyError naming a missing key, ValueError naming a bad value (a box that is not four
    numbers x1 <= x2, y1 <= y2; boxes and labels of different lengths; a size that is not > 0).
    `classes` are the classes named in the prompt (absent negatives included) plus the labels.
    """
    name = record.get("id", "?")
    missing = [k for k in ("boxes", "labels", "width", "height") if k not in record]
    if missing:
        raise KeyError(f"detection record {name!r} lacks {missing}")
    boxes, labels = record["boxes"], record["labels"]
    if not isinstance(boxes, list) or not isinstance(labels, list):
        raise ValueError(f"detection record {name!r}: 'boxes' and 'labels' must be lists")
    if len(boxes) != len(labels):
        raise ValueError(f"detection record {name!r}: {len(boxes)} boxes but {len(labels)} labels")
    for box in boxes:
        ok = isinstance(box, list | tuple) and len(box) == 4 and all(_is_number(v) for v in box)
        if not ok or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(
                f"detection record {name!r}: box {box!r} is not pixel [x1, y1, x2, y2] with x1 <= x2, y1 <= y2"
            )
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(f"detection record {name!r}: 'labels' must be non-empty strings, got {labels!r}")
    for key in ("width", "height"):
        if not _is_number(record[key]) or record[key] <= 0:
            raise ValueError(f"detection record {name!r}: '{key}' must be a positive number, got {record[key]!r}")
    return {
        "boxes": [[float(v) for v in box] for box in boxes],
        "labels": list(labels),
        "width": record["width"],
        "height": record["height"],
        # Classes named in the prompt (absent negatives included) are valid answers, just wrong ones.
        "classes": list(dict.fromkeys(prefix_classes(record.get("prefix")) + list(labels))),
    }


@dataclass
class ImageDetections:
    """One image's parsed output and its matching: for reports and drawings."""

    parsed: ParseResult
    truth_ious: list[float]  # IoU of each ground-truth box with its match, 0 when unmatched


@dataclass
class DetectionEvaluation:
    metrics: dict[str, float]
    images: list[ImageDetections]


def evaluate_detections(
    texts: Sequence[str], references: Sequence[dict], *, with_map: bool = False, score_by_order: bool = True
) -> DetectionEvaluation:
    """Parse each output against its `detection_reference` dict, match per image and label, pool the metrics.

    Keys: miou, acc@0.5, acc@0.75, precision@0.5, recall@0.5, invalid_rate, and with `with_map`
    map, map50, map75 (pycocotools). Generated boxes carry no confidence: for mAP the k-th box of
    an output (k = 0, 1, ...) gets score 1 / (k + 1) when `score_by_order`, else 1.0 for all.
    """
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} predictions for {len(references)} references")
    keys = ("miou", "acc@0.5", "acc@0.75", "precision@0.5", "recall@0.5", "invalid_rate")
    if not texts:
        zeros = dict.fromkeys(keys + (("map", "map50", "map75") if with_map else ()), 0.0)
        return DetectionEvaluation(zeros, [])
    all_ious: list[float] = []
    n_predicted = n_segments = n_malformed = 0
    hits = dict.fromkeys(IOU_THRESHOLDS, 0)
    images: list[ImageDetections] = []
    map_inputs: list[ImageBoxes] = []
    for text, ref in zip(texts, references, strict=True):
        labels = ref["labels"]
        parsed = parse_detections(text, ref["width"], ref["height"], allowed_labels=ref.get("classes", labels))
        n_segments += parsed.segments
        n_malformed += parsed.malformed
        n_predicted += len(parsed.detections)
        truth_ious = [0.0] * len(labels)
        for label in set(labels):
            where = [k for k, lab in enumerate(labels) if lab == label]
            predicted = [d.box for d in parsed.detections if d.label == label]
            truth = [ref["boxes"][k] for k in where]
            for k, iou in zip(where, match_boxes(predicted, truth), strict=True):
                truth_ious[k] = iou
            for t in IOU_THRESHOLDS:
                hits[t] += hits_at(predicted, truth, t)
        all_ious += truth_ious
        images.append(ImageDetections(parsed, truth_ious))
        if with_map:
            dets = parsed.detections
            map_inputs.append(
                ImageBoxes(
                    truth_boxes=ref["boxes"], truth_labels=labels,
                    predicted_boxes=[d.box for d in dets], predicted_labels=[d.label for d in dets],
                    scores=[1 / (k + 1) if score_by_order else 1.0 for k in range(len(dets))],
                )
            )  # fmt: skip
    n_truth = len(all_ious)
    # Nothing to find and nothing predicted is a perfect answer, not a division by zero.
    nothing = float(n_predicted == 0)
    recall = hits[0.5] / n_truth if n_truth else nothing
    metrics = {
        "miou": sum(all_ious) / n_truth if n_truth else nothing,
        "acc@0.5": recall,
        "acc@0.75": hits[0.75] / n_truth if n_truth else nothing,
        "precision@0.5": hits[0.5] / n_predicted if n_predicted else float(n_truth == 0),
        "recall@0.5": recall,
        "invalid_rate": n_malformed / n_segments if n_segments else 0.0,
    }
    if with_map:
        metrics.update(coco_map(map_inputs))
    return DetectionEvaluation(metrics, images)


def detection_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The task's metric: references are the one-JSON-string lists that `DETECT.references` makes."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    refs = []
    for ref in references:
        if len(ref) != 1:
            raise ValueError(f"a detection reference is one JSON string, got {len(ref)}")
        refs.append(json.loads(ref[0]))
    return evaluate_detections(predictions, refs).metrics


@dataclass(frozen=True)
class DetectTask(Task):
    """Detection needs the image size to parse, so references carry it as one JSON string."""

    def references(self, record: dict) -> list[str]:
        return [json.dumps(detection_reference(record))]


DETECT = DetectTask(
    name="detect",
    default_prefix=DETECT_PREFIX,
    reference_field="objects",
    parse=str.strip,
    score=detection_scores,
    max_new_tokens=128,  # about 7 tokens an object (4 locations, label, ` ;`): room for ~16 objects
)
