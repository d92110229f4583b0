"""A record dataset wrapped so that every read draws from a random stream of its own.

The stream is seeded by (name, seed, epoch, index) through a str seed (sha512), so a record gets the
same draws in every DataLoader worker, process and resumed run, and new ones each epoch. Subclasses
(`ImageAugment`, `DetectionAugment`) name their stream and change a read in `__getitem__`; an
`EpochCallback` (or the Trainer) calls `set_epoch` at the start of each epoch.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar


class EpochSeededWrapper:
    """Standard library only: recipe validation imports `pg_finetune.image_augment` without torch."""

    stream: ClassVar[str]  # the stream's name: wrappers stacked on one dataset draw independently

    def __init__(self, dataset: Any, *, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """This epoch's draws; passed on to a wrapped per-epoch dataset too."""
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def rng(self, index: int) -> random.Random:
        # A str seed goes through sha512: stable across processes, unlike the salted hash().
        return random.Random(f"{self.stream}/{self.seed}/{self.epoch}/{index}")

    def rows_meta(self, index: int) -> dict:
        """The wrapped dataset's record without its image (not augmented)."""
        return self.dataset.rows_meta(index)
