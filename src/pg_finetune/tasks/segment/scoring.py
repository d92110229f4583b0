"""Segmentation scoring, as big_vision's RefCOCO segmentation evaluator
(`evaluators/proj/paligemma/transfers/segmentation.py`), one object per prompt.

References: `{"box": [x1, y1, x2, y2] (pixels; default: the mask's extent), "mask": COCO RLE dict or
PNG path, "width", "height", "codec": optional .npz path}`. Per example:
- box IoU in normalized coordinates: predicted bins / 1023 against the true box / image size;
- mask IoU in pixels: the decoded 64x64 logits resized into the predicted box (edges
  `int(bin / 1023 * size)`, PIL BILINEAR), > 0, against the full-image true mask;
- an invalid output (`parse.parse_segmentation`), or a box that is empty once in whole pixels,
  has mask IoU 0 and counts in invalid_rate; an invalid output has box IoU 0 too.
Metrics: miou (mean mask IoU), boxacc@0.5 and boxacc@0.75 (box IoU >= t), invalid_rate.

Which codec decodes the seg tokens (`codec_path`): the reference's `codec`, else the file named by
`$PG_FINETUNE_MASK_CODEC`, else big_vision's `vae-oid.npz` in the cache dir, else the tiny codec
there (`train_codec`). The model must have been trained on the same codec's tokens.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pg_finetune.loc import decode_box
from pg_finetune.tasks.base import Drawn, Scored, ScoreOptions, check_lengths
from pg_finetune.tasks.detect.scoring import check_box, check_size
from pg_finetune.tasks.segment.masks import (
    box_pixels,
    mask_box,
    mask_rle,
    paste_logits,
    read_mask,
    rle_to_mask,
)
from pg_finetune.tasks.segment.parse import parse_segmentation

CODEC_ENV = "PG_FINETUNE_MASK_CODEC"
VAE_OID_FILE = "vae-oid.npz"
BOX_THRESHOLDS = (0.5, 0.75)


# ---- the codec --------------------------------------------------------------------------------------------


def default_codec_path() -> Path:
    """$PG_FINETUNE_MASK_CODEC, else `vae-oid.npz` in the cache dir when present, else the tiny codec's path."""
    from pg_finetune.tasks.segment.train_codec import TINY_FILE, cache_dir

    if os.environ.get(CODEC_ENV):
        return Path(os.environ[CODEC_ENV])
    vae_oid = cache_dir() / VAE_OID_FILE
    return vae_oid if vae_oid.exists() else cache_dir() / TINY_FILE


def codec_path(reference: dict | None = None) -> Path:
    return Path(reference["codec"]) if reference and reference.get("codec") else default_codec_path()


def missing_codec_message(path: Path) -> str:
    return (
        f"mask codec {path} not found: put big_vision's vae-oid.npz there (or point ${CODEC_ENV} at it), "
        "or train the tiny offline codec: python -m pg_finetune.tasks.segment.train_codec"
    )


@functools.lru_cache(maxsize=4)
def _load_codec(path: str, mtime: float) -> Any:
    from pg_finetune.tasks.segment.codec import MaskCodec

    return MaskCodec.from_npz(path)


def load_codec(path: str | Path) -> Any:
    """The MaskCodec in `path` (cached while the file is unchanged); FileNotFoundError saying how to get one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing_codec_message(path))
    return _load_codec(str(path), path.stat().st_mtime)


def settings(options: ScoreOptions) -> dict[str, Any]:
    """For report.json: which codec decodes references without their own `codec` (path and a file digest)."""
    path = default_codec_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
    return {"mask_codec": str(path), "mask_codec_sha256": digest}


# ---- references -------------------------------------------------------------------------------------------


def reference(record: dict) -> dict:
    """The checked reference of a record; the mask as compressed RLE (a PNG is read here, once)."""
    name = f"segment record {record.get('id', '?')!r}"
    if "mask" not in record:
        raise KeyError(f"{name}: no 'mask' field (a COCO RLE dict or a PNG path)")
    width, height = check_size(record, name)
    try:
        mask = read_mask(record["mask"])
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if mask.shape != (int(height), int(width)):
        raise ValueError(
            f"{name}: mask is {mask.shape[1]} x {mask.shape[0]} px, the record says {width} x {height}"
        )
    if not mask.any():
        raise ValueError(f"{name}: the mask is empty")
    box = check_box(record["box"], name) if "box" in record else [float(v) for v in mask_box(mask)]
    codec = codec_path(record)
    if not codec.is_file():  # checked here so that eval.run reports it by id instead of failing mid-score
        raise ValueError(f"{name}: {missing_codec_message(codec)}")
    ref = {"box": box, "width": int(width), "height": int(height), "mask": mask_rle(mask)}
    if record.get("codec"):
        ref["codec"] = str(record["codec"])
    return ref


def describe_reference(reference: dict) -> str:
    box = ", ".join(f"{v:g}" for v in reference["box"])
    area = int(rle_to_mask(reference["mask"]).sum())
    return f"box ({box}), mask of {area} px\n{reference['width']} x {reference['height']} px"


# ---- scoring ----------------------------------------------------------------------------------------------


def _box_iou_normalized(bins: Sequence[int], ref: dict) -> float:
    """big_vision's box IoU: (y1, x1, y2, x2) in [0, 1], predicted bins / 1023, true box / image size."""
    y1, x1, y2, x2 = (b / 1023 for b in bins)
    bx1, by1, bx2, by2 = ref["box"]
    gy1, gx1, gy2, gx2 = by1 / ref["height"], bx1 / ref["width"], by2 / ref["height"], bx2 / ref["width"]

    def area(a: float, b: float, c: float, d: float) -> float:
        return max(d - b, 0.0) * max(c - a, 0.0)

    inter = area(max(y1, gy1), max(x1, gx1), min(y2, gy2), min(x2, gx2))
    union = area(y1, x1, y2, x2) + area(gy1, gx1, gy2, gx2) - inter
    return inter / union if union > 0 else 0.0


def evaluate(
    predictions: Sequence[str], references: Sequence[dict]
) -> tuple[list[dict], dict[int, list[str]]]:
    """Per example {"mask_iou", "box_iou", "valid", "bins", "mask" (the decoded mask as COCO RLE, when
    valid)}, and notes by example index."""
    check_lengths(predictions, references)
    parsed = [parse_segmentation(text) for text in predictions]
    results: list[dict] = []
    problems: dict[int, list[str]] = {}
    to_decode: dict[Path, list[int]] = {}
    for k, (p, ref) in enumerate(zip(parsed, references, strict=True)):
        result = {"mask_iou": 0.0, "box_iou": 0.0, "valid": False, "bins": None}
        results.append(result)
        if p.problem is not None:
            problems[k] = [f"invalid output: {p.problem}"]
            continue
        result["bins"] = p.bins
        result["box_iou"] = _box_iou_normalized(p.bins, ref)
        x1, y1, x2, y2 = box_pixels(p.bins, ref["width"], ref["height"])
        if x2 <= x1 or y2 <= y1:  # can still happen after int(), as in big_vision
            problems[k] = [f"the box is empty in whole pixels ({x1}, {y1}, {x2}, {y2})"]
            continue
        result["valid"] = True
        if p.notes:
            problems[k] = list(p.notes)
        to_decode.setdefault(codec_path(ref), []).append(k)
    for path, ks in to_decode.items():
        codec = load_codec(path)
        for start in range(0, len(ks), 256):
            chunk = ks[start : start + 256]
            logits = codec.decode(np.asarray([parsed[k].codes for k in chunk]))
            for k, m64 in zip(chunk, logits, strict=True):
                ref = references[k]
                truth = rle_to_mask(ref["mask"])
                pred = paste_logits(m64, box_pixels(parsed[k].bins, ref["width"], ref["height"]),
                                    ref["width"], ref["height"])  # fmt: skip
                inter = int((truth & pred).sum())
                results[k]["mask_iou"] = inter / (int(truth.sum()) + int(pred.sum()) - inter)
                results[k]["mask"] = mask_rle(pred)  # for the report's pictures (compact, unlike the array)
    return results, problems


def score(predictions: Sequence[str], references: Sequence[dict], options: ScoreOptions) -> Scored:
    results, problems = evaluate(predictions, references)
    n = len(results)
    metrics = {"miou": sum(r["mask_iou"] for r in results) / n if n else 0.0}
    for t in BOX_THRESHOLDS:
        metrics[f"boxacc@{t}"] = sum(r["box_iou"] >= t for r in results) / n if n else 0.0
    metrics["invalid_rate"] = sum(not r["valid"] for r in results) / n if n else 0.0
    drawn = {}
    for k, (r, ref) in enumerate(zip(results, references, strict=True)):
        # Entries carry the mask (COCO RLE) after the Drawn triple: `draw.draw_masks` blends it in.
        predicted = []
        if r["bins"] is not None:
            predicted = [
                (
                    decode_box(r["bins"], ref["width"], ref["height"]),
                    "prediction",
                    f"box IoU {r['box_iou']:.2f}",
                    r.get("mask"),
                )
            ]
        truth = [(ref["box"], "truth", f"mask IoU {r['mask_iou']:.2f}", ref["mask"])]
        drawn[k] = Drawn(truth=truth, predicted=predicted)  # type: ignore[arg-type]
    return Scored(metrics, problems, drawn)


def each(predictions: Sequence[str], references: Sequence[dict], options: ScoreOptions) -> list[float]:
    """Mask IoU of each example (the mean is miou)."""
    return [r["mask_iou"] for r in evaluate(predictions, references)[0]]
