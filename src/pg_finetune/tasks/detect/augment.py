"""Per-epoch detection augmentation: a new object order each epoch, optional negative classes.

    data = DetectionAugment(train_data, seed=42, shuffle_objects=True, negatives=2,
                            all_classes=collect_classes(train_data))
    trainer = Trainer(..., train_dataset=data, callbacks=[EpochCallback(data)])

big_vision trains detection transfers on shuffled object order (so the model does not
learn one arbitrary order as part of the task) and can list classes absent from the
image in the prompt (so it learns to say nothing for them). Both are redone on every
read from a random stream seeded by (seed, epoch, index): the same triple always gives
the same record, and each epoch gets a new order. `EpochCallback` tells the wrapper
which epoch the Trainer is in. With DataLoader workers this relies on the workers being
recreated each epoch (the Trainer's default, `dataloader_persistent_workers=False`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset
from transformers import TrainerCallback

from pg_finetune.epoch_seeded import EpochSeededWrapper
from pg_finetune.tasks.detect.targets import make_prefix, make_suffix

DETECTION_FIELDS = ("boxes", "labels", "width", "height")


def detection_field_problems(dataset: Any, limit: int = 5) -> list[str]:
    """`where: problem` for records whose boxes/labels/width/height cannot make a suffix; decodes no image.

    With shuffle_objects the suffix is rebuilt from these fields every epoch, so a record whose stored
    suffix passed the target check but whose `boxes` are inverted, NaN or unmatched by `labels` would
    otherwise fail mid-training, inside the DataLoader, without naming the record.
    """
    problems = []
    for i in range(len(dataset)):
        meta = dataset.rows_meta(i)
        if not meta or any(key not in meta for key in DETECTION_FIELDS):
            continue
        try:
            make_suffix(meta["boxes"], meta["labels"], meta["width"], meta["height"])
        except (ValueError, TypeError) as err:
            problems.append(f"{meta.get('where', f'record {i}')}: {err}")
            if len(problems) >= limit:
                break
    return problems


def collect_classes(dataset: Any) -> list[str]:
    """The union of `labels` over `dataset.rows_meta(i)`, in first-seen order; decodes no image."""
    classes: dict[str, None] = {}
    for i in range(len(dataset)):
        for label in dataset.rows_meta(i).get("labels") or ():
            classes.setdefault(label)
    return list(classes)


class DetectionAugment(EpochSeededWrapper, Dataset):
    """Wraps a record dataset; detection records get a reshuffled suffix and/or negative classes per epoch."""

    stream = "detect-augment"

    def __init__(
        self,
        dataset: Any,
        *,
        seed: int,
        shuffle_objects: bool,
        negatives: int,
        all_classes: Sequence[str],
    ):
        if negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {negatives}")
        super().__init__(dataset, seed=seed)
        self.shuffle_objects = shuffle_objects
        self.negatives = negatives
        self.all_classes = list(all_classes)
        if shuffle_objects and (problems := detection_field_problems(dataset)):
            raise ValueError(
                "task.shuffle_objects rebuilds each detection suffix from the record's boxes, labels, width "
                "and height, and these records' fields cannot make one (fix them, or set "
                "task.shuffle_objects: false to train on the suffix as written):\n  " + "\n  ".join(problems)
            )

    def __getitem__(self, index: int) -> dict | None:
        record = self.dataset[index]
        if record is None or any(key not in record for key in DETECTION_FIELDS):
            return record
        rng = self.rng(index)
        out = dict(record)
        if self.shuffle_objects:
            out["suffix"] = make_suffix(record["boxes"], record["labels"], record["width"], record["height"], rng=rng)
        if self.negatives > 0:
            out["prefix"] = make_prefix(record["labels"], self.all_classes, self.negatives, rng)
        return out

    def __repr__(self) -> str:
        return (
            f"DetectionAugment({self.dataset!r}, shuffle_objects={self.shuffle_objects}, "
            f"negatives={self.negatives}, epoch={self.epoch})"
        )


class EpochCallback(TrainerCallback):
    """Sets the dataset's epoch at the start of each Trainer epoch.

    At the start of epoch k `state.epoch` is k (it is 0 on a fresh start); after a resume in
    the middle of epoch k it is k plus the fraction done, so the integer part is the epoch.
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))
