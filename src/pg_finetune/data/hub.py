"""Whatever `datasets.load_dataset` reads: a local directory of data files, or a Hugging Face Hub id.

    load_records("downloads/vqav2", "validation[:1000]")  # parquet/csv/json/arrow files (`hf download`)
    load_records("HuggingFaceM4/VQAv2", "validation")     # anything that is not a local path: a hub id

    load_records("downloads/plates", "train", config="full")  # a dataset configuration (`configs:` in README.md)

A hub id is tried last, for a string no other source claims and no local path exists for; when the
hub cannot be reached the error says how to download the data and point at the local copy. Every
kind here passes a configuration name (data.train_config / data.eval_config) to `load_dataset(path, name)`.
"""

from __future__ import annotations

from pathlib import Path

from pg_finetune.data.source import Request, Source, SourceKind, short_error
from pg_finetune.data.table import pick_split, table_source

_DATA_FILE_SUFFIXES = (".parquet", ".csv", ".arrow", ".json")


def _find_directory(request: Request) -> Path | None:
    d = request.path
    return d if d.is_dir() and any(p.suffix in _DATA_FILE_SUFFIXES for p in d.rglob("*")) else None


def _find_repository(request: Request) -> Path | None:
    """A dataset repository as `hf download` leaves it: README.md whose YAML header has `configs:`.

    Reads the README's header only. Found before the layouts that look at file names, so a repository
    whose data files happen to be `train.jsonl` still gets its configurations.
    """
    readme = request.path / "README.md"
    if not readme.is_file():
        return None
    with open(readme, encoding="utf-8", errors="replace") as f:
        if f.readline().strip() != "---":
            return None
        for _, line in zip(range(10_000), f, strict=False):
            if line.strip() == "---":
                return None
            if line.startswith("configs:"):
                return request.path
    return None


def _open_directory(path: Path, request: Request) -> Source:
    import datasets

    try:
        obj = datasets.load_dataset(str(path), request.config, cache_dir=_local_cache_dir(path))
    except Exception as err:  # datasets raises many types for "no data files here" (and for an unknown config)
        raise ValueError(f"cannot read directory {request.source!r}{_config_words(request)}: {short_error(err)}") from err
    ds = pick_split(obj, request.split, request.source)
    return table_source(ds, _name(request.source, request), request.split, request.columns)


def _local_cache_dir(path: Path) -> str:
    """A datasets cache directory of this folder's own: its absolute path and every file's size and mtime.

    datasets (5.x) keys its cache of a local dataset repository (README `configs:`) by the folder's
    name and the files' relative paths only: an edited data file, or another folder of the same name
    and layout, loads the rows cached the first time (tests/test_data_as_is.py shows both). Under a
    directory named by the files' state, a changed folder gets its own cache and an unchanged one
    reuses it.
    """
    import hashlib

    import datasets

    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=10)
    for file in sorted(path.rglob("*")):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "pg_finetune_local" / f"{path.name}-{digest.hexdigest()}")


def _config_words(request: Request) -> str:
    return f" (configuration {request.config!r})" if request.config else ""


def _name(source: str, request: Request) -> str:
    config = f" config {request.config}" if request.config else ""
    return f"dataset {source}{config} split {request.split}"


def _find_hub_id(request: Request) -> str | None:
    return request.source if not request.path.exists() else None


def _open_hub_id(source: str, request: Request) -> Source:
    import datasets

    split = request.split
    try:
        ds = datasets.load_dataset(source, request.config, split=split)
    except Exception as err:  # offline, unknown id or config, gated, no such split: one actionable message
        config_arg = f", {request.config!r}" if request.config else ""
        raise ValueError(
            f"cannot load dataset {source!r}{_config_words(request)} split {split!r} from the Hugging Face Hub "
            f"({short_error(err)}). Download it on a machine with access (hf download {source} --repo-type "
            f"dataset --local-dir DIR, which keeps every configuration, or datasets.load_dataset({source!r}"
            f"{config_arg}).save_to_disk(DIR)) and point data.train at the local copy, or check the id. "
            f"(No local file or directory named {source!r} exists either.)"
        ) from err
    return table_source(ds, _name(source, request), split, request.columns)


DATA_FILES = SourceKind(
    name="data-files",
    form="directory",
    description=(
        "data files datasets.load_dataset can read (parquet, csv, json, arrow; e.g. from `hf download`)"
    ),
    find=_find_directory,
    open=_open_directory,
    takes_config=True,
)

REPOSITORY = SourceKind(
    name="dataset-repo",
    form="directory",
    description="a dataset repository: README.md with a `configs:` block, data files as it lists them",
    find=_find_repository,
    open=_open_directory,
    takes_config=True,
)

HUB = SourceKind(
    name="hub",
    form="name",
    description="a Hugging Face Hub dataset id (anything that is not a local path)",
    find=_find_hub_id,
    open=_open_hub_id,
    takes_config=True,
)
