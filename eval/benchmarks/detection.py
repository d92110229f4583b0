"""`detection`: any detection data: mIoU, box accuracy at IoU 0.5 / 0.75, COCO mAP, invalid outputs.

    python -m eval.run --benchmark detection --data data/coco_det/val.jsonl --model runs/x/final
    python -m eval.run --benchmark detection --data builtin:easyvqa-detect --split test --model tiny
    python -m eval.run --benchmark detection --predictions preds.jsonl --references refs.jsonl

Data: JSONL records with `image`, `boxes` (pixel x1, y1, x2, y2), `labels`, `width`, `height` and
optionally `prefix` (`detect a ; b`; when absent, built from the record's labels), e.g. the output of
`data_prep/create_od_dataset.py`. References: the same fields plus `id`.

Metrics (`pg_finetune.tasks.detect.evaluate_detections`), pooled over images:
- miou: mean over ground-truth boxes of the IoU with its match (Hungarian per image and label;
  an unmatched box counts 0); acc@0.5, acc@0.75: fraction of ground-truth boxes matched at
  IoU >= 0.5 / 0.75; precision@0.5, recall@0.5; invalid_rate: malformed segments / segments;
- map, map50, map75: COCO AP@[.50:.95], AP@.50, AP@.75 by pycocotools (`COCOeval` on a `COCO`
  built in memory). Generated boxes have no confidence, and AP needs a ranking: by default the
  k-th box of an output (k = 0, 1, ...) gets score 1 / (k + 1), i.e. the model is taken to emit
  the boxes it is surest of first (`--detection-scores order`); `--detection-scores constant`
  gives every box 1.0, which leaves ties to pycocotools' stable sort (image order).
Also writes detections.html: predicted (red) and true (green) boxes on a sample of images.
"""

from __future__ import annotations

from collections.abc import Sequence

from eval.benchmarks.base import Benchmark, Drawn, Scored, ScoreOptions
from pg_finetune.loc import DETECT_PREFIX, detect_prefix
from pg_finetune.tasks.detect import detection_reference, evaluate_detections


def reference(record: dict) -> dict:
    return detection_reference(record)


def prompt(record: dict) -> str:
    """The record's prefix; a bare `detect` (no classes: the default) becomes `detect <its labels>`."""
    prefix = record.get("prefix")
    if (prefix is None or prefix.strip() == DETECT_PREFIX) and record.get("labels"):
        return detect_prefix(record["labels"])
    return prefix or DETECT_PREFIX


def score(predictions: Sequence[str], references: Sequence[dict], options: ScoreOptions) -> Scored:
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


BENCHMARK = Benchmark(
    name="detection",
    description="any detection JSONL (--data): mIoU, acc@0.5/0.75, COCO mAP, invalid rate",
    task="detect",
    source=None,
    split="validation",
    references_help='{"id": ..., "boxes": [[x1, y1, x2, y2], ...], "labels": [...], "width": W, "height": H}',
    reference=reference,
    score=score,
    prompt=prompt,
    draw=True,
)
