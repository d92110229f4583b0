"""Detection scoring: references checked, outputs parsed, matched per image and label, pooled.

References are a record's `boxes` (pixel x1, y1, x2, y2), `labels`, `width`, `height` and the
classes its prompt names (`detection_reference`). Scoring matches predictions to ground truth
one-to-one per image and label. Metrics, pooled over all ground-truth boxes / predictions:
miou (IoU of each GT box with its match in the matching of largest total IoU, Hungarian;
0 when unmatched); at a threshold t, the hits are a maximum one-to-one matching among the
pairs with IoU >= t (`metrics.boxes.hits_at`: the largest-total-IoU matching can lose a hit):
acc@0.5 (RefCOCO-style: hits / GT boxes; equals recall@0.5), acc@0.75, precision@0.5
(hits / predicted boxes), recall@0.5, invalid_rate (malformed segments / segments), and
map, map50, map75 from pycocotools.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pg_finetune.loc import ParseResult, parse_detections
from pg_finetune.metrics.boxes import ImageBoxes, coco_map, hits_at, match_boxes
from pg_finetune.tasks.base import Drawn, Scored, ScoreOptions, check_lengths
from pg_finetune.tasks.detect.targets import prompt_classes

IOU_THRESHOLDS = (0.5, 0.75)  # acc@t for each; precision and recall at the first


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_box(box: object, name: str) -> list[float]:
    """`box` as four floats if it is pixel [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, else ValueError."""
    ok = isinstance(box, list | tuple) and len(box) == 4 and all(_is_number(v) for v in box)
    if not ok or box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{name}: box {box!r} is not pixel [x1, y1, x2, y2] with x1 <= x2, y1 <= y2")
    return [float(v) for v in box]


def check_size(record: dict, name: str) -> tuple[float, float]:
    """(width, height) of the image, each a positive number; KeyError / ValueError naming the key."""
    for key in ("width", "height"):
        if key not in record:
            raise KeyError(f"{name}: no {key!r} field")
        if not _is_number(record[key]) or record[key] <= 0:
            raise ValueError(f"{name}: '{key}' must be a positive number, got {record[key]!r}")
    return record["width"], record["height"]


def detection_reference(record: dict) -> dict:
    """`{"boxes", "labels", "width", "height", "classes"}` from a detection record, checked.

    Raises KeyError naming a missing key, ValueError naming a bad value (a box that is not four
    numbers x1 <= x2, y1 <= y2; boxes and labels of different lengths; a size that is not > 0).
    `classes` are the classes named in the prompt (absent negatives included) plus the labels.
    """
    name = f"detection record {record.get('id', '?')!r}"
    missing = [k for k in ("boxes", "labels", "width", "height") if k not in record]
    if missing:
        raise KeyError(f"{name} lacks {missing}")
    boxes, labels = record["boxes"], record["labels"]
    if not isinstance(boxes, list) or not isinstance(labels, list):
        raise ValueError(f"{name}: 'boxes' and 'labels' must be lists")
    if len(boxes) != len(labels):
        raise ValueError(f"{name}: {len(boxes)} boxes but {len(labels)} labels")
    checked = [check_box(box, name) for box in boxes]
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(f"{name}: 'labels' must be non-empty strings, got {labels!r}")
    width, height = check_size(record, name)
    return {
        "boxes": checked,
        "labels": list(labels),
        "width": width,
        "height": height,
        # Classes named in the prompt (absent negatives included) are valid answers, just wrong ones.
        "classes": list(dict.fromkeys(prompt_classes(record.get("prefix")) + list(labels))),
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
    check_lengths(texts, references)
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


def score(predictions: Sequence[str], references: Sequence[dict], options: ScoreOptions) -> Scored:
    """The detect task's metric, with each image's malformed segments and boxes to draw."""
    result = evaluate_detections(
        predictions, references, with_map=True, score_by_order=options.detection_scores == "order"
    )
    problems, drawn = {}, {}
    for k, (image, ref) in enumerate(zip(result.images, references, strict=True)):
        if image.parsed.malformed:
            problems[k] = [f"malformed detection: {p}" for p in image.parsed.problems]
        drawn[k] = Drawn(
            truth=[(box, lab, f"IoU {iou:.2f}") for box, lab, iou in zip(ref["boxes"], ref["labels"], image.truth_ious, strict=True)],
            predicted=[(d.box, d.label, "") for d in image.parsed.detections],
        )  # fmt: skip
    return Scored(result.metrics, problems, drawn)


def describe_reference(reference: dict) -> str:
    lines = [
        f"{label}: ({', '.join(f'{v:g}' for v in box)})"
        for box, label in zip(reference["boxes"], reference["labels"], strict=True)
    ]
    return "\n".join(lines or ["(no objects)"]) + f"\n{reference['width']} x {reference['height']} px"
