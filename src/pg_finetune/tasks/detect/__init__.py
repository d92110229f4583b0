"""Object detection: prefix `detect a ; b`, suffix `<locY1><locX1><locY2><locX2> a ; ...`.

Everything about the task lives in this package:
- `targets`: prompts and targets from records (`make_prefix`, `make_suffix`, object shuffling)
  and the one reader of a `detect a ; b` prompt (`prompt_classes`);
- `scoring`: references checked, outputs parsed, matched and pooled (mIoU, acc@t, precision,
  recall, invalid rate, COCO mAP); `refexp`: the one-box-per-prompt metric (RefCOCO);
- `augment`: per-epoch object order and negative classes for training (imports torch);
- `constrained`: decoding that only writes the grammar (imports torch and transformers).
The location-token codec (1024 bins, y before x) is `pg_finetune.loc`, shared with segmentation.
"""

from __future__ import annotations

from typing import Any

from pg_finetune.loc import DETECT_PREFIX
from pg_finetune.tasks.base import Metric, Task
from pg_finetune.tasks.detect import refexp, scoring
from pg_finetune.tasks.detect.scoring import (
    DetectionEvaluation,
    ImageDetections,
    detection_reference,
    evaluate_detections,
)
from pg_finetune.tasks.detect.targets import (
    make_prefix,
    make_suffix,
    prompt_classes,
    record_prompt,
    shuffle_objects,
    target_problem,
)

__all__ = [
    "DETECT", "DetectionEvaluation", "ImageDetections", "detection_reference", "evaluate_detections",
    "make_prefix", "make_suffix", "prompt_classes", "shuffle_objects", "target_problem",
]  # fmt: skip


def augment(dataset: Any, config: Any, seed: int) -> tuple[Any, list]:
    """Per-epoch object order (`task.shuffle_objects`, on unless false) and `task.negatives`."""
    shuffle = config.shuffle_objects is not False
    if not shuffle and config.negatives <= 0:
        return dataset, []
    from pg_finetune.tasks.detect.augment import DetectionAugment, EpochCallback, collect_classes

    wrapped = DetectionAugment(
        dataset, seed=seed, shuffle_objects=shuffle, negatives=config.negatives, all_classes=collect_classes(dataset)
    )
    return wrapped, [EpochCallback(wrapped)]


DETECTION = Metric(
    name="detection",
    reference=detection_reference,
    score=scoring.score,
    example_label="mIoU",
    references_help='{"id": ..., "boxes": [[x1, y1, x2, y2], ...], "labels": [...], "width": W, "height": H}',
)


def _describe(reference: dict) -> str:
    return refexp.describe_reference(reference) if "box" in reference else scoring.describe_reference(reference)


DETECT = Task(
    name="detect",
    default_prefix=DETECT_PREFIX,
    metric=DETECTION,
    alternatives=(refexp.REFEXP,),
    max_new_tokens=128,  # about 7 tokens an object (4 locations, label, ` ;`): room for ~16 objects
    prompt=record_prompt,
    describe_reference=_describe,
    augment=augment,
    check_target=target_problem,
)
