"""Load records for PaliGemma fine-tuning from JSONL, a local dataset dir, an image folder, a Karpathy
caption JSON, the hub, or built-ins.

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
does not exist is caught then too; images are decoded one by one in `__getitem__`. Sources, one
module each (registry.py lists them in the order they are tried):

- `builtin:easyvqa` / `builtin:easyvqa-caption` / `builtin:easyvqa-detect` (builtin.py): the
  easy-vqa PyPI package, offline (detect: one box per image, from the shape's pixels);
- `path/to/file.jsonl` (jsonl.py): one JSON object per line, `image` relative to the file
  (big_vision's jsonl source and roboflow/maestro use the same names); a directory holding
  `{split}.jsonl`, `{split}/annotations.jsonl` (maestro) or `_annotations.{split}.jsonl`
  (roboflow) works too;
- `path/to/dataset_coco.json` (karpathy.py): Karpathy's caption JSON, split by its images'
  `split` field, one record per image with its first caption as the suffix; `karpathy+all:PATH`
  gives one record per caption; images under `load_records(image_root=...)` or the JSON's directory;
- a `datasets` `save_to_disk` directory (saved.py);
- an image folder (imagefolder.py): `metadata.jsonl` (or `{split}/metadata.jsonl`) with
  `file_name` + columns;
- a dataset repository as `hf download` leaves it (README.md with a `configs:` block), any
  directory `datasets.load_dataset` can read (parquet, csv, ...); anything else is a hub dataset id
  for `datasets.load_dataset` (hub.py). These take a configuration name (`config=`,
  data.train_config); every other source refuses one.

A suffix that is a number becomes text (3 -> "3", 3.0 -> "3"; records.suffix_text has the rule).

Splits may carry a slice, the same for every source (splits.py): `train[:100]`, `train[10:20]`,
`train[:10%]`, `train[90%:]` (percent bounds round as `datasets` does).

Layout: source.py is the interface (`SourceKind`: find + open; `Source`: name, num_rows,
rows(indices), fetch_image), registry.py the ordered list of kinds, records.py `load_records`, its
row checks and `RecordDataset`, image_cache.py the decoded-image cache, splits.py split parsing.
Adding a source is one new module defining a `SourceKind` plus one line in `registry.SOURCES`
(tests/test_data_sources.py checks that no source module is left out).
"""

from __future__ import annotations

from pg_finetune.data.builtin import _EASYVQA_DETECT_SKIPPED as _EASYVQA_DETECT_SKIPPED  # for tests
from pg_finetune.data.builtin import BUILTINS, easyvqa_caption, easyvqa_shape_box
from pg_finetune.data.karpathy import is_karpathy, karpathy_rows
from pg_finetune.data.records import RecordDataset, load_records
from pg_finetune.data.registry import SOURCES, open_source
from pg_finetune.data.source import Columns, Request, Source, SourceKind
from pg_finetune.data.splits import parse_split, split_indices
from pg_finetune.images import BadRecordError

__all__ = [
    "BUILTINS",
    "SOURCES",
    "BadRecordError",
    "Columns",
    "RecordDataset",
    "Request",
    "Source",
    "SourceKind",
    "easyvqa_caption",
    "easyvqa_shape_box",
    "is_karpathy",
    "karpathy_rows",
    "load_records",
    "open_source",
    "parse_split",
    "split_indices",
]
