"""The `refexp` metric of the detect task: referring expressions (RefCOCO-style), one box per prompt.

    python -m eval.run --benchmark refexp --data data/refcoco_val.jsonl --model runs/x/final

Data: records with `image`, `prefix` (`detect the man on the left`; else built from an
`expression` field as `detect {expression}`), one box as `box` [x1, y1, x2, y2] or `boxes`
[[x1, y1, x2, y2]] (pixels), `width`, `height`. References: the same fields plus `id`.
The first well-formed `<loc>x4 label` segment of the output is the prediction, whatever its label
(the label is the expression, which the model may shorten). Metrics: miou (IoU with the true box,
0 without a valid box), acc@0.5 and acc@0.75 (IoU >= t), invalid_rate (outputs without a valid box).
"""

from __future__ import annotations

from collections.abc import Sequence

from pg_finetune.loc import parse_detections
from pg_finetune.metrics.boxes import accuracy_at, box_iou
from pg_finetune.tasks.base import Drawn, Metric, Scored, ScoreOptions, check_lengths
from pg_finetune.tasks.detect.scoring import check_box, check_size


def reference(record: dict) -> dict:
    name = f"refexp record {record.get('id', '?')!r}"
    if "box" in record:
        box = record["box"]
    elif "boxes" in record:
        boxes = record["boxes"]
        if not isinstance(boxes, list) or len(boxes) != 1:
            raise ValueError(f"{name}: 'boxes' must hold exactly one box for refexp, got {boxes!r}")
        box = boxes[0]
    else:
        raise KeyError(f"{name}: no 'box' (or one-box 'boxes') field")
    width, height = check_size(record, name)
    return {"box": check_box(box, name), "width": width, "height": height}


def score(predictions: Sequence[str], references: Sequence[dict], options: ScoreOptions) -> Scored:
    check_lengths(predictions, references)
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


def describe_reference(reference: dict) -> str:
    return f"({', '.join(f'{v:g}' for v in reference['box'])})\n{reference['width']} x {reference['height']} px"


REFEXP = Metric(
    name="refexp",
    reference=reference,
    score=score,
    example_label="IoU",
    references_help='{"id": ..., "box": [x1, y1, x2, y2] (or "boxes": [[...]]), "width": W, "height": H}',
)
