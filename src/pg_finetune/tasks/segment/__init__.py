"""Referring segmentation: prefix `segment {expression}`, suffix `<locY1><locX1><locY2><locX2>` + 16 `<segNNN>`.

The 16 seg tokens are codes of a mask VQ-VAE (big_vision's `vae-oid.npz`, or a small one trained
offline here); a target is made from a full-image mask with `mask_to_suffix(mask, codec)`, and an
output is read back with `suffix_to_mask(text, width, height, codec)`. Everything lives here:
- `codec`: the mask VQ-VAE in torch, reading and writing the vae-oid.npz layout (imports torch);
- `masks`: mask <-> suffix (big_vision's `refcoco_mask2str` and its evaluator's decoding), RLE/PNG;
- `parse`: the output grammar and big_vision's validity rules;
- `scoring`: references, miou / boxacc@0.5 / boxacc@0.75 / invalid_rate, which codec decodes;
- `shapes`, `train_codec`: generated shape masks and the offline codec
  (`python -m pg_finetune.tasks.segment.train_codec`).
This module imports neither torch nor pycocotools: the task registry is read before torch is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

from pg_finetune.tasks.base import Metric, Task
from pg_finetune.tasks.segment.parse import parse_segmentation

SEGMENT_PREFIX = "segment"

__all__ = ["SEGMENT", "SEGMENTATION", "mask_to_suffix", "parse_segmentation", "suffix_to_mask"]


def _lazy(module: str, name: str) -> Any:
    """`module.name`, imported on first call: scoring and masks need numpy and PIL, and the task registry
    is imported to check a recipe before any of them."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"pg_finetune.tasks.segment.{module}"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


mask_to_suffix = _lazy("masks", "mask_to_suffix")
suffix_to_mask = _lazy("masks", "suffix_to_mask")


def record_prompt(record: dict) -> str:
    """The record's `prefix`, else `segment {expression}` from an `expression` field, else `segment`."""
    if record.get("prefix"):
        return record["prefix"]
    expression = " ".join(str(record.get("expression") or "").split())
    return f"{SEGMENT_PREFIX} {expression}" if expression else SEGMENT_PREFIX


SEGMENTATION = Metric(
    name="segmentation",
    reference=_lazy("scoring", "reference"),
    score=_lazy("scoring", "score"),
    each=_lazy("scoring", "each"),
    settings=_lazy("scoring", "settings"),
    example_label="mask IoU",
    references_help='{"id": ..., "mask": COCO RLE {"size": [H, W], "counts": ...} or a PNG path, "width": W, '
    '"height": H, "box": [x1, y1, x2, y2] (optional: the mask\'s extent), "codec": .npz (optional)}',
)

SEGMENT = Task(
    name="segment",
    default_prefix=SEGMENT_PREFIX,
    metric=SEGMENTATION,
    max_new_tokens=32,  # 4 loc + 16 seg tokens, and room for the label some checkpoints write after them
    prompt=record_prompt,
    describe_reference=_lazy("scoring", "describe_reference"),
)
