"""Image folders, Hugging Face's `imagefolder` layout: `metadata.jsonl` beside the images.

    folder/metadata.jsonl          {"file_name": "cat.png", "caption": "a cat"}   (split "train" only)
    folder/{split}/metadata.jsonl  (any split)

`file_name` names the image, relative to metadata.jsonl (unless `data.image_column` names another
column); every other column is kept. A record's id is its file name.
"""

from __future__ import annotations

from pathlib import Path

from pg_finetune.data.jsonl import read_jsonl
from pg_finetune.data.source import Columns, Request, Source, SourceKind, first_existing


def _find(request: Request) -> Path | None:
    d, s = request.path, request.split
    if not d.is_dir():
        return None
    return first_existing(d / s / "metadata.jsonl", *([d / "metadata.jsonl"] if s == "train" else []))


def _splits(directory: Path) -> set[str]:
    """The splits `_find` would find: `{split}/metadata.jsonl`, and "train" for a top-level metadata.jsonl."""
    names = {p.parent.name for p in directory.glob("*/metadata.jsonl")}
    return names | ({"train"} if (directory / "metadata.jsonl").is_file() else set())


def _open(metadata: Path, request: Request) -> Source:
    columns = request.columns
    image_column = "file_name" if columns.image == "image" else columns.image
    return read_jsonl(
        metadata,
        str(metadata),
        Columns(image_column, columns.prefix, columns.suffix),
        default_id=lambda number, obj: str(obj.get(image_column) or f"{metadata.parent.name}-{number}"),
    )


IMAGEFOLDER = SourceKind(
    name="imagefolder",
    form="directory",
    description="an image folder with {split}/metadata.jsonl (or metadata.jsonl, for split 'train')",
    find=_find,
    open=_open,
    splits=_splits,
)
