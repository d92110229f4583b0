"""JSONL sources: one JSON object per line, `image` relative to the file.

    load_records("data/train.jsonl")                 # a file: its split name is not checked, only its slice
    load_records("data/", "val")                     # data/val.jsonl, data/val/annotations.jsonl or
                                                     # data/_annotations.val.jsonl

big_vision's jsonl source and roboflow/maestro use the same field names (`image`, `prefix`,
`suffix`); the directory layouts are maestro's (`{split}/annotations.jsonl`) and roboflow's
(`_annotations.{split}.jsonl`). `read_jsonl` is shared with the image-folder source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pg_finetune.data.source import Columns, Request, Source, SourceKind, canonical, first_existing
from pg_finetune.jsonl import jsonl_lines


def read_jsonl(
    path: Path, display: str, columns: Columns, *, default_id: Callable[[int, dict], str]
) -> Source:
    """One JSON object per non-blank line; relative image paths resolve against the file's directory."""
    lines = list(jsonl_lines(path))
    base_dir = path.parent

    def rows(indices: range) -> Iterator[dict]:
        for k in indices:
            number, text, problem = lines[k]
            where = f"{display}:{number}"
            if text is None:
                yield {"where": where, "_bad": ("not UTF-8", "line", problem)}
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield {"where": where, "_bad": ("invalid JSON", "line", f"invalid JSON ({err})")}
                continue
            if not isinstance(obj, dict):
                yield {
                    "where": where,
                    "_bad": ("invalid JSON", "line", f"not a JSON object ({type(obj).__name__})"),
                }
                continue
            row = canonical(obj, columns)
            image = row.get("image")
            if isinstance(image, str) and image:
                row["image"] = os.path.join(base_dir, image)  # join keeps absolute paths as they are
            elif image is not None and image != "":
                kind = type(image).__name__
                row["_bad"] = ("image not a path", "image", f"image must be a path string, got {kind}")
            row.setdefault("id", default_id(number, obj))
            row["where"] = where
            yield row

    return Source(name=display, num_rows=len(lines), rows=rows)


def _jsonl_file(path: Path, display: str, columns: Columns) -> Source:
    return read_jsonl(path, display, columns, default_id=lambda number, _: f"{path.stem}-{number}")


def _find_file(request: Request) -> Path | None:
    return request.path if request.source.endswith(".jsonl") and not request.path.is_dir() else None


def _open_file(path: Path, request: Request) -> Source:
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {request.source}")
    return _jsonl_file(path, request.source, request.columns)


def _find_in_directory(request: Request) -> Path | None:
    d, s = request.path, request.split
    if not d.is_dir():
        return None
    return first_existing(d / f"{s}.jsonl", d / s / "annotations.jsonl", d / f"_annotations.{s}.jsonl")


def _splits_in_directory(directory: Path) -> set[str]:
    """The splits `_find_in_directory` would find, in any of its three layouts (an image folder's
    top-level metadata.jsonl is that layout's "train", not a split named "metadata")."""
    names = {p.stem for p in directory.glob("*.jsonl") if not p.name.startswith("_annotations.")} - {"metadata"}
    names |= {p.name[len("_annotations.") : -len(".jsonl")] for p in directory.glob("_annotations.*.jsonl")}
    return names | {p.parent.name for p in directory.glob("*/annotations.jsonl")}


def _open_in_directory(path: Path, request: Request) -> Source:
    return _jsonl_file(path, str(path), request.columns)


FILE = SourceKind(
    name="jsonl",
    form="file",
    description=".jsonl (one JSON object per line)",
    find=_find_file,
    open=_open_file,
)

DIRECTORY = SourceKind(
    name="jsonl-directory",
    form="directory",
    description="{split}.jsonl, {split}/annotations.jsonl or _annotations.{split}.jsonl",
    find=_find_in_directory,
    open=_open_in_directory,
    splits=_splits_in_directory,
)
