"""Whatever `datasets.load_dataset` reads: a local directory of data files, or a Hugging Face Hub id.

    load_records("downloads/vqav2", "validation[:1000]")  # parquet/csv/json/arrow files (`hf download`)
    load_records("HuggingFaceM4/VQAv2", "validation")     # anything that is not a local path: a hub id

A hub id is tried last, for a string no other source claims and no local path exists for; when the
hub cannot be reached the error says how to download the data and point at the local copy.
"""

from __future__ import annotations

from pathlib import Path

from pg_finetune.data.source import Request, Source, SourceKind, short_error
from pg_finetune.data.table import pick_split, table_source

_DATA_FILE_SUFFIXES = (".parquet", ".csv", ".arrow", ".json")


def _find_directory(request: Request) -> Path | None:
    d = request.path
    return d if d.is_dir() and any(p.suffix in _DATA_FILE_SUFFIXES for p in d.rglob("*")) else None


def _open_directory(path: Path, request: Request) -> Source:
    import datasets

    try:
        obj = datasets.load_dataset(str(path))
    except Exception as err:  # datasets raises many types for "no data files here"
        raise ValueError(f"cannot read directory {request.source!r}: {short_error(err)}") from err
    ds = pick_split(obj, request.split, request.source)
    return table_source(ds, f"dataset {request.source} split {request.split}", request.split, request.columns)


def _find_hub_id(request: Request) -> str | None:
    return request.source if not request.path.exists() else None


def _open_hub_id(source: str, request: Request) -> Source:
    import datasets

    split = request.split
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:  # offline, unknown id, gated, no such split: one actionable message
        raise ValueError(
            f"cannot load dataset {source!r} split {split!r} from the Hugging Face Hub ({short_error(err)}). "
            f"Download it on a machine with access (hf download {source} --repo-type dataset --local-dir DIR, "
            f"or datasets.load_dataset({source!r}).save_to_disk(DIR)) and point data.train at the local "
            f"copy, or check the id. (No local file or directory named {source!r} exists either.)"
        ) from err
    return table_source(ds, f"dataset {source} split {split}", split, request.columns)


DATA_FILES = SourceKind(
    name="data-files",
    form="directory",
    description=(
        "data files datasets.load_dataset can read (parquet, csv, json, arrow; e.g. from `hf download`)"
    ),
    find=_find_directory,
    open=_open_directory,
)

HUB = SourceKind(
    name="hub",
    form="name",
    description="a Hugging Face Hub dataset id (anything that is not a local path)",
    find=_find_hub_id,
    open=_open_hub_id,
)
