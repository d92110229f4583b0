"""Karpathy caption JSON (`dataset_coco.json`, `dataset_flickr30k.json`): images, captions and their splits.

    load_records("coco/dataset_coco.json", "train")                  # one record per image: its first caption
    load_records("karpathy+all:coco/dataset_coco.json", "train")     # one record per caption
    load_records("coco/dataset_coco.json", "val", image_root="/data/coco", require_suffix=False)

The file: `{"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
"split": "train" | "val" | "test" | "restval", "cocoid": 391895, "sentences": [{"raw": "A man ..."},
...]}, ...]}`. A split is the images whose `split` field names it (slices apply as for any source).
A record's image is IMAGE_ROOT/filepath/filename, IMAGE_ROOT being `load_records(image_root=...)`
or else the JSON's directory; its id is the `cocoid` (else the filename); its `where` is
`PATH images[K]`; its `captions` are every `sentences[].raw` (the references a caption metric
scores against); it has no prefix of its own, so the prompt is `load_records`' `default_prefix`
or else `caption en`, as big_vision's COCO caption transfer.

Training target (`suffix`). By default one record per image with its first caption: an epoch is one
pass over the images, and train and eval records line up one to one with the cocoids the
`cococap` benchmark scores. big_vision instead trains on every caption (it draws a different
caption each time it sees an image, and runs 5 epochs for COCO's 5 captions); for that, prefix the
path with `karpathy+all:`, which gives one record per caption: id `COCOID-J` (J counts the
image's captions from 0), `image_id` the image's id, `where` `PATH images[K] sentences[I]`, and
the same `captions` list. There a split's slice counts captions, not images. An image without
captions gives one record without a suffix either way (a bad record when training).

`karpathy_rows(path, split, image_root)` reads a split's references without opening any image:
what the `cococap` benchmark scores against.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pg_finetune.data.source import Request, Source, SourceKind
from pg_finetune.data.splits import parse_split, split_indices

PREFIX = "caption en"  # big_vision's coco_caption transfer prompt
ALL_CAPTIONS = "karpathy+all:"  # source prefix: one record per caption instead of per image


def is_karpathy(path: str) -> bool:
    """A path to an existing `.json` file (the Karpathy reader's own errors say if it is not one)."""
    return path.endswith(".json") and os.path.isfile(path)


@dataclass(frozen=True)
class _Image:
    id: str
    path: str
    where: str
    sentences: list[tuple[int, Any]]  # (index in `sentences`, raw text) of each caption

    @property
    def captions(self) -> list[Any]:
        return [raw for _, raw in self.sentences]


def _read_split(path: str, split: str, image_root: str | os.PathLike | None) -> list[_Image]:
    """The images of one (unsliced) split, in file order; ValueError naming the file if it is not one."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a Karpathy caption file: invalid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a Karpathy caption file (expected {{'images': [...]}} at the top)")
    root = os.fspath(image_root) if image_root else str(Path(path).parent)
    images = []
    for k, image in enumerate(data["images"]):
        where = f"{path} images[{k}]"
        if not isinstance(image, dict):
            raise ValueError(
                f"{where}: not a JSON object ({type(image).__name__}); not a Karpathy caption file?"
            )
        if image.get("split") != split:
            continue
        sentences = image.get("sentences") or []
        images.append(
            _Image(
                id=str(image.get("cocoid", image.get("filename", k))),
                path=os.path.join(root, image.get("filepath", ""), image.get("filename", "")),
                where=where,
                sentences=[
                    (i, s["raw"]) for i, s in enumerate(sentences) if isinstance(s, dict) and "raw" in s
                ],
            )
        )
    if not images:
        splits = sorted({str(im.get("split")) for im in data["images"]})
        raise ValueError(f"{path}: no images in split {split!r}; splits there: {', '.join(splits)}")
    return images


def karpathy_rows(path: str, split: str, image_root: str | None = None) -> list[dict]:
    """Records (without images) of one Karpathy split: id, image path, captions. `split` may be sliced.

    Each row: `{"id", "image" (its path), "prefix": "caption en", "captions", "where", "_line"}`,
    `_line` being `where` again (the benchmarks' name for a reference's location).
    """
    base, part = parse_split(split)
    rows = [
        {
            "id": image.id,
            "image": image.path,
            "prefix": PREFIX,
            "captions": image.captions,
            "where": image.where,
            "_line": image.where,
        }
        for image in _read_split(path, base, image_root)
    ]
    return [rows[i] for i in split_indices(part, len(rows))]


def _records(images: list[_Image], all_captions: bool) -> list[dict]:
    rows = []
    for image in images:
        row = {"id": image.id, "image": image.path, "captions": image.captions, "where": image.where}
        if not image.sentences:
            rows.append(row)  # no suffix: reported as a bad record when training needs one
        elif not all_captions:
            rows.append({**row, "suffix": image.captions[0]})
        else:
            for j, (i, raw) in enumerate(image.sentences):
                where = f"{image.where} sentences[{i}]"
                rows.append(
                    {**row, "id": f"{image.id}-{j}", "image_id": image.id, "suffix": raw, "where": where}
                )
    return rows


def _find(request: Request) -> tuple[str, bool] | None:
    if request.source.startswith(ALL_CAPTIONS):
        return request.source.removeprefix(ALL_CAPTIONS), True
    return (request.source, False) if is_karpathy(str(request.path)) else None


def _open(found: tuple[str, bool], request: Request) -> Source:
    path, all_captions = found
    if not os.path.isfile(os.path.expanduser(path)):
        raise FileNotFoundError(f"Karpathy caption file not found: {path} (from {request.source!r})")
    rows = _records(_read_split(path, request.split, request.image_root), all_captions)
    return Source(
        name=f"{request.source} split {request.split}",
        num_rows=len(rows),
        rows=lambda indices: (rows[k] for k in indices),
        default_prefix=PREFIX,
    )


KARPATHY = SourceKind(
    name="karpathy",
    form="file",
    description=(
        ".json (a Karpathy caption file such as dataset_coco.json; "
        f"{ALL_CAPTIONS}PATH for one record per caption)"
    ),
    find=_find,
    open=_open,
)
