"""A directory written by `datasets`' `save_to_disk` (a DatasetDict, or a single Dataset whose split
name only names it), memory-mapped: images are decoded one by one, when a record is read.
"""

from __future__ import annotations

from pathlib import Path

from pg_finetune.data.source import Request, Source, SourceKind, first_existing
from pg_finetune.data.table import pick_split, table_source


def _find(request: Request) -> Path | None:
    d = request.path
    return d if d.is_dir() and first_existing(d / "dataset_dict.json", d / "state.json") else None


def _open(path: Path, request: Request) -> Source:
    import datasets

    ds = pick_split(datasets.load_from_disk(str(path)), request.split, request.source)
    return table_source(ds, f"dataset {request.source} split {request.split}", request.split, request.columns)


SAVED = SourceKind(
    name="save_to_disk",
    form="directory",
    description="a datasets save_to_disk directory (dataset_dict.json or state.json)",
    find=_find,
    open=_open,
)
