"""`cococap`: COCO captions (Karpathy splits), CIDEr-D, BLEU-4, ROUGE-L as the COCO evaluation computes them.

    python -m eval.run --benchmark cococap --data dataset_coco.json --image-root coco/ --split val --model M
    python -m eval.run --benchmark cococap --predictions preds.jsonl --references dataset_coco.json --split test

Data: Karpathy's `dataset_coco.json` (`{"images": [{"filepath", "filename", "split", "cocoid",
"sentences": [{"raw": ...}]}]}`; images at IMAGE_ROOT/filepath/filename, IMAGE_ROOT defaulting to
the JSON's directory), or any JSONL / dataset with a `captions` list. Example ids are the `cocoid`
(else the filename). Prompt `caption en`, as big_vision's coco_caption evaluator.
References: the Karpathy JSON itself, or JSONL `{"id": ..., "captions": [...]}`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from eval.benchmarks import caption
from eval.benchmarks.base import Benchmark, load_jsonl_records, read_jsonl_references
from pg_finetune.data import RecordDataset, parse_split, split_indices


def is_karpathy(path: str) -> bool:
    return path.endswith(".json") and os.path.isfile(path)


def karpathy_rows(path: str, split: str, image_root: str | None = None) -> list[dict]:
    """Records (without images) of one Karpathy split: id, image path, captions. `split` may be sliced.

    Image paths are image_root/filepath/filename, image_root defaulting to the JSON's directory."""
    base, part = parse_split(split)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a Karpathy caption file (expected {{'images': [...]}} at the top)")
    root = image_root or str(Path(path).parent)
    rows = []
    for k, image in enumerate(data["images"]):
        if image.get("split") != base:
            continue
        where = f"{path} images[{k}]"
        sentences = image.get("sentences") or []
        rows.append(
            {
                "id": str(image.get("cocoid", image.get("filename", k))),
                "image": os.path.join(root, image.get("filepath", ""), image.get("filename", "")),
                "prefix": "caption en",
                "captions": [s["raw"] for s in sentences if isinstance(s, dict) and "raw" in s],
                "where": where,
                "_line": where,
            }
        )
    if not rows:
        splits = sorted({str(im.get("split")) for im in data["images"]})
        raise ValueError(f"{path}: no images in split {base!r}; splits there: {', '.join(splits)}")
    return [rows[i] for i in split_indices(part, len(rows))]


def load(
    source: str, split: str, *, limit: int | None = None, prefix: str | None = None, image_root: str | None = None
) -> RecordDataset:
    if not is_karpathy(source):
        return load_jsonl_records(source, split, limit=limit, prefix=prefix)
    rows = karpathy_rows(source, split, image_root)
    skipped: Counter = Counter()
    metas, paths = [], []
    for row in rows:
        if limit is not None and len(metas) >= limit:
            break
        if not os.path.isfile(row["image"]):
            skipped["image file not found"] += 1
            continue
        meta = {k: v for k, v in row.items() if k not in ("image", "_line")}
        metas.append({**meta, "prefix": prefix or meta["prefix"], "suffix": None})
        paths.append(row["image"])
    if not metas:
        raise ValueError(f"{source}: none of the {len(rows)} images of split {split!r} exist under the image root")
    return RecordDataset(f"{source} (split {split})", metas, paths, skip_bad_records=True, skipped=skipped)


def read_references(path: str, split: str, image_root: str | None = None) -> list[dict]:
    return karpathy_rows(path, split, image_root) if is_karpathy(path) else read_jsonl_references(path, split)


BENCHMARK = Benchmark(
    name="cococap",
    description="COCO captions (Karpathy JSON or captions JSONL), CIDEr/BLEU-4/ROUGE-L",
    task="caption",
    source=None,
    split="val",
    references_help='Karpathy dataset_coco.json, or {"id": ..., "captions": ["...", ...]}',
    reference=caption.reference,
    score=caption.score,
    prefix="caption en",
    load=load,
    read_references=read_references,
)
