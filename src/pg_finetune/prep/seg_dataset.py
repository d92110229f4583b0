"""Convert COCO instance masks, optionally with RefCOCO referring expressions, to PaliGemma segmentation JSONL
(or, with --task detect, to referring-detection JSONL: the same boxes without the masks).

    python data_prep/create_seg_dataset.py --annotations instances.json --images DIR --out OUT --codec vae-oid.npz
    python data_prep/create_seg_dataset.py --annotations instances.json --images DIR --out OUT \
        --refs "refs(unc).p" --codec vae-oid.npz          # RefCOCO / RefCOCO+ / RefCOCOg: one file per ref split
    python data_prep/create_seg_dataset.py --annotations instances.json --images DIR --out OUT \
        --refs "refs(unc).p" --task detect                 # `detect <expression>` -> 4 <loc> + expression
    pg-make-seg-dataset ...                                # the same program, installed

Writes `OUT/{split}.jsonl` and `OUT/{split}_summary.json`, one record per object (per referring
sentence with --refs; the refs' split "val" is written `validation`, the recipes' eval_split):

    {"image": "../coco/train2014/COCO_train2014_000000000009.jpg", "prefix": "segment the left bowl",
     "suffix": "<loc0102><loc0205><loc0512><loc1023><seg012>...<seg099>", "expression": "the left bowl",
     "id": "ann1038967-s0", "mask": {"size": [H, W], "counts": "..."}, "box": [x1, y1, x2, y2],
     "width": W, "height": H, "codec": "/abs/vae-oid.npz"}

The suffix is made as big_vision's `refcoco_mask2str` (`pp/proj/paligemma/segmentation.py`) makes it:
the box is the annotation's own `bbox` (x, y, w, h; big_vision's `objects/bbox`), not the mask's
extent; its four edges binned `round(v / size * 1023)` clipped to 0..1023, y first; the mask cropped
to that box (edges rounded to whole pixels), resized to 64x64 bilinear with antialias, and encoded by
the mask codec into 16 `<segNNN>` tokens. `image` is relative to the JSONL file; `mask` (COCO RLE),
`box`, `width`, `height` and `codec` make each record a reference the `segment` task scores
(`eval.run --benchmark refcoco_seg --data OUT/validation.jsonl`).

With --task detect each record is the box alone, for recipes/big_vision/refcoco_detect_224.yaml and
`eval.run --benchmark refexp`: the same box and binning as above, no mask decoded and no codec:

    {"image": ..., "prefix": "detect the left bowl", "suffix": "<loc0102><loc0205><loc0512><loc1023> the left bowl",
     "expression": "the left bowl", "id": "ref5-s0", "box": [x1, y1, x2, y2], "width": W, "height": H}

The codec (--codec) must be big_vision's `vae-oid.npz` (gs://big_vision/paligemma/vae-oid.npz) for
any real PaliGemma: its seg tokens mean those codes. Without --codec the offline stand-in codec is
used (`pg_finetune.tasks.segment.train_codec`), with a warning: fine for tests, useless for real training.

Inputs:
- --annotations: COCO instances JSON (`images` with id, file_name, width, height; `annotations` with
  id, image_id, bbox, segmentation (not needed with --task detect) as polygons [[x1, y1, x2, y2, ...], ...] or RLE {"size": [H, W],
  "counts": string (compressed) or list (uncompressed)}; `categories` with id, name). Decoded with
  pycocotools' mask utils.
- --refs (optional): RefCOCO-style refs, a pickle (`refs(unc).p`, from the refer toolkit; read as
  plain data only: a pickle holding any class or function is refused) or a JSON list (or
  {"refs": [...]}) of {"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent": ...} or {"raw": ...} or a string, ...]}. Without --refs each
  instance is one record whose expression is its category name; its split is --split.

Rules, each counted in the summary: crowd annotations are skipped without --refs unless --keep-crowd
("crowd"); an annotation whose box is less than one pixel once rounded is skipped ("too_small"); a
missing image file is skipped ("missing_image"); refs of splits not in --splits are skipped
("other_split"). Bad input stops the program before anything is written, with the file and the
annotation (or ref) id: a polygon with an odd number of coordinates or fewer than 3 points, an RLE of
another size than its image, a bbox that is not 4 finite numbers with positive width and height or
that reaches more than one pixel outside the image, a ref naming an annotation that is not there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

# One error type and JSON reader for both converters: the detection one's.
from pg_finetune.prep.od_dataset import InputError, _load_json

COUNTERS = ("crowd", "too_small", "missing_image", "other_split")
SPLIT_NAMES = {"val": "validation"}  # the refs' "val" is the recipes' eval_split (as create_vqa_dataset names it)
BBOX_TOLERANCE = 1.0  # pixels a bbox may reach past the image border (float round-off in exports)
CHUNK = 256  # masks encoded at a time


@dataclass
class Item:
    """One record to write: an annotation and the expression that refers to it."""

    ann: dict
    image: dict
    expression: str
    id: str
    split: str


def _finite(values: Any) -> bool:
    return isinstance(values, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def annotation_mask(ann: dict, image: dict, where: str) -> np.ndarray:
    """The (H, W) bool mask of a COCO annotation: polygons or RLE (compressed or not), via pycocotools."""
    from pycocotools import mask as mask_utils

    height, width = int(image["height"]), int(image["width"])
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        if not segm:
            raise InputError(f"{where}: empty 'segmentation' (no polygon)")
        for k, poly in enumerate(segm):
            if not _finite(poly):
                raise InputError(f"{where}: polygon {k} is not a list of numbers")
            if len(poly) % 2 or len(poly) < 6:
                raise InputError(
                    f"{where}: polygon {k} has {len(poly)} coordinates; a polygon is x1, y1, x2, y2, ... "
                    "with at least 3 points"
                )
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not _finite(size) or len(size) != 2:
            raise InputError(f"{where}: RLE 'size' must be [height, width], got {size!r}")
        if [int(v) for v in size] != [height, width]:
            raise InputError(f"{where}: RLE size {list(size)} but the image is {height} x {width} (H x W)")
        if isinstance(counts, list):
            if not _finite(counts) or sum(counts) != height * width:
                raise InputError(f"{where}: uncompressed RLE counts must be ints summing to {height} x {width}")
            rle = mask_utils.frPyObjects(segm, height, width)
        elif isinstance(counts, str | bytes):
            rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise InputError(f"{where}: RLE 'counts' must be a string or a list of ints")
    else:
        raise InputError(f"{where}: 'segmentation' must be polygons (a list) or an RLE dict, got {type(segm).__name__}")
    try:
        return mask_utils.decode(rle).astype(bool)
    except Exception as err:  # pycocotools raises bare errors on corrupt compressed counts
        raise InputError(f"{where}: cannot decode the RLE: {err}") from None


def annotation_box(ann: dict, image: dict, where: str) -> tuple[float, float, float, float]:
    """COCO `bbox` (x, y, w, h) -> (x1, y1, x2, y2) pixels, checked against the image."""
    bbox = ann.get("bbox")
    if not _finite(bbox) or len(bbox) != 4:
        raise InputError(f"{where}: 'bbox' must be 4 numbers x, y, w, h, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise InputError(f"{where}: bbox {bbox} has no area (w and h must be > 0)")
    width, height = int(image["width"]), int(image["height"])
    t = BBOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise InputError(
            f"{where}: bbox {bbox} (x, y, w, h) reaches outside the {width} x {height} image"
        )
    return x, y, x + w, y + h


def read_coco(path: Path, masks: bool = True) -> tuple[dict[int, dict], dict[int, dict], dict[int, str]]:
    """images by id, annotations by id, category names by id; InputError naming the missing field
    (`segmentation` only counts as missing with `masks`)."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or not isinstance(
        data.get("images"), list
    ):
        raise InputError(f"{path}: not a COCO instances file (needs 'images' and 'annotations' lists)")
    images: dict[int, dict] = {}
    for k, image in enumerate(data["images"]):
        missing = [key for key in ("id", "file_name", "width", "height") if key not in image]
        if missing:
            raise InputError(f"{path}: images[{k}] has no {', '.join(missing)}")
        images[image["id"]] = image
    annotations: dict[int, dict] = {}
    for k, ann in enumerate(data["annotations"]):
        required = ("id", "image_id", "bbox", *(("segmentation",) if masks else ()))
        missing = [key for key in required if key not in ann]
        if missing:
            raise InputError(f"{path}: annotations[{k}] (id {ann.get('id', '?')}) has no {', '.join(missing)}")
        if ann["image_id"] not in images:
            raise InputError(f"{path}: annotation {ann['id']}: image_id {ann['image_id']} is not in 'images'")
        annotations[ann["id"]] = ann
    categories = {c["id"]: str(c["name"]) for c in data.get("categories", []) if "id" in c and "name" in c}
    return images, annotations, categories


class _PlainDataUnpickler(pickle.Unpickler):
    """Reads pickles of plain data only (dict, list, str, int, float...): any class or function in the
    file is refused, so opening a `refs(unc).p` can never run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refuses {module}.{name}: a refs pickle holds only dicts, lists, strings and numbers"
        )


def read_refs(path: Path) -> list[dict]:
    """RefCOCO refs from a pickle (the refer toolkit's `refs(unc).p`) or JSON (a list, or {"refs": [...]})."""
    if path.suffix in (".p", ".pkl", ".pickle"):
        with open(path, "rb") as f:
            try:
                refs = _PlainDataUnpickler(f, encoding="latin1").load()  # the refer toolkit wrote it in Python 2
            except (pickle.UnpicklingError, EOFError, ValueError) as err:
                raise InputError(f"{path}: not a plain-data refs pickle ({err})") from None
    else:
        refs = _load_json(path)
        refs = refs.get("refs") if isinstance(refs, dict) else refs
    if not isinstance(refs, list):
        raise InputError(f"{path}: expected a list of refs (or {{'refs': [...]}})")
    return refs


def sentence_text(sentence: Any) -> str:
    """A ref sentence: a string, or {"sent": ...} (the refer toolkit's cleaned text), else {"raw": ...}."""
    if isinstance(sentence, str):
        text = sentence
    elif isinstance(sentence, dict):
        text = sentence.get("sent") or sentence.get("raw") or ""
    else:
        text = ""
    return " ".join(str(text).split())


def collect_items(
    images: dict[int, dict], annotations: dict[int, dict], categories: dict[int, str], refs: list[dict] | None,
    refs_path: Path | None, split: str, splits: set[str] | None, keep_crowd: bool, counts: Counter,
) -> list[Item]:  # fmt: skip
    items: list[Item] = []
    if refs is None:
        for ann in annotations.values():
            if ann.get("iscrowd") and not keep_crowd:
                counts["crowd"] += 1
                continue
            name = categories.get(ann.get("category_id"), "")
            items.append(Item(ann, images[ann["image_id"]], " ".join(name.split()), f"ann{ann['id']}", split))
        return items
    for k, ref in enumerate(refs):
        where = f"{refs_path}: ref {ref.get('ref_id', f'#{k}') if isinstance(ref, dict) else f'#{k}'}"
        if not isinstance(ref, dict) or any(key not in ref for key in ("ann_id", "split", "sentences")):
            raise InputError(f"{where}: a ref needs 'ann_id', 'split' and 'sentences'")
        if splits is not None and ref["split"] not in splits:
            counts["other_split"] += 1
            continue
        ann = annotations.get(ref["ann_id"])
        if ann is None:
            raise InputError(f"{where}: ann_id {ref['ann_id']} is not in the annotations file")
        if "image_id" in ref and ref["image_id"] != ann["image_id"]:
            raise InputError(
                f"{where}: image_id {ref['image_id']} but annotation {ann['id']} is on image {ann['image_id']}"
            )
        for s, sentence in enumerate(ref["sentences"]):
            text = sentence_text(sentence)
            if not text:
                raise InputError(f"{where}: sentence {s} has no text ('sent' or 'raw')")
            split_name = SPLIT_NAMES.get(str(ref["split"]), str(ref["split"]))
            items.append(Item(ann, images[ann["image_id"]], text, f"ref{ref.get('ref_id', k)}-s{s}", split_name))
    return items


def load_codec_for(path: str | None, quiet: bool) -> tuple[Any, Path]:
    """--codec, or the default codec with a warning when it is the offline stand-in."""
    from pg_finetune.tasks.segment.scoring import default_codec_path, load_codec
    from pg_finetune.tasks.segment.train_codec import TINY_FILE, tiny_codec_path

    if path is not None:
        return load_codec(path), Path(path).resolve()
    codec_file = default_codec_path()
    if codec_file.name == TINY_FILE:
        print(
            f"warning: no --codec: using the offline stand-in mask codec {codec_file} (trained here on generated "
            "shapes). A real PaliGemma reads only big_vision's codec: pass --codec vae-oid.npz "
            "(gs://big_vision/paligemma/vae-oid.npz) to make data for real training.",
            file=sys.stderr,
        )
        if not codec_file.exists():
            codec_file = tiny_codec_path()
    return load_codec(codec_file), codec_file.resolve()


def _image_to_use(item: Item, box: tuple[float, float, float, float], images_dir: Path, counts: Counter) -> Path | None:
    """The item's image file, or None (counted) when its box holds no whole pixel or the file is missing."""
    from pg_finetune.tasks.segment.masks import crop_edges

    x1, y1, x2, y2 = crop_edges(box, int(item.image["width"]), int(item.image["height"]))
    if x2 <= x1 or y2 <= y1:
        counts["too_small"] += 1
        return None
    path = images_dir / item.image["file_name"]
    if not path.is_file():
        counts["missing_image"] += 1
        return None
    return path


def convert(
    items: list[Item], images_dir: Path, out_dir: Path, codec: Any, codec_file: Path, counts: Counter,
    quiet: bool = False,
) -> dict[str, list[dict]]:  # fmt: skip
    """Records by split. Every mask is decoded and checked before any is encoded (bad input: nothing written)."""
    from pg_finetune.tasks.segment.masks import mask_rle, masks_to_suffixes

    prepared = []  # (item, mask, box, image path)
    for item in tqdm(items, desc="masks", unit="obj", disable=quiet):
        where = f"annotation {item.ann['id']}"
        box = annotation_box(item.ann, item.image, where)
        mask = annotation_mask(item.ann, item.image, where)  # checked (bad input stops) even if skipped below
        path = _image_to_use(item, box, images_dir, counts)
        if path is not None:
            prepared.append((item, mask, box, path))
    by_split: dict[str, list[dict]] = {}
    bar = tqdm(total=len(prepared), desc="encoding", unit="obj", disable=quiet)
    for start in range(0, len(prepared), CHUNK):
        chunk = prepared[start : start + CHUNK]
        suffixes = masks_to_suffixes([m for _, m, _, _ in chunk], codec, boxes=[b for _, _, b, _ in chunk])
        for (item, mask, box, path), suffix in zip(chunk, suffixes, strict=True):
            by_split.setdefault(item.split, []).append({
                "image": os.path.relpath(path.resolve(), out_dir.resolve()),
                "prefix": f"segment {item.expression}".strip(),
                "suffix": suffix,
                "expression": item.expression,
                "id": item.id,
                "mask": mask_rle(mask),
                "box": [round(v, 2) for v in box],
                "width": int(item.image["width"]),
                "height": int(item.image["height"]),
                "codec": str(codec_file),
            })  # fmt: skip
        bar.update(len(chunk))
    bar.close()
    return by_split


def convert_detect(
    items: list[Item], images_dir: Path, out_dir: Path, counts: Counter, quiet: bool = False
) -> dict[str, list[dict]]:
    """Referring-detection records by split: the box of `convert`, binned the same way, without the mask."""
    from pg_finetune.loc import encode_box

    by_split: dict[str, list[dict]] = {}
    for item in tqdm(items, desc="boxes", unit="obj", disable=quiet):
        width, height = int(item.image["width"]), int(item.image["height"])
        box = annotation_box(item.ann, item.image, f"annotation {item.ann['id']}")
        path = _image_to_use(item, box, images_dir, counts)
        if path is None:
            continue
        by_split.setdefault(item.split, []).append({
            "image": os.path.relpath(path.resolve(), out_dir.resolve()),
            "prefix": f"detect {item.expression}".strip(),
            "suffix": f"{encode_box(box, width, height)} {item.expression}".strip(),
            "expression": item.expression,
            "id": item.id,
            "box": [round(v, 2) for v in box],
            "width": width,
            "height": height,
        })  # fmt: skip
    return by_split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-make-seg-dataset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotations", required=True, type=Path, help="COCO instances JSON (polygons or RLE masks)")
    parser.add_argument("--images", required=True, type=Path, help="directory the images' file_name is relative to")
    parser.add_argument("--out", required=True, type=Path, help="output directory for {split}.jsonl")
    parser.add_argument("--refs", type=Path,
                        help="RefCOCO-style refs (refs(unc).p pickle or JSON): one record per sentence, files by ref split")  # fmt: skip
    parser.add_argument("--splits", help="with --refs: comma-separated ref splits to write (default: all)")
    parser.add_argument("--split", default="train", help="without --refs: the output split name (default: train)")
    parser.add_argument("--task", choices=("segment", "detect"), default="segment",
                        help="segment: `segment <expression>` -> 4 <loc> + 16 <seg> (default); detect: `detect "
                             "<expression>` -> 4 <loc> + the expression (refcoco_detect recipe, refexp benchmark)")
    parser.add_argument("--codec", help="mask codec .npz: big_vision's vae-oid.npz for real training "
                        "(default: the offline stand-in, with a warning); --task segment only")  # fmt: skip
    parser.add_argument("--keep-crowd", action="store_true", help="without --refs: keep iscrowd=1 annotations")
    parser.add_argument("--limit", type=int, help="at most N records (for a quick look)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no printed summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("annotations", "images", "refs", "codec"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            parser.error(f"--{flag} {value} does not exist")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    if args.codec and args.task == "detect":
        parser.error("--codec is for --task segment: detection records carry no mask codes")
    if args.splits and not args.refs:
        parser.error("--splits needs --refs (without refs every record goes to --split)")
    splits = {s.strip() for s in args.splits.split(",") if s.strip()} if args.splits else None
    counts: Counter = Counter({name: 0 for name in COUNTERS})
    try:
        images, annotations, categories = read_coco(args.annotations, masks=args.task == "segment")
        refs = read_refs(args.refs) if args.refs else None
        items = collect_items(images, annotations, categories, refs, args.refs, args.split, splits,
                              args.keep_crowd, counts)  # fmt: skip
        items = items[: args.limit] if args.limit else items
        if args.task == "detect":
            by_split = convert_detect(items, args.images, args.out, counts, quiet=args.quiet)
        else:
            codec, codec_file = load_codec_for(args.codec, args.quiet)
            by_split = convert(items, args.images, args.out, codec, codec_file, counts, quiet=args.quiet)
    except InputError as err:
        where = args.refs if args.refs and str(args.refs) in str(err) else args.annotations
        message = str(err) if str(where) in str(err) else f"{where}: {err}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not by_split:
        print(f"error: no record to write (counts: {dict(counts)}); nothing to train on", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for split, records in by_split.items():
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        summary = {"split": split, "task": args.task, "records_written": len(records), **dict(counts)}
        if "codec" in records[0]:
            summary["codec"] = records[0]["codec"]
        (args.out / f"{split}_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if not args.quiet:
            print(f"{split}: {len(records)} records -> {args.out / f'{split}.jsonl'}")
    if not args.quiet:
        print("skipped: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
