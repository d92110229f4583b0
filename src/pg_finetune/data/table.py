"""A `datasets.Dataset` as a `Source`, shared by the save_to_disk and load_dataset sources.

Text columns are read in batches when rows are listed; images stay undecoded in the memory-mapped
table until `RecordDataset` asks for one (`TableImages`), so loading a large split is cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pg_finetune.data.source import Columns, Source, canonical


class TableImages:
    """Fetch one undecoded image from a `datasets` table (a class, not a lambda, so workers can pickle it)."""

    def __init__(self, table: Any, column: str):
        self.table = table
        self.column = column

    def __call__(self, row: int) -> Any:
        return self.table[row][self.column]


def pick_split(obj: Any, split: str, display: str) -> Any:
    """The split of a DatasetDict; a single Dataset is returned as it is (the split name only names it)."""
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise ValueError(f"{display} has no split {split!r}; splits: {', '.join(obj)}")
        return obj[split]
    return obj


def table_source(ds: Any, name: str, split: str, columns: Columns) -> Source:
    """A `datasets.Dataset`: text columns read in batches, images left undecoded in the mapped table."""
    import datasets

    column_names = list(ds.column_names)
    if columns.image not in column_names:
        return Source(name=name, num_rows=len(ds), rows=lambda _: iter(()), columns=column_names)
    if isinstance(ds.features[columns.image], datasets.Image):
        ds = ds.cast_column(columns.image, datasets.Image(decode=False))  # we decode, lazily, with open_image
    # other image columns (e.g. masks) would be decoded into every meta row: leave them out
    other_images = [c for c, f in ds.features.items() if c != columns.image and isinstance(f, datasets.Image)]
    meta_columns = [c for c in column_names if c != columns.image and c not in other_images]
    text_table = ds.select_columns(meta_columns) if meta_columns else None
    image_table = ds.select_columns([columns.image])
    null_table = image_table.with_format("arrow")  # null checks without copying image bytes
    # a float32 target read as a Python float carries float64 noise (0.1 -> 0.10000000149011612); keep its
    # own precision so records.suffix_text writes "0.1"
    suffix_feature = ds.features.get(columns.suffix)
    narrow_suffix = getattr(suffix_feature, "dtype", None) in ("float16", "float32")

    def rows(indices: range, batch_size: int = 1000) -> Iterator[dict]:
        for start in range(indices.start, indices.stop, batch_size):
            stop = min(start + batch_size, indices.stop)
            batch = text_table[start:stop] if text_table is not None else {}
            nulls = null_table[start:stop].column(columns.image).is_null().to_pylist()
            for k in range(stop - start):
                obj = {c: batch[c][k] for c in meta_columns}
                if narrow_suffix and obj[columns.suffix] is not None:
                    obj[columns.suffix] = np.float32(obj[columns.suffix])
                row = canonical(obj, columns)
                row["image"] = None if nulls[k] else start + k
                row.setdefault("id", f"{split}-{start + k}")
                row["where"] = f"{name} row {start + k}"
                yield row

    notes = [f"image columns {other_images} are not loaded"] if other_images else []
    return Source(
        name=name,
        num_rows=len(ds),
        rows=rows,
        fetch_image=TableImages(image_table, columns.image),
        columns=column_names,
        check_files=False,
        notes=notes,
    )
