"""An offline segmentation dataset: easy-VQA's shapes (the `easy-vqa` package), one mask per image.

    python -m pg_finetune.tasks.segment.easyvqa --split train --out data/easyvqa_segment
    python -m pg_finetune.tasks.segment.easyvqa --split test --out data/easyvqa_segment --limit 200

Writes `OUT/{split}.jsonl`: `{"id", "image" (absolute path), "prefix": "segment circle", "suffix":
<loc>x4 <seg>x16, "expression", "mask" (COCO RLE), "box", "width", "height", "codec"}`, readable by
the JSONL source for training and by `eval.run --benchmark refcoco_seg --data OUT/test.jsonl`. The
mask is every pixel not of the background colour (the commonest border colour), as the
`builtin:easyvqa-detect` boxes; the expression is the shape the image's own QA pairs name. The
suffix is written with `--codec` (default: the scoring default, the tiny codec trained if absent),
and each record names that codec so scoring decodes with the same one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pg_finetune.tasks.segment.masks import mask_box, mask_rle, masks_to_suffixes

SHAPES = ("circle", "rectangle", "triangle")


def shape_mask(path: str) -> np.ndarray:
    """(H, W) bool: the pixels of an easy-VQA image that are not of the commonest border colour."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    return (pixels != colours[counts.argmax()]).any(axis=-1)


class EasyVQASegmentRows(Sequence):
    """The records of one split, each made when first read, 256 at a time: reading and encoding all 3,793
    training masks up front would cost seconds a run that reads 16 of them. Which images are rows is
    known from the QA pairs alone (every easy-VQA image holds a shape: none of its 5,000 is blank)."""

    CHUNK = 256

    def __init__(self, split: str, found: list[tuple[int, str, str]], codec_path: Path,
                 where: str | None = None):  # fmt: skip
        self.split, self.found, self.codec_path, self.where = split, found, codec_path, where
        self._rows: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.found)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        k = range(len(self))[index]  # IndexError, negative indices
        if k not in self._rows:
            self._encode(k - k % self.CHUNK)
        return self._rows[k]

    def _encode(self, start: int) -> None:
        from pg_finetune.tasks.segment.scoring import load_codec

        chunk = self.found[start : start + self.CHUNK]
        masks = [shape_mask(path) for _, _, path in chunk]
        for (_, _, path), mask in zip(chunk, masks, strict=True):
            if not mask.any():
                raise ValueError(f"easy-VQA image {path} is blank: no shape pixels to segment")
        suffixes = masks_to_suffixes(masks, load_codec(self.codec_path))
        for k, ((image_id, shape, path), mask, suffix) in enumerate(zip(chunk, masks, suffixes, strict=True), start):
            height, width = mask.shape
            self._rows[k] = {
                "id": f"easyvqa-segment-{self.split}-{image_id}",
                "image": path,
                "prefix": f"segment {shape}",
                "suffix": suffix,
                "expression": shape,
                "mask": mask_rle(mask),
                "box": list(mask_box(mask)),
                "width": width,
                "height": height,
                "codec": str(self.codec_path),
            }  # fmt: skip
            if self.where:
                self._rows[k]["where"] = f"{self.where} #{k}"


def easyvqa_segment_rows(
    split: str, codec_path: str | Path | None = None, limit: int | None = None, where: str | None = None
) -> EasyVQASegmentRows:
    """Records of `split` (train | test), one per image whose shape its QA pairs name.

    A read-only sequence whose rows are encoded when first read; `list(...)` for a plain list.
    where: if given, each row gets `"where": f"{where} #{index}"`.
    """
    import easy_vqa

    from pg_finetune.data import easyvqa_caption
    from pg_finetune.tasks.segment.scoring import default_codec_path, load_codec
    from pg_finetune.tasks.segment.train_codec import TINY_FILE, tiny_codec_path

    loaders = {
        "train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    }
    if split not in loaders:
        raise ValueError(f"easy-VQA has no split {split!r}; splits: {', '.join(loaders)}")
    if codec_path is None:
        codec_path = default_codec_path()
        if codec_path.name == TINY_FILE and not codec_path.exists():
            codec_path = tiny_codec_path()
    load_codec(codec_path)  # fails here, before any row is read, if the file is missing or not a codec
    questions, answers, image_ids = loaders[split][0]()
    paths = loaders[split][1]()
    qa = defaultdict(list)
    for q, a, i in zip(questions, answers, image_ids, strict=True):
        qa[i].append((q, a))
    found = []  # (image_id, shape, absolute image path)
    for image_id in sorted(qa):
        if limit is not None and len(found) >= limit:
            break
        shape = easyvqa_caption(qa[image_id]).split()[-1]
        if shape in SHAPES:
            found.append((image_id, shape, os.path.abspath(paths[image_id])))  # no syscall, unlike resolve()
    return EasyVQASegmentRows(split, found, Path(codec_path).resolve(), where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pg_finetune.tasks.segment.easyvqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, help="directory for {split}.jsonl")
    parser.add_argument(
        "--split", default="train", choices=["train", "test"], help="easy-VQA split (default: train)"
    )
    parser.add_argument("--limit", type=int, help="at most N images")
    parser.add_argument(
        "--codec", help="mask codec .npz (default: $PG_FINETUNE_MASK_CODEC, vae-oid or the tiny one)"
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.codec and not Path(args.codec).is_file():
        parser.error(f"no such file: {args.codec}")
    rows = list(easyvqa_segment_rows(args.split, args.codec, args.limit))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
