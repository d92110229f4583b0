"""Box metrics: IoU, one-to-one matching (Hungarian, and greedy for comparison), and COCO mAP.

Boxes are pixel (x1, y1, x2, y2). Two matchings, each for its own number:
- `match_boxes` pairs predictions with ground truth so that the total IoU is largest
  (`scipy.optimize.linear_sum_assignment`): the IoU each ground-truth box gets, for mIoU; a greedy
  match (best pair first) can pair a prediction with the wrong box and lose a match, see
  `tests/test_metrics.py`.
- `hits_at` counts hits at a threshold t: the largest one-to-one matching among the pairs with
  IoU >= t, for acc@t, precision@t and recall@t.

`coco_map` runs pycocotools' `COCOeval` on a `COCO` object built in memory (no files), with
the standard settings: IoU thresholds 0.50:0.05:0.95, 101 recall points, up to 100 detections
per image, area range "all". Categories without any ground-truth box are left out of the mean,
as COCOeval does. Generated detections carry no confidence, so the caller gives each box a
score (see `pg_finetune.tasks.detect.scoring` for the choice made there).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# numpy and scipy are imported where used: the task registry imports this module, and a recipe is
# checked against that registry before any heavy import.

Box = Sequence[float]


def box_iou(a: Box, b: Box) -> float:
    """IoU of two pixel x1, y1, x2, y2 boxes (0 when both are empty)."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou_matrix(predicted: Sequence[Box], truth: Sequence[Box]) -> np.ndarray:
    """IoU of every (prediction, ground truth) pair: shape (len(predicted), len(truth))."""
    import numpy as np

    return np.array([[box_iou(p, t) for t in truth] for p in predicted], dtype=float).reshape(
        len(predicted), len(truth)
    )


def match_boxes(predicted: Sequence[Box], truth: Sequence[Box]) -> list[float]:
    """IoU of each ground-truth box with its one-to-one match (0 when unmatched), maximising total IoU."""
    ious = [0.0] * len(truth)
    if not predicted or not truth:
        return ious
    from scipy.optimize import linear_sum_assignment

    matrix = iou_matrix(predicted, truth)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    for r, c in zip(rows, cols, strict=True):
        ious[c] = float(matrix[r, c])
    return ious


def hits_at(predicted: Sequence[Box], truth: Sequence[Box], threshold: float) -> int:
    """Largest number of one-to-one (prediction, ground truth) pairs with IoU >= threshold.

    A maximum matching among the pairs that clear the threshold, found on its own: the matching
    that maximises total IoU (`match_boxes`) can spend a box on a low-IoU pair and lose a hit
    (IoUs P1-G1 0.4, P2-G1 0.54, P2-G2 0.18: the largest total pairs P2 with G2, no pair >= 0.5).
    """
    if not predicted or not truth:
        return 0
    from scipy.optimize import linear_sum_assignment

    hits = (iou_matrix(predicted, truth) >= threshold).astype(float)
    rows, cols = linear_sum_assignment(hits, maximize=True)
    return int(hits[rows, cols].sum())


def greedy_match(predicted: Sequence[Box], truth: Sequence[Box]) -> list[float]:
    """The greedy alternative (highest-IoU pair first, repeatedly), kept to show what Hungarian fixes."""
    import numpy as np

    ious = [0.0] * len(truth)
    matrix = iou_matrix(predicted, truth)
    while matrix.size and matrix.max() > 0:
        r, c = np.unravel_index(matrix.argmax(), matrix.shape)
        ious[c] = float(matrix[r, c])
        matrix[r, :] = -1
        matrix[:, c] = -1
    return ious


def accuracy_at(ious: Sequence[float], threshold: float) -> float:
    """Fraction of ground-truth boxes whose matched IoU is >= threshold (0 for none)."""
    return sum(iou >= threshold for iou in ious) / len(ious) if ious else 0.0


@dataclass
class ImageBoxes:
    """One image's ground truth and predictions, for `coco_map`."""

    truth_boxes: list[Box] = field(default_factory=list)
    truth_labels: list[str] = field(default_factory=list)
    predicted_boxes: list[Box] = field(default_factory=list)
    predicted_labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def _xywh(box: Box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_map(images: Sequence[ImageBoxes]) -> dict[str, float]:
    """{"map": AP@[.50:.95], "map50": AP@.50, "map75": AP@.75} from pycocotools, in 0..1.

    With no ground-truth box at all the values are 1.0 when nothing was predicted and 0.0
    otherwise (COCOeval itself answers -1); with ground truth but no prediction, 0.0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    n_truth = sum(len(im.truth_boxes) for im in images)
    n_predicted = sum(len(im.predicted_boxes) for im in images)
    if n_truth == 0 or n_predicted == 0:
        value = float(n_truth == 0 and n_predicted == 0)
        return {"map": value, "map50": value, "map75": value}
    names = sorted({lab for im in images for lab in (*im.truth_labels, *im.predicted_labels)})
    category = {name: k + 1 for k, name in enumerate(names)}
    gt_annotations, detections = [], []
    for image_id, im in enumerate(images, start=1):
        for box, label in zip(im.truth_boxes, im.truth_labels, strict=True):
            xywh = _xywh(box)
            # ids start at 1: COCOeval takes a matched id of 0 for "unmatched".
            gt_annotations.append(
                {"id": len(gt_annotations) + 1, "image_id": image_id, "category_id": category[label],
                 "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0}
            )  # fmt: skip
        for box, label, score in zip(im.predicted_boxes, im.predicted_labels, im.scores, strict=True):
            detections.append(
                {"image_id": image_id, "category_id": category[label], "bbox": _xywh(box), "score": float(score)}
            )
    truth = COCO()
    truth.dataset = {
        "images": [{"id": k} for k in range(1, len(images) + 1)],
        "annotations": gt_annotations,
        "categories": [{"id": cid, "name": name} for name, cid in category.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and a summary table
        truth.createIndex()
        predicted = truth.loadRes(detections)
        evaluator = COCOeval(truth, predicted, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats  # [AP, AP50, AP75, ...]; -1 where undefined
    return {"map": max(float(stats[0]), 0.0), "map50": max(float(stats[1]), 0.0), "map75": max(float(stats[2]), 0.0)}
