"""Load records for PaliGemma fine-tuning from JSONL, a local dataset dir, an image folder, the hub, or built-ins.

A record is a plain dict:

    {"image": <PIL RGB image>, "prefix": "answer en what color is the shape?", "suffix": "blue",
     "id": "easyvqa-train-1", "where": "builtin:easyvqa train #1", "answers": ["blue"], ...}

`where` locates the record for error messages (`data/train.jsonl:12`, `dataset NAME split train
row 5`, `builtin:easyvqa train #17`); every other source field is kept as it is.

    ds = load_records("data/train.jsonl", "train[:10%]", default_prefix="caption en")
    ds[0]               # decodes this record's image now; None if it is bad and skip_bad_records is on
    ds.rows_meta(0)     # the same record without decoding the image
    ds.skipped          # Counter of reasons for records dropped or skipped

Text fields are checked when the source is loaded (cheap: no image is decoded), and a path that
does not exist is caught then too; images are decoded one by one in `__getitem__`. Sources:

- `builtin:easyvqa` / `builtin:easyvqa-caption` / `builtin:easyvqa-detect`: the easy-vqa PyPI
  package, offline (detect: one box per image, from the shape's pixels);
- `path/to/file.jsonl`: one JSON object per line, `image` relative to the file (big_vision's
  jsonl source and roboflow/maestro use the same names); a directory holding `{split}.jsonl`,
  `{split}/annotations.jsonl` (maestro) or `_annotations.{split}.jsonl` (roboflow) works too;
- a `datasets` `save_to_disk` directory, or any directory `datasets.load_dataset` can read;
- an image folder: `metadata.jsonl` (or `{split}/metadata.jsonl`) with `file_name` + columns;
- anything else is a hub dataset id for `datasets.load_dataset`.

Splits may carry a slice, the same for every source: `train[:100]`, `train[10:20]`,
`train[:10%]`, `train[90%:]` (percent bounds round as `datasets` does).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from pg_finetune.images import BadRecordError, image_path, open_image

logger = logging.getLogger(__name__)

__all__ = ["BUILTINS", "BadRecordError", "RecordDataset", "load_records", "parse_split", "split_indices"]

# Field names with a fixed meaning in a record; a source column of the same name is not kept as an extra.
_RESERVED = ("image", "prefix", "suffix", "id", "where")


# ------------------------------------------------------------------------------------------ splits
_SPLIT_RE = re.compile(r"^\s*(?P<name>[\w.\-]+)\s*(?:\[(?P<start>[^\]:]*):(?P<stop>[^\]:]*)\])?\s*$")
_BOUND_RE = re.compile(r"^\d+%?$")


def parse_split(split: str) -> tuple[str, slice]:
    """`"train[:10%]"` -> `("train", slice(None, "10%"))`.

    Bounds are None, an int (row count) or a string `"N%"` (percent of the split); resolve them
    against a split's size with `split_indices`. Negative or malformed bounds raise ValueError.
    """
    match = _SPLIT_RE.match(split) if isinstance(split, str) else None
    if not match:
        raise ValueError(
            f"malformed split {split!r}: expected a name with an optional slice, "
            "e.g. 'train', 'train[:100]', 'train[10:20]', 'train[:10%]', 'train[90%:]'"
        )
    bounds: list[int | str | None] = []
    for text in (match["start"], match["stop"]):
        text = (text or "").strip()
        if not text:
            bounds.append(None)
            continue
        if not _BOUND_RE.match(text):
            raise ValueError(
                f"bad slice bound {text!r} in split {split!r}: use a non-negative row number "
                "or a percentage like '10%' (negative bounds are not supported)"
            )
        if text.endswith("%"):
            if int(text[:-1]) > 100:
                raise ValueError(f"bad slice bound {text!r} in split {split!r}: a percentage must be 0..100")
            bounds.append(text)
        else:
            bounds.append(int(text))
    return match["name"], slice(bounds[0], bounds[1])


def split_indices(part: slice, num_rows: int) -> range:
    """The rows a parsed slice selects from a split of `num_rows` rows (clipped like a Python slice)."""

    def resolve(bound: int | str | None, default: int) -> int:
        if bound is None:
            return default
        if isinstance(bound, str):
            # datasets' ReadInstruction rounds percent boundaries to the closest row ("closest")
            return int(round(int(bound[:-1]) * num_rows / 100.0))
        return min(bound, num_rows)

    start, stop = resolve(part.start, 0), resolve(part.stop, num_rows)
    return range(start, max(start, stop))


# ------------------------------------------------------------------------------------------ dataset
class RecordDataset(Dataset):
    """Records whose images are decoded lazily, one per `__getitem__`.

    Holds only light rows: text fields plus an image reference (a path, bytes, or a row number
    into a memory-mapped `datasets` table). With `skip_bad_records`, an image that fails to
    decode makes `__getitem__` return None (the collator drops it), counts the reason in
    `skipped` and logs a warning naming `where`. Note that DataLoader workers count in their own
    process, so the main process's `skipped` only shows load-time drops and its own reads.

    Decoded images are kept in a least-recently-used cache of `image_cache_mb` megabytes (per
    process), keyed by the image reference: VQA sets ask many questions about one image (easy-VQA:
    38k questions, 4k images; VQAv2: ~5 per image) and every epoch reads every image again, so most
    reads skip the decode. Each read returns its own copy. 0 turns the cache off.
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
        self.skipped: Counter = skipped if skipped is not None else Counter()
        self._metas = metas
        self._image_refs = image_refs
        self._fetch_image = fetch_image
        self._bad_indices: set[int] = set()
        self.image_cache_mb = image_cache_mb
        self._images: OrderedDict[Any, Image.Image] = OrderedDict()
        self._image_bytes = 0

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
            if index not in self._bad_indices:  # count each record once, however many epochs read it
                self._bad_indices.add(index)
                self.skipped[err.reason] += 1
                logger.warning("skipping bad record %s", err.problems[0][0] + ": " + err.problem)
            return None
        return {"image": image, **meta}

    def _image(self, ref: Any, where: str) -> Image.Image:
        # str paths, raw bytes and row numbers identify an image; anything else is decoded every time
        key = ref if self.image_cache_mb > 0 and isinstance(ref, (str, bytes, int)) else None
        if key is not None and key in self._images:
            self._images.move_to_end(key)
            return self._images[key].copy()
        image = open_image(self._fetch_image(ref) if self._fetch_image else ref, where)
        if key is not None:
            size = image.width * image.height * len(image.getbands())
            if size <= self.image_cache_mb * 2**20:
                self._images[key] = image.copy()
                self._image_bytes += size
                while self._image_bytes > self.image_cache_mb * 2**20:
                    _, old = self._images.popitem(last=False)
                    self._image_bytes -= old.width * old.height * len(old.getbands())
        return image

    def rows_meta(self, index: int) -> dict:
        """The record without its image (prefix, suffix, id, where, extra fields); decodes nothing."""
        return dict(self._metas[index])

    def __repr__(self) -> str:
        skipped = f", skipped {dict(self.skipped)}" if self.skipped else ""
        return f"RecordDataset({self.name}: {len(self)} records{skipped})"


# ------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class _Columns:
    image: str
    prefix: str
    suffix: str


@dataclass
class _Source:
    """A split of some source, before slicing and validation.

    `rows(indices)` yields raw rows with canonical keys (`image`, `prefix`, `suffix` when present,
    `where`, `id`, extras); a row that could not even be parsed carries `_bad: (reason, field, problem)`.
    """

    name: str
    num_rows: int
    rows: Callable[[range], Iterator[dict]]
    fetch_image: Callable[[Any], Any] | None = None
    columns: Sequence[str] | None = None  # known up front for table sources: checked before any row
    check_files: bool = True  # image refs are file paths that can be stat'ed cheaply
    notes: list[str] = field(default_factory=list)


def _canonical(obj: dict, columns: _Columns) -> dict:
    """Rename the configured columns to `image`/`prefix`/`suffix`; keep every other field."""
    used = {columns.image, columns.prefix, columns.suffix}
    row = {k: v for k, v in obj.items() if k not in used and k not in _RESERVED}
    for canonical, column in (
        ("image", columns.image),
        ("prefix", columns.prefix),
        ("suffix", columns.suffix),
    ):
        if column in obj:
            row[canonical] = obj[column]
    # VQAv2 (and the VQA evaluation's result files) name examples by `question_id`
    for key in ("id", "question_id"):
        if obj.get(key) is not None:
            row["id"] = str(obj[key])
            break
    return row


def _read_jsonl(
    path: Path, display: str, columns: _Columns, *, default_id: Callable[[int, dict], str]
) -> _Source:
    """One JSON object per non-blank line; relative image paths resolve against the file's directory."""
    with open(path, encoding="utf-8") as f:
        lines = [(number, text) for number, text in enumerate(f, start=1) if text.strip()]
    base_dir = path.parent

    def rows(indices: range) -> Iterator[dict]:
        for k in indices:
            number, text = lines[k]
            where = f"{display}:{number}"
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
            row = _canonical(obj, columns)
            image = row.get("image")
            if isinstance(image, str) and image:
                row["image"] = os.path.join(base_dir, image)  # join keeps absolute paths as they are
            elif image is not None and image != "":
                kind = type(image).__name__
                row["_bad"] = ("image not a path", "image", f"image must be a path string, got {kind}")
            row.setdefault("id", default_id(number, obj))
            row["where"] = where
            yield row

    return _Source(name=display, num_rows=len(lines), rows=rows)


def _jsonl_file_source(path: Path, display: str, split: str, columns: _Columns) -> _Source:
    return _read_jsonl(path, display, columns, default_id=lambda number, _: f"{path.stem}-{number}")


def _imagefolder_source(metadata: Path, display: str, split: str, columns: _Columns) -> _Source:
    # HF imagefolder convention: `file_name` names the image, relative to metadata.jsonl.
    image_column = "file_name" if columns.image == "image" else columns.image
    return _read_jsonl(
        metadata,
        display,
        _Columns(image_column, columns.prefix, columns.suffix),
        default_id=lambda number, obj: str(obj.get(image_column) or f"{metadata.parent.name}-{number}"),
    )


class _TableImages:
    """Fetch one undecoded image from a `datasets` table (a class, not a lambda, so workers can pickle it)."""

    def __init__(self, table: Any, column: str):
        self.table = table
        self.column = column

    def __call__(self, row: int) -> Any:
        return self.table[row][self.column]


def _table_source(ds: Any, name: str, split: str, columns: _Columns) -> _Source:
    """A `datasets.Dataset`: text columns read in batches, images left undecoded in the memory-mapped table."""
    import datasets

    column_names = list(ds.column_names)
    if columns.image not in column_names:
        return _Source(name=name, num_rows=len(ds), rows=lambda _: iter(()), columns=column_names)
    if isinstance(ds.features[columns.image], datasets.Image):
        ds = ds.cast_column(columns.image, datasets.Image(decode=False))  # we decode, lazily, with open_image
    # other image columns (e.g. masks) would be decoded into every meta row: leave them out
    other_images = [c for c, f in ds.features.items() if c != columns.image and isinstance(f, datasets.Image)]
    meta_columns = [c for c in column_names if c != columns.image and c not in other_images]
    text_table = ds.select_columns(meta_columns) if meta_columns else None
    image_table = ds.select_columns([columns.image])
    null_table = image_table.with_format("arrow")  # null checks without copying image bytes

    def rows(indices: range, batch_size: int = 1000) -> Iterator[dict]:
        for start in range(indices.start, indices.stop, batch_size):
            stop = min(start + batch_size, indices.stop)
            batch = text_table[start:stop] if text_table is not None else {}
            nulls = null_table[start:stop].column(columns.image).is_null().to_pylist()
            for k in range(stop - start):
                obj = {c: batch[c][k] for c in meta_columns}
                row = _canonical(obj, columns)
                row["image"] = None if nulls[k] else start + k
                row.setdefault("id", f"{split}-{start + k}")
                row["where"] = f"{name} row {start + k}"
                yield row

    notes = [f"image columns {other_images} are not loaded"] if other_images else []
    return _Source(
        name=name,
        num_rows=len(ds),
        rows=rows,
        fetch_image=_TableImages(image_table, columns.image),
        columns=column_names,
        check_files=False,
        notes=notes,
    )


def _pick_split(obj: Any, split: str, display: str) -> Any:
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise ValueError(f"{display} has no split {split!r}; splits: {', '.join(obj)}")
        return obj[split]
    return obj  # a single Dataset: the split name only names it


def _saved_source(path: Path, display: str, split: str, columns: _Columns) -> _Source:
    import datasets

    ds = _pick_split(datasets.load_from_disk(str(path)), split, display)
    return _table_source(ds, f"dataset {display} split {split}", split, columns)


def _local_loader_source(path: Path, display: str, split: str, columns: _Columns) -> _Source:
    import datasets

    try:
        obj = datasets.load_dataset(str(path))
    except Exception as err:  # datasets raises many types for "no data files here"
        raise ValueError(f"cannot read directory {display!r}: {_short(err)}") from err
    ds = _pick_split(obj, split, display)
    return _table_source(ds, f"dataset {display} split {split}", split, columns)


def _hub_source(source: str, split: str, columns: _Columns) -> _Source:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:  # offline, unknown id, gated, no such split: one actionable message
        raise ValueError(
            f"cannot load dataset {source!r} split {split!r} from the Hugging Face Hub ({_short(err)}). "
            f"Download it on a machine with access (hf download {source} --repo-type dataset --local-dir DIR, "
            f"or datasets.load_dataset({source!r}).save_to_disk(DIR)) and point data.train at the local "
            f"copy, or check the id. (No local file or directory named {source!r} exists either.)"
        ) from err
    return _table_source(ds, f"dataset {source} split {split}", split, columns)


def _short(err: Exception) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:300]}" if first_line else type(err).__name__


# Directory layouts, tried in order: (what it looks like, find the file for a split, open it).
_DirFinder = Callable[[Path, str], Path | None]
_DirOpener = Callable[[Path, str, str, _Columns], _Source]


def _first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


_DIR_LAYOUTS: list[tuple[str, _DirFinder, _DirOpener]] = [
    (
        "a datasets save_to_disk directory (dataset_dict.json or state.json)",
        lambda d, s: d if _first_existing(d / "dataset_dict.json", d / "state.json") else None,
        _saved_source,
    ),
    (
        "{split}.jsonl, {split}/annotations.jsonl or _annotations.{split}.jsonl",
        lambda d, s: _first_existing(
            d / f"{s}.jsonl", d / s / "annotations.jsonl", d / f"_annotations.{s}.jsonl"
        ),
        lambda found, display, split, columns: _jsonl_file_source(found, str(found), split, columns),
    ),
    (
        "an image folder with {split}/metadata.jsonl (or metadata.jsonl, for split 'train')",
        lambda d, s: _first_existing(
            d / s / "metadata.jsonl", *([d / "metadata.jsonl"] if s == "train" else [])
        ),
        lambda found, display, split, columns: _imagefolder_source(found, str(found), split, columns),
    ),
    (
        "data files datasets.load_dataset can read (parquet, csv, json, arrow; e.g. from `hf download`)",
        lambda d, s: (
            d if any(p.suffix in (".parquet", ".csv", ".arrow", ".json") for p in d.rglob("*")) else None
        ),
        _local_loader_source,
    ),
]


def _open_source(source: str, split: str, columns: _Columns) -> _Source:
    if source.startswith("builtin:"):
        return _builtin_source(source.removeprefix("builtin:"), split)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".jsonl":
            raise ValueError(
                f"cannot read {source!r}: a file source must be .jsonl (one JSON object per line)"
            )
        return _jsonl_file_source(path, source, split, columns)
    if path.is_dir():
        for _, find, opener in _DIR_LAYOUTS:
            found = find(path, split)
            if found is not None:
                return opener(found, source, split, columns)
        expected = "\n".join(f"  - {description}" for description, _, _ in _DIR_LAYOUTS)
        raise ValueError(
            f"cannot read directory {source!r} for split {split!r}; expected one of:\n{expected}"
        )
    if source.endswith(".jsonl"):
        raise FileNotFoundError(f"JSONL file not found: {source}")
    return _hub_source(source, split, columns)


# ------------------------------------------------------------------------------------------ built-ins
_EASYVQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
_EASYVQA_SHAPES = ("circle", "rectangle", "triangle")


def _easyvqa_split(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    import easy_vqa

    loaders = {
        "train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    }
    if split not in loaders:
        raise ValueError(f"builtin:easyvqa has no split {split!r}; splits: {', '.join(loaders)}")
    get_questions, get_paths = loaders[split]
    questions, answers, image_ids = get_questions()
    return questions, answers, image_ids, get_paths()


def _easyvqa_rows(split: str) -> list[dict]:
    questions, answers, image_ids, paths = _easyvqa_split(split)
    return [
        {
            "image": paths[image_id],
            "prefix": f"answer en {question}",
            "suffix": answer,
            "id": f"easyvqa-{split}-{i}",
            "where": f"builtin:easyvqa {split} #{i}",
            "question": question,
            "answers": [answer],
            "image_id": image_id,
        }
        for i, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids, strict=True))
    ]


def easyvqa_caption(qa_pairs: Iterable[tuple[str, str]]) -> str:
    """A templated caption ("a blue circle") from what an image's QA pairs say about it.

    easy-vqa images hold one shape of one colour. "what color/shape" answers name them; so do the
    words of a question that presupposes them ("what color is the triangle?") and of yes/no
    questions whose answer means present ("is there a red shape?" yes, "is there not a circle?" no).
    A fact no pair reveals is left out: "a circle", "a red shape", or "a shape".
    """
    color: str | None = None
    shape: str | None = None
    for question, answer in qa_pairs:
        words = set(re.findall(r"[a-z]+", question.lower()))
        if answer in ("yes", "no"):
            negated = bool(words & {"not", "no"})
            if (answer == "yes") == negated:  # the named colour/shape is absent: says nothing positive
                continue
            named = words
        else:
            named = words | {answer}
        color = color or next((c for c in _EASYVQA_COLORS if c in named), None)
        shape = shape or next((s for s in _EASYVQA_SHAPES if s in named), None)
    return f"a {color or ''} {shape or 'shape'}".replace("  ", " ")


def _easyvqa_caption_rows(split: str) -> list[dict]:
    questions, answers, image_ids, paths = _easyvqa_split(split)
    qa_by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        qa_by_image[image_id].append((question, answer))
    rows = []
    for i, image_id in enumerate(sorted(paths)):
        caption = easyvqa_caption(qa_by_image.get(image_id, []))
        rows.append(
            {
                "image": paths[image_id],
                "prefix": "caption en",
                "suffix": caption,
                "id": f"easyvqa-caption-{split}-{image_id}",
                "where": f"builtin:easyvqa-caption {split} #{i}",
                "captions": [caption],
                "image_id": image_id,
            }
        )
    return rows


_EASYVQA_BOXES: dict[str, tuple[int, int, int, int] | None] = {}
# Images of each split that `builtin:easyvqa-detect` left out, by reason (filled when it loads).
_EASYVQA_DETECT_SKIPPED: dict[str, Counter] = {}


def easyvqa_shape_box(path: str) -> tuple[int, int, int, int] | None:
    """Pixel (x1, y1, x2, y2) of an easy-vqa image's shape, x2/y2 exclusive; None for a blank image.

    The background is the most common border colour; the shape is every pixel of another
    colour (its anti-aliased edge included). Cached by path: 4,000 images take ~2 s.
    """
    if path not in _EASYVQA_BOXES:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        colours, counts = np.unique(border, axis=0, return_counts=True)
        ys, xs = np.nonzero((pixels != colours[counts.argmax()]).any(axis=-1))
        box = None
        if len(xs):
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        _EASYVQA_BOXES[path] = box
    return _EASYVQA_BOXES[path]


def _easyvqa_shape(qa_pairs: Iterable[tuple[str, str]]) -> str | None:
    """The shape name an image's QA pairs reveal (via `easyvqa_caption`), or None."""
    words = easyvqa_caption(qa_pairs).split()
    return words[-1] if words[-1] in _EASYVQA_SHAPES else None


def _easyvqa_detect_rows(split: str) -> list[dict]:
    from pg_finetune.loc import detect_prefix, format_detections

    questions, answers, image_ids, paths = _easyvqa_split(split)
    qa_by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        qa_by_image[image_id].append((question, answer))
    rows, skipped = [], Counter()
    for image_id in sorted(paths):
        shape = _easyvqa_shape(qa_by_image.get(image_id, []))
        if shape is None:
            skipped["shape unknown"] += 1
            continue
        box = easyvqa_shape_box(paths[image_id])
        if box is None:
            skipped["no shape pixels"] += 1
            continue
        size = 64  # easy-vqa images are 64x64
        rows.append(
            {
                "image": paths[image_id],
                "prefix": detect_prefix([shape]),
                "suffix": format_detections([(box, shape)], size, size),
                "id": f"easyvqa-detect-{split}-{image_id}",
                "where": f"builtin:easyvqa-detect {split} #{len(rows)}",
                "boxes": [list(box)],
                "labels": [shape],
                "width": size,
                "height": size,
                "image_id": image_id,
            }
        )
    if skipped:
        logger.info("builtin:easyvqa-detect %s: skipped %s", split, dict(skipped))
    _EASYVQA_DETECT_SKIPPED[split] = skipped
    return rows


# Built-in sources: `builtin:<name>` -> (split -> rows). Rows are already canonical.
BUILTINS: dict[str, Callable[[str], list[dict]]] = {
    "easyvqa": _easyvqa_rows,
    "easyvqa-caption": _easyvqa_caption_rows,
    "easyvqa-detect": _easyvqa_detect_rows,
}


def _builtin_source(name: str, split: str) -> _Source:
    if name not in BUILTINS:
        raise ValueError(
            f"unknown builtin dataset {name!r}; valid: {', '.join('builtin:' + n for n in BUILTINS)}"
        )
    rows = BUILTINS[name](split)
    return _Source(
        name=f"builtin:{name} {split}", num_rows=len(rows), rows=lambda indices: (rows[k] for k in indices)
    )


# ------------------------------------------------------------------------------------------ validation
def _bad(row: dict, reason: str, field_name: str, problem: str) -> BadRecordError:
    return BadRecordError(row["where"], field_name, problem, reason=reason)


def _check_row(row: dict, default_prefix: str | None, require_suffix: bool) -> tuple[dict, Any]:
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
                    row, "prefix template field missing", "prefix",
                    f"task.prefix template {default_prefix!r} needs field {err}, which this record lacks",
                ) from None
    if not isinstance(prefix, str):
        raise _bad(
            row, "prefix not a string", "prefix", f"prefix must be a string, got {type(prefix).__name__}"
        )
    suffix = row.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise _bad(
            row, "suffix not a string", "suffix", f"suffix must be a string, got {type(suffix).__name__}"
        )
    if suffix is not None and not suffix.strip():
        if require_suffix:
            raise _bad(row, "empty suffix", "suffix", "empty suffix (there is nothing to train on)")
        suffix = None
    if suffix is None and require_suffix:
        raise _bad(row, "missing suffix", "suffix", "missing suffix (the training target)")
    extras = {k: v for k, v in row.items() if k not in _RESERVED}
    return {"prefix": prefix, "suffix": suffix, "id": row["id"], "where": row["where"], **extras}, image


def _check_columns(
    source: _Source, columns: _Columns, default_prefix: str | None, require_suffix: bool
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
) -> RecordDataset:
    """Load one split of `source` as a RecordDataset (see the module docstring for sources and splits).

    Rows with bad text fields, a missing image, or an image path that does not exist raise one
    BadRecordError listing them all, or with `skip_bad_records` are dropped, counted in
    `.skipped` and summarised in one warning. `limit` caps the number of good records kept.
    For a single-file source (a .jsonl file, a saved single Dataset) the split's name is not
    checked; only its slice applies.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of records or None, got {limit}")
    source = os.fspath(source)
    base_split, part = parse_split(split)
    columns = _Columns(image_column, prefix_column, suffix_column)
    src = _open_source(source, base_split, columns)
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
            meta, ref = _check_row(row, default_prefix, require_suffix)
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
