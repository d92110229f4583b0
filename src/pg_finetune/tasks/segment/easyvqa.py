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
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from pg_finetune.tasks.segment.masks import mask_box, mask_rle, mask_to_suffix

SHAPES = ("circle", "rectangle", "triangle")


def shape_mask(path: str) -> np.ndarray:
    """(H, W) bool: the pixels of an easy-VQA image that are not of the commonest border colour."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    return (pixels != colours[counts.argmax()]).any(axis=-1)


def easyvqa_segment_rows(
    split: str, codec_path: str | Path | None = None, limit: int | None = None
) -> list[dict]:
    """Records of `split` (train | test), one per image whose shape is named and whose mask is not empty."""
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
    codec = load_codec(codec_path)
    questions, answers, image_ids = loaders[split][0]()
    paths = loaders[split][1]()
    qa = defaultdict(list)
    for q, a, i in zip(questions, answers, image_ids, strict=True):
        qa[i].append((q, a))
    rows = []
    for image_id in sorted(qa):
        if limit is not None and len(rows) >= limit:
            break
        shape = easyvqa_caption(qa[image_id]).split()[-1]
        mask = shape_mask(paths[image_id])
        if shape not in SHAPES or not mask.any():
            continue
        height, width = mask.shape
        rows.append({
            "id": f"easyvqa-segment-{split}-{image_id}",
            "image": str(Path(paths[image_id]).resolve()),
            "prefix": f"segment {shape}",
            "suffix": mask_to_suffix(mask, codec),
            "expression": shape,
            "mask": mask_rle(mask),
            "box": list(mask_box(mask)),
            "width": width,
            "height": height,
            "codec": str(Path(codec_path).resolve()),
        })  # fmt: skip
    return rows


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
    rows = easyvqa_segment_rows(args.split, args.codec, args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
