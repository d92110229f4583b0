"""Bad training records at any batch size (data.skip_bad_records), and a header check of every
training image before the first step (data.check_images).

    bad = check_image_headers(dataset)                        # [(index, BadRecordError)], progress bar
    train_data = SubstituteBadRecords(dataset, {i for i, _ in bad})
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from pg_finetune.images import MAX_PIXELS, BadRecordError, describe_image_source


# ----------------------------------------------------------------------------------------------------
# Training data: bad records at any batch size, and a header check of every image before training
# ----------------------------------------------------------------------------------------------------
class SubstituteBadRecords(Dataset):
    """With data.skip_bad_records: record i, or when its image does not decode, the next good one.

    `RecordDataset.__getitem__` returns None for a bad record. Dropping it in the collator shrinks
    that batch (and at batch size 1 leaves nothing to train on); here the Trainer always gets a full
    batch, so the step count and the number of records per step stay what the recipe says. The
    price: the substitute is seen twice that epoch. The choice depends only on the index, so the
    order is the same after a resume. `known_bad` (from `check_image_headers`) are never decoded, nor
    are records another DataLoader worker already found bad (`RecordDataset.known_bad`). Records found
    bad while training are counted once in the wrapped dataset's `skipped`, whichever worker found them.
    """

    def __init__(self, dataset: Any, known_bad: set[int] | frozenset[int] = frozenset()):
        self.dataset = dataset
        self.bad = set(known_bad)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        found_bad_elsewhere = getattr(self.dataset, "known_bad", None)
        for i in ((index + k) % n for k in range(n)):
            if i in self.bad or (found_bad_elsewhere is not None and found_bad_elsewhere(i)):
                continue
            record = self.dataset[i]
            if record is not None:
                return record
            self.bad.add(i)
        raise BadRecordError("", "image", f"no training record has an image that decodes (all {n} skipped)")

    def rows_meta(self, index: int) -> dict:
        return self.dataset.rows_meta(index)

    @property
    def skipped(self):
        return self.dataset.skipped

    def __repr__(self) -> str:
        return f"SubstituteBadRecords({self.dataset!r})"


def _image_header_problem(source: Any) -> str | None:
    """Why the image behind `source` (path, bytes, datasets dict) cannot be read, from its header and
    (PNG) chunk checksums, without decoding pixels; None when it looks fine or is already decoded."""
    if isinstance(source, dict):
        source = source.get("bytes") if source.get("bytes") is not None else source.get("path")
    what = describe_image_source(source)
    if isinstance(source, bytes | bytearray | memoryview):
        fp: Any = io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike):
        if not os.path.isfile(source):
            return f"image file not found: {os.fspath(source)}"
        fp = source
    else:
        return None if source is not None else "image is empty (neither bytes nor path)"
    try:
        with Image.open(fp) as img:
            if img.width * img.height > MAX_PIXELS:
                return f"{what} is {img.width} x {img.height} pixels, more than the {MAX_PIXELS} we decode"
            img.verify()
    except Image.DecompressionBombError:
        return f"{what} is larger than the {MAX_PIXELS} pixels we decode"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for a bad header
        return f"{what} cannot be decoded ({str(err).split(' <_io.')[0] or type(err).__name__})"
    return None


def check_image_headers(dataset: Any, *, progress: bool = True) -> list[tuple[int, BadRecordError]]:
    """(index, BadRecordError) of each record whose image is unreadable (data.check_images), with a progress bar.

    Reads the dataset's image references (`RecordDataset._image_refs`, fetched with its `_fetch_image`:
    the data package has no public accessor yet); a dataset without them is checked by decoding.
    """
    from tqdm.auto import tqdm

    refs: list[Any] | None = getattr(dataset, "_image_refs", None)
    fetch: Callable[[Any], Any] | None = getattr(dataset, "_fetch_image", None)
    bad = []
    for i in tqdm(range(len(dataset)), desc="checking training images", unit="image", disable=not progress):
        where = dataset.rows_meta(i).get("where", f"record {i}")
        if refs is None:
            try:
                problem = None if dataset[i] is not None else "image cannot be decoded"
            except BadRecordError as err:
                problem = err.problem
        else:
            problem = _image_header_problem(fetch(refs[i]) if fetch else refs[i])
        if problem:
            bad.append((i, BadRecordError(where, "image", problem, reason="image cannot be decoded")))
    return bad
