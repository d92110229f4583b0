"""Records: load one split of any source, check its rows, and decode images lazily.

    ds = load_records("data/train.jsonl", "train[:10%]", default_prefix="caption en")
    ds[0]               # decodes this record's image now; None if it is bad and skip_bad_records is on
    ds.rows_meta(0)     # the same record without decoding the image
    ds.skipped          # Counter of reasons for records dropped or skipped (DataLoader workers included)

Text fields are checked when the source is loaded (cheap: no image is decoded), and a path that
does not exist is caught then too; images are decoded one by one in `__getitem__`.

A suffix that is a number becomes text (`suffix_text`): hub tables often keep a class or a count
as one (count-intersections' `label` is an int).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pg_finetune.data.image_cache import ImageCache
from pg_finetune.data.registry import open_source
from pg_finetune.data.source import RESERVED, Columns, Request, Source
from pg_finetune.data.splits import parse_split, split_indices
from pg_finetune.images import BadRecordError, image_path, open_image

logger = logging.getLogger(__name__)

# A task's `check_target` (pg_finetune.tasks.base.Task): suffix -> None if well-formed, else the problem.
TargetCheck = Callable[[str], str | None]

# Fields the text tasks read their references from (tasks/caption.py, vqa.py, ocr.py: `text_references`);
# data.lowercase_suffix lower-cases them with the suffix, so eval compares like with like.
REFERENCE_TEXT_FIELDS = ("captions", "answers", "texts")

# Why an image failed to decode (BadRecordError.reason from pg_finetune.images.open_image), as a one-byte
# code in the shared `RecordDataset` marks; a reason not listed counts as the last one.
DECODE_REASONS = (
    "image cannot be decoded",
    "image file not found",
    "missing image",
    "unsupported image type",
    "image too large",
    "image cannot be read",
)


class RecordDataset(Dataset):
    """Records whose images are decoded lazily, one per `__getitem__`.

    Holds only light rows: text fields plus an image reference (a path, bytes, or a row number
    into a memory-mapped `datasets` table). With `skip_bad_records`, an image that fails to
    decode makes `__getitem__` return None (the collator drops it), counts the reason in
    `skipped` and logs a warning naming `where`. A record is counted once however many epochs or
    DataLoader workers read it: a bad decode marks the record in a shared-memory byte array (a torch
    tensor: inherited under fork, passed by handle under spawn/forkserver), and `skipped` adds the
    marks to the load-time counts when it is read, in the process that reads it.

    Decoded images are kept in an `ImageCache` of `image_cache_mb` megabytes (per process), keyed by
    the image reference, so a record that shares another's image, or a later epoch, skips the
    decode. Each read returns its own copy. 0 turns the cache off.
    """

    def __init__(
        self,
        name: str,
        metas: list[dict],
        image_refs: list[Any],
        *,
        fetch_image: Callable[[Any], Any] | None = None,
        skip_bad_records: bool = False,
        skipped: Counter | None = None,
        image_cache_mb: float = 256.0,
    ):
        if len(metas) != len(image_refs):
            raise ValueError(f"{len(metas)} rows but {len(image_refs)} image references")
        self.name = name
        self.skip_bad_records = skip_bad_records
        self._skipped: Counter = skipped if skipped is not None else Counter()
        self._metas = metas
        self._image_refs = image_refs
        self._fetch_image = fetch_image
        # 0 = not found bad; k = DECODE_REASONS[k - 1]. Shared with DataLoader workers, which write it.
        self._bad_marks = torch.zeros(len(metas) if skip_bad_records else 0, dtype=torch.uint8).share_memory_()
        self._counted: set[int] = set()  # marks already added to _skipped in this process
        self.image_cache_mb = image_cache_mb
        self._images = ImageCache(image_cache_mb)

    def __len__(self) -> int:
        return len(self._metas)

    def __getitem__(self, index: int) -> dict | None:
        meta = self._metas[index]
        ref = self._image_refs[index]
        try:
            image = self._image(ref, meta["where"])
        except BadRecordError as err:
            if not self.skip_bad_records:
                raise
            if self._bad_marks[index] == 0:  # count each record once, however many epochs or workers read it
                code = DECODE_REASONS.index(err.reason) if err.reason in DECODE_REASONS else len(DECODE_REASONS) - 1
                self._bad_marks[index] = code + 1
                logger.warning("skipping bad record %s", err.problems[0][0] + ": " + err.problem)
            return None
        return {"image": image, **meta}

    @property
    def skipped(self) -> Counter:
        """Reasons of the records dropped at load time or found bad since, by any process of this dataset.

        The same Counter every time (callers may add to it); records marked bad by DataLoader workers
        are added when it is read.
        """
        for index in torch.nonzero(self._bad_marks).flatten().tolist():
            if index not in self._counted:
                self._counted.add(index)
                self._skipped[DECODE_REASONS[int(self._bad_marks[index]) - 1]] += 1
        return self._skipped

    def known_bad(self, index: int) -> bool:
        """Whether record `index` was found bad by any process (its image did not decode)."""
        return bool(self._bad_marks.numel()) and bool(self._bad_marks[index])

    def _image(self, ref: Any, where: str) -> Image.Image:
        # str paths, raw bytes and row numbers identify an image; anything else is decoded every time
        key = ref if self.image_cache_mb > 0 and isinstance(ref, (str, bytes, int)) else None
        if key is not None:
            cached = self._images.get(key)
            if cached is not None:
                return cached
        image = open_image(self._fetch_image(ref) if self._fetch_image else ref, where)
        if key is not None:
            self._images.put(key, image)
        return image

    def rows_meta(self, index: int) -> dict:
        """The record without its image (prefix, suffix, id, where, extra fields); decodes nothing."""
        return dict(self._metas[index])

    def __repr__(self) -> str:
        skipped = f", skipped {dict(self.skipped)}" if self.skipped else ""
        return f"RecordDataset({self.name}: {len(self)} records{skipped})"


# ------------------------------------------------------------------------------------------ checks
def _bad(row: dict, reason: str, field_name: str, problem: str) -> BadRecordError:
    return BadRecordError(row["where"], field_name, problem, reason=reason)


def suffix_text(value: Any) -> str | None:
    """A suffix value as text; None for a missing one (None, or NaN: pandas' mark of a missing number).

    The rule: a string as it is; an integer (Python, numpy) as its digits (3 -> "3"); a finite float
    with an integral value as that integer (3.0 -> "3": a pandas int column with a gap is float), any
    other float as the shortest text that reads back to it at its own precision (0.25 -> "0.25";
    numpy float32 0.1 -> "0.1", not 0.10000000149011612). Refused with ValueError: booleans (True is
    no caption: "yes", "true" or "1" is for the data to say), infinities, and lists, dicts, arrays
    (a target is one text: joining would guess a separator; one record per target instead).
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"suffix is a boolean ({value}): write the text it stands for (e.g. 'yes'/'no') in the data")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise ValueError(f"suffix is {value}, not a finite number")
        if float(value).is_integer():
            return str(int(value))
        return str(value) if isinstance(value, np.floating) else repr(float(value))
    if isinstance(value, list | tuple | np.ndarray):
        shown = repr(list(value)[:3])[:80]
        raise ValueError(
            f"suffix must be a string or a number, got a {type(value).__name__} of {len(value)} values ({shown}): "
            "a target is one text; make one record per target, or keep the other references in the field "
            f"the task reads them from ({', '.join(REFERENCE_TEXT_FIELDS)})"
        )
    raise ValueError(f"suffix must be a string or a number, got {type(value).__name__}")


def _lowercase_references(value: Any) -> Any:
    """A reference field with its texts lower-cased: strings, lists of strings, VQAv2 answer dicts."""
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, list):
        return [_lowercase_references(v) for v in value]
    if isinstance(value, dict):
        return {k: v.lower() if k in ("answer", "raw", "caption") and isinstance(v, str) else v for k, v in value.items()}
    return value


def _check_row(
    row: dict,
    default_prefix: str | None,
    require_suffix: bool,
    check_target: TargetCheck | None = None,
    lowercase_suffix: bool = False,
) -> tuple[dict, Any]:
    """(meta, image_ref) for a good row; raise BadRecordError naming the field otherwise. Decodes nothing."""
    if "_bad" in row:
        raise _bad(row, *row["_bad"])
    image = row.get("image")
    if image is None or image == "":
        raise _bad(row, "missing image", "image", "missing image")
    prefix = row.get("prefix")
    if prefix is None:
        if default_prefix is None:
            raise _bad(
                row, "missing prefix", "prefix", "missing prefix (and no default prefix: set task.prefix)"
            )
        prefix = default_prefix
        if "{" in prefix:  # a template such as "answer en {question}", filled from the row's fields
            try:
                prefix = prefix.format_map(row)
            except (KeyError, IndexError, ValueError) as err:
                raise _bad(
                    row,
                    "prefix template field missing",
                    "prefix",
                    f"task.prefix template {default_prefix!r} needs field {err}, which this record lacks",
                ) from None
    if not isinstance(prefix, str):
        raise _bad(
            row, "prefix not a string", "prefix", f"prefix must be a string, got {type(prefix).__name__}"
        )
    raw_suffix = row.get("suffix")
    try:
        suffix = suffix_text(raw_suffix)
    except ValueError as err:
        raise _bad(row, "suffix not a string", "suffix", str(err)) from None
    if suffix is None and raw_suffix is not None and require_suffix:  # NaN
        raise _bad(row, "missing suffix", "suffix", "missing suffix (NaN, pandas' mark of a missing value)")
    if suffix is not None and lowercase_suffix:
        suffix = suffix.lower()
    if suffix is not None and not suffix.strip():
        if require_suffix:
            raise _bad(row, "empty suffix", "suffix", "empty suffix (there is nothing to train on)")
        suffix = None
    if suffix is None and require_suffix:
        raise _bad(row, "missing suffix", "suffix", "missing suffix (the training target)")
    if suffix is not None and check_target is not None:
        problem = check_target(suffix)
        if problem:
            raise _bad(row, "malformed target", "suffix", f"suffix is not a valid target for the task: {problem}")
    extras = {k: v for k, v in row.items() if k not in RESERVED}
    if lowercase_suffix:
        extras.update({k: _lowercase_references(extras[k]) for k in REFERENCE_TEXT_FIELDS if k in extras})
    return {"prefix": prefix, "suffix": suffix, "id": row["id"], "where": row["where"], **extras}, image


def _check_columns(
    source: Source, columns: Columns, default_prefix: str | None, require_suffix: bool
) -> None:
    """For table sources, a missing column is one clear error rather than one per row."""
    if source.columns is None:
        return
    have = ", ".join(source.columns)
    problems = []
    if columns.image not in source.columns:
        problems.append(f"no image column {columns.image!r} (set data.image_column)")
    if columns.prefix not in source.columns and default_prefix is None:
        problems.append(
            f"no prefix column {columns.prefix!r} and no default prefix (set data.prefix_column or task.prefix)"
        )
    if columns.suffix not in source.columns and require_suffix:
        problems.append(f"no suffix column {columns.suffix!r} (set data.suffix_column)")
    if problems:
        raise ValueError(f"{source.name}: " + "; ".join(problems) + f". Columns: {have}")


def load_records(
    source: str | os.PathLike,
    split: str = "train",
    *,
    image_column: str = "image",
    prefix_column: str = "prefix",
    suffix_column: str = "suffix",
    default_prefix: str | None = None,
    require_suffix: bool = True,
    limit: int | None = None,
    skip_bad_records: bool = False,
    image_cache_mb: float = 256.0,
    image_root: str | os.PathLike | None = None,
    check_target: TargetCheck | None = None,
    config: str | None = None,
    lowercase_suffix: bool = False,
) -> RecordDataset:
    """Load one split of `source` as a RecordDataset (`pg_finetune.data` lists sources and splits).

    Rows with bad text fields, a missing image, or an image path that does not exist raise one
    BadRecordError listing them all, or with `skip_bad_records` are dropped, counted in
    `.skipped` and summarised in one warning. `limit` caps the number of good records kept.
    For a single-file source (a .jsonl file, a saved single Dataset) the split's name is not
    checked; only its slice applies.

    `default_prefix` is the prompt of rows without one (a template such as "answer en {question}"
    is filled from the row's fields); without it, a source's own default applies (Karpathy JSON:
    "caption en"). `image_root` is where a Karpathy caption JSON's images live
    (IMAGE_ROOT/filepath/filename; default: the JSON's directory); every other source resolves
    its images its own way (JSONL: relative to the file) and ignores it.

    `check_target` is the task's target grammar (`Task.check_target`, e.g. detection's location
    tokens): a record whose non-empty suffix it refuses is a bad record ("malformed target").

    `config` is a dataset configuration name for `datasets.load_dataset(path, config)` (a hub id or a
    directory of data files with `configs:` in its README.md); any other source refuses one.
    `lowercase_suffix` lower-cases each suffix and the reference texts in `captions`, `answers` and
    `texts`, as the big_vision PaliGemma colab lower-cases its long captions.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of records or None, got {limit}")
    source = os.fspath(source)
    base_split, part = parse_split(split)
    columns = Columns(image_column, prefix_column, suffix_column)
    root = os.fspath(image_root) if image_root is not None else None
    src = open_source(Request(source, base_split, columns, root, config))
    if default_prefix is None:
        default_prefix = src.default_prefix
    _check_columns(src, columns, default_prefix, require_suffix)
    for note in src.notes:
        logger.info("%s: %s", src.name, note)
    indices = split_indices(part, src.num_rows)

    metas: list[dict] = []
    refs: list[Any] = []
    skipped: Counter = Counter()
    problems: list[BadRecordError] = []
    file_exists: dict[str, bool] = {}
    for row in src.rows(indices):
        if limit is not None and len(metas) >= limit:
            break
        try:
            meta, ref = _check_row(row, default_prefix, require_suffix, check_target, lowercase_suffix)
            path = image_path(ref) if src.check_files else None
            if path is not None:
                if path not in file_exists:
                    file_exists[path] = os.path.isfile(path)
                if not file_exists[path]:
                    raise _bad(row, "image file not found", "image", f"image file not found: {path}")
        except BadRecordError as err:
            skipped[err.reason] += 1
            problems.append(err)
            continue
        metas.append(meta)
        refs.append(ref)

    if problems and not skip_bad_records:
        first = problems[0]
        raise BadRecordError(
            first.where,
            first.field,
            first.problem,
            reason=first.reason,
            problems=[(p.where, p.field, p.problem) for p in problems],
        )
    if problems:
        first_wheres = ", ".join(p.where for p in problems[:5])
        counts = ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common())
        logger.warning(
            "%s: skipped %d bad records (%s); first: %s", src.name, len(problems), counts, first_wheres
        )
    if not metas:
        raise ValueError(
            f"{src.name}: no usable records in split {split!r} "
            f"({src.num_rows} rows, {len(indices)} after slicing, {len(problems)} bad)"
        )
    return RecordDataset(
        src.name if split == base_split else f"{src.name} (split {split})",
        metas,
        refs,
        fetch_image=src.fetch_image,
        skip_bad_records=skip_bad_records,
        skipped=skipped,
        image_cache_mb=image_cache_mb,
    )
