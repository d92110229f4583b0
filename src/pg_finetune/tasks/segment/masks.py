"""Masks <-> PaliGemma segmentation targets: `<locY1><locX1><locY2><locX2>` + 16 `<segNNN>` tokens.

    suffix = mask_to_suffix(mask, codec)          # full-image binary mask -> 4 loc + 16 seg tokens
    full = suffix_to_mask(suffix, width, height, codec)   # and back: a full-image boolean mask

Our transcription of big_vision's `refcoco_mask2str` (`pp/proj/paligemma/segmentation.py`): the box
is the mask's own extent, the crop is resized to 64x64 (bilinear with antialias) and encoded into
16 codes; the box is binned `round(v / size * 1023)` (`pg_finetune.loc`). Decoding follows the
evaluator (`evaluators/proj/paligemma/transfers/segmentation.py`): the 64x64 logits are resized into
the predicted box (pixel edges `int(bin / 1023 * size)`) with PIL's BILINEAR and kept where > 0.

Reference masks are COCO RLE dicts (`{"size": [h, w], "counts": ...}`, compressed or not) or PNG
files (nonzero pixels are the mask); `read_mask` reads either, `mask_rle` writes the compressed RLE.
Imports torch only in `crop_to_64` (through the codec) and numpy/PIL/pycocotools elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pg_finetune.loc import encode_box

if TYPE_CHECKING:
    from pg_finetune.tasks.segment.codec import MaskCodec

MASK_SIZE = 64
NUM_SEG_TOKENS = 16
_MAX_BIN = 1023


def seg_token(code: int) -> str:
    return f"<seg{int(code):03d}>"


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel extent (x1, y1, x2, y2) of a mask's nonzero pixels, x2/y2 exclusive; ValueError if empty."""
    ys, xs = np.nonzero(np.asarray(mask))
    if not len(ys):
        raise ValueError("the mask is empty")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def crop_to_64(mask: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The crop of a binary mask inside pixel `box` (default: its extent) as a 64x64 float32 in [0, 1].

    Bilinear with antialias, as big_vision's `tf.image.resize(..., antialias=True)` (torch's
    antialiased bilinear is the same triangle filter).
    """
    import torch
    import torch.nn.functional as F

    x1, y1, x2, y2 = box if box is not None else mask_box(mask)
    crop = torch.from_numpy(np.asarray(mask)[y1:y2, x1:x2].astype(np.float32))
    resized = F.interpolate(crop[None, None], size=(MASK_SIZE, MASK_SIZE), mode="bilinear", antialias=True,
                            align_corners=False)  # fmt: skip
    return resized[0, 0].clamp(0, 1).numpy()


def mask_to_suffix(mask: np.ndarray, codec: MaskCodec) -> str:
    """A full-image binary mask (H, W) -> `<locY1><locX1><locY2><locX2><seg...>x16` (refcoco_mask2str)."""
    mask = np.asarray(mask) > 0
    height, width = mask.shape
    box = mask_box(mask)
    codes = codec.encode(crop_to_64(mask, box))[0]
    return encode_box(box, width, height) + "".join(seg_token(c) for c in codes)


def crop_edges(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (x1, y1, x2, y2) -> the integer crop big_vision takes: each edge rounded (half to even, as
    `tf.round(h * bbox[0])` in `refcoco_mask2str`), kept inside the image."""
    x1, y1, x2, y2 = box
    return (min(max(round(x1), 0), width), min(max(round(y1), 0), height),
            min(max(round(x2), 0), width), min(max(round(y2), 0), height))  # fmt: skip


def masks_to_suffixes(
    masks: list[np.ndarray], codec: MaskCodec, boxes: list[tuple[float, float, float, float]] | None = None,
    chunk: int = 512,
) -> list[str]:  # fmt: skip
    """`mask_to_suffix` of many masks, encoded in batches on one torch thread.

    boxes: pixel (x1, y1, x2, y2) per mask, e.g. COCO's annotation bbox, which is what big_vision's
    `refcoco_mask2str` bins and crops (its `objects/bbox`, not the mask's extent); None: each mask's
    extent. The crop is the box with its edges rounded (`crop_edges`); ValueError if that is empty.
    One thread: a 64x64 conv net is too small to gain from more, and on a busy machine two threads
    made this thirty times slower (100 masks: 1.3 s on one thread, 30 s on two, load 13).
    """
    import torch

    masks = [np.asarray(m) > 0 for m in masks]
    if boxes is None:
        boxes = [mask_box(m) for m in masks]
    crops = []
    for k, (m, box) in enumerate(zip(masks, boxes, strict=True)):
        x1, y1, x2, y2 = edges = crop_edges(box, m.shape[1], m.shape[0])
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"mask {k}: box {tuple(box)} is empty once rounded to whole pixels {edges}")
        crops.append(edges)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codes = [
            code
            for start in range(0, len(masks), chunk)
            for code in codec.encode(np.stack([crop_to_64(m, c) for m, c in zip(
                masks[start : start + chunk], crops[start : start + chunk], strict=True)]))
        ]  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    return [
        encode_box(box, m.shape[1], m.shape[0]) + "".join(seg_token(c) for c in code)
        for m, box, code in zip(masks, boxes, codes, strict=True)
    ]


def box_pixels(bins: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """(y1, x1, y2, x2) bins -> integer pixel (x1, y1, x2, y2) as big_vision's evaluator: `int(bin / 1023 * size)`."""
    y1, x1, y2, x2 = (b / _MAX_BIN for b in bins)
    return int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)


def paste_logits(logits64: np.ndarray, box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """64x64 decoder logits resized into pixel `box` (PIL BILINEAR, as the evaluator) -> (H, W) bool mask."""
    x1, y1, x2, y2 = box
    full = np.zeros((height, width), bool)
    if x2 <= x1 or y2 <= y1:
        return full
    inside = Image.fromarray(np.asarray(logits64, np.float32)).resize(
        (x2 - x1, y2 - y1), resample=Image.BILINEAR
    )
    full[y1:y2, x1:x2] = np.asarray(inside) > 0.0
    return full


def suffix_to_mask(text: str, width: int, height: int, codec: MaskCodec) -> np.ndarray | None:
    """Model output -> full-image bool mask of its first object, or None when the output is invalid."""
    from pg_finetune.tasks.segment.parse import parse_segmentation

    parsed = parse_segmentation(text)
    if parsed.problem is not None:
        return None
    logits = codec.decode(np.asarray([parsed.codes]))[0]
    return paste_logits(logits, box_pixels(parsed.bins, width, height), width, height)


# ---- reference masks ----------------------------------------------------------------------------------


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary (H, W) mask -> COCO compressed RLE with `counts` as text (JSON-able)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) > 0, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed `counts` text/bytes, or uncompressed counts list) -> (H, W) bool."""
    from pycocotools import mask as mask_utils

    size, counts = rle.get("size"), rle.get("counts")
    if not (
        isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
    if isinstance(counts, list):
        if sum(counts) != size[0] * size[1]:
            raise ValueError(f"RLE counts sum to {sum(counts)}, not {size[0]} x {size[1]}")
        compressed = mask_utils.frPyObjects({"size": list(size), "counts": counts}, size[0], size[1])
    elif isinstance(counts, str | bytes):
        compressed = {
            "size": list(size),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    else:
        raise ValueError(f"RLE 'counts' must be a string or a list of ints, got {type(counts).__name__}")
    return mask_utils.decode(compressed).astype(bool)


def read_mask(mask: Any) -> np.ndarray:
    """A reference mask: a COCO RLE dict or a PNG path (nonzero pixels are the object) -> (H, W) bool."""
    if isinstance(mask, dict):
        return rle_to_mask(mask)
    if isinstance(mask, str):
        path = Path(mask)
        if not path.is_file():
            raise ValueError(
                f"mask file {mask!r} not found (a path is read as given: absolute or from the working dir)"
            )
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) > 0
    raise ValueError(f"'mask' must be a COCO RLE dict or a PNG path, got {type(mask).__name__}")
