"""The interface every data source implements, and the helpers sources share.

A kind of source is a `SourceKind`: how to recognise a source string (`find`) and how to open one
split of it (`open`). Opening gives a `Source`: a name, a row count, `rows(indices)` yielding raw
rows, and optionally a way to fetch a row's image. `load_records` (records.py) asks the registry
(registry.py) which kind a string is, opens it, then slices, checks and keeps the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Field names with a fixed meaning in a record; a source column of the same name is not kept as an extra.
RESERVED = ("image", "prefix", "suffix", "id", "where")


@dataclass(frozen=True)
class Columns:
    """Which source columns hold the image, the prompt and the target (`data.image_column`, ...)."""

    image: str = "image"
    prefix: str = "prefix"
    suffix: str = "suffix"


@dataclass(frozen=True)
class Request:
    """What `load_records` asks of a source: one split of `source`, read with these options."""

    source: str  # as the caller wrote it: sources name it in their errors
    split: str  # the split's name, its slice already removed ("train[:10%]" -> "train")
    columns: Columns = Columns()
    image_root: str | None = None  # only sources whose image paths are not relative to a file use it
    config: str | None = None  # a dataset configuration name (`load_dataset(path, config)`); kinds with `takes_config`

    @property
    def path(self) -> Path:
        return Path(self.source).expanduser()


@dataclass
class Source:
    """One split of one source, before slicing and validation.

    `rows(indices)` yields one raw row per position in `range(num_rows)` it is given, with canonical
    keys: `image` (a file path, bytes, or a key for `fetch_image`), `prefix` and `suffix` when the
    source has them, `id`, `where` (where the row is, for error messages: `data/train.jsonl:12`) and
    every other field as it is. A row that could not even be parsed carries `_bad: (reason, field,
    problem)` instead, and `load_records` reports it like any other bad record.
    """

    name: str  # names the records in logs and errors: "dataset DIR split train"
    num_rows: int
    rows: Callable[[range], Iterator[dict]]
    fetch_image: Callable[[Any], Any] | None = None  # row's `image` -> what open_image reads; None: it is one
    columns: Sequence[str] | None = None  # known up front for table sources: checked before any row
    check_files: bool = True  # `image` values are file paths, cheap to stat: missing files fail at load
    default_prefix: str | None = None  # prompt for rows without one when load_records is given none
    notes: list[str] = field(default_factory=list)  # logged once when the source is opened


@dataclass(frozen=True)
class SourceKind:
    """One kind of source, as the registry lists it (registry.py; the first kind that finds wins).

    `find(request)` returns what to open (a path, a name) when `request.source` is of this kind, else
    None; it reads no file. `open(found, request)` returns the `Source` for `request.split`, or raises
    ValueError / FileNotFoundError naming the source. `form` groups kinds for the error an unclaimed
    string gets: a file or directory that no kind finds is told the `description` of every kind of
    that form. `takes_config`: the kind passes `request.config` to `datasets.load_dataset`; the
    registry refuses a configuration name for every other kind. `splits(directory)`, for a directory
    kind that can tell: the split names the directory holds in its layout (for that same error).
    """

    name: str
    form: Literal["name", "file", "directory"]
    description: str
    find: Callable[[Request], Any]
    open: Callable[[Any, Request], Source]
    takes_config: bool = False
    splits: Callable[[Path], set[str]] | None = None


def canonical(obj: dict, columns: Columns) -> dict:
    """Rename the configured columns to `image`/`prefix`/`suffix`; keep every other field."""
    used = {columns.image, columns.prefix, columns.suffix}
    row = {k: v for k, v in obj.items() if k not in used and k not in RESERVED}
    for name, column in (("image", columns.image), ("prefix", columns.prefix), ("suffix", columns.suffix)):
        if column in obj:
            row[name] = obj[column]
    # VQAv2 (and the VQA evaluation's result files) name examples by `question_id`
    for key in ("id", "question_id"):
        if obj.get(key) is not None:
            row["id"] = str(obj[key])
            break
    return row


def short_error(err: Exception) -> str:
    """`TypeName: first line` of an exception, for messages that wrap a library's error."""
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:300]}" if first_line else type(err).__name__


def first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)
