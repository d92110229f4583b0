"""`refexp`: referring expressions (RefCOCO-style): one box per prompt, mIoU and box accuracy.

    python -m eval.run --benchmark refexp --data data/refcoco_val.jsonl --model runs/x/final

Data: records with `image`, `prefix` (`detect the man on the left`; else built from an
`expression` field as `detect {expression}`), one box as `box` [x1, y1, x2, y2] or `boxes`
[[x1, y1, x2, y2]] (pixels), `width`, `height`. References: the same fields plus `id`.
The first well-formed `<loc>x4 label` segment of the output is the prediction, whatever its label
(the label is the expression, which the model may shorten). Metrics: miou (IoU with the true box,
0 without a valid box), acc@0.5 and acc@0.75 (IoU >= t), invalid_rate (outputs without a valid box).
Also writes detections.html with the predicted (red) and true (green) box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from eval.benchmarks.base import Benchmark, Drawn, Scored, ScoreOptions
from pg_finetune.loc import parse_detections
from pg_finetune.metrics.boxes import accuracy_at, box_iou


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def reference(record: dict) -> dict:
    if "box" in record:
        box = record["box"]
    elif "boxes" in record:
        boxes = record["boxes"]
        if not isinstance(boxes, list) or len(boxes) != 1:
            raise ValueError(f"'boxes' must hold exactly one box for refexp, got {boxes!r}")
        box = boxes[0]
    else:
        raise KeyError("no 'box' (or one-box 'boxes') field")
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)) or box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"box {box!r} is not pixel [x1, y1, x2, y2] with x1 <= x2, y1 <= y2")
    for key in ("width", "height"):
        if key not in record:
            raise KeyError(f"no {key!r} field")
        if not _number(record[key]) or record[key] <= 0:
            raise ValueError(f"{key!r} must be a positive number, got {record[key]!r}")
    return {"box": [float(v) for v in box], "width": record["width"], "height": record["height"]}


def score(predictions: Sequence[str], references: Sequence[dict], options: ScoreOptions) -> Scored:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    ious, problems, drawn = [], {}, {}
    for k, (text, ref) in enumerate(zip(predictions, references, strict=True)):
        parsed = parse_detections(text, ref["width"], ref["height"])
        first = parsed.detections[0] if parsed.detections else None
        iou = box_iou(first.box, ref["box"]) if first else 0.0
        ious.append(iou)
        if first is None:
            problems[k] = ["no valid box in the output" + (f" ({parsed.problems[0]})" if parsed.problems else "")]
        elif len(parsed.detections) > 1:
            problems[k] = [f"{len(parsed.detections)} boxes in the output; the first is scored"]
        drawn[k] = Drawn(
            truth=[(ref["box"], "truth", f"IoU {iou:.2f}")], predicted=[(first.box, first.label, "")] if first else []
        )
    n = len(ious)
    metrics = {
        "miou": sum(ious) / n if n else 0.0,
        "acc@0.5": accuracy_at(ious, 0.5),
        "acc@0.75": accuracy_at(ious, 0.75),
        "invalid_rate": sum(1 for k in range(n) if not drawn[k].predicted) / n if n else 0.0,
    }
    return Scored(metrics, problems, drawn)


BENCHMARK = Benchmark(
    name="refexp",
    description="referring expressions, one box per prompt: mIoU, acc@0.5",
    task="detect",
    source=None,
    split="validation",
    references_help='{"id": ..., "box": [x1, y1, x2, y2] (or "boxes": [[...]]), "width": W, "height": H}',
    reference=reference,
    score=score,
    prefix="detect {expression}",
    draw=True,
)
