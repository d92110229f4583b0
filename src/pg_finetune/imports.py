"""Importing the Hugging Face stack without what a run does not use.

`transformers.trainer_utils` imports peft whenever peft is installed, and `peft.helpers` runs
`import bitsandbytes` whenever that is installed: so every `from transformers import Trainer`
imports bitsandbytes (seconds on a cold start: it probes for CUDA and loads its native library),
although only QLoRA (4-bit loading) uses it; peft's LoRA layer dispatch (get_peft_model,
PeftModel.from_pretrained) imports it again for a full-precision base. `bitsandbytes_hidden()` runs a
block, and `import_without_bitsandbytes` imports a module, while bitsandbytes is hidden
(`sys.modules["bitsandbytes"] = None`, the import system's own way to make an import fail), then
un-hides it and clears the availability caches that may have seen it missing, so a later QLoRA run
in the same process still finds and imports it. What hiding changes: `peft.helpers.bnb` stays None
(only peft's condition-number analysis reads it), and peft skips its 4/8-bit layer types, which a
full-precision base has none of.
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

# lru_cached "is bitsandbytes installed" checks that may run while it is hidden
_AVAILABILITY_CACHES = (
    ("peft.import_utils", "is_bnb_available"),
    ("peft.import_utils", "is_bnb_4bit_available"),
    ("transformers.utils.import_utils", "is_bitsandbytes_available"),
)


@contextmanager
def bitsandbytes_hidden(hide: bool = True) -> Iterator[None]:
    """Within the block, `import bitsandbytes` fails (unless it was imported before or `hide` is False)."""
    if not hide or "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        for owner, name in _AVAILABILITY_CACHES:
            check = getattr(sys.modules.get(owner), name, None)
            if hasattr(check, "cache_clear"):
                check.cache_clear()


def import_without_bitsandbytes(module: str) -> ModuleType:
    """`importlib.import_module(module)` with bitsandbytes hidden, unless it is already imported."""
    with bitsandbytes_hidden():
        return importlib.import_module(module)


@contextmanager
def collector_frozen() -> Iterator[None]:
    """Within the block the garbage collector leaves every object that exists now alone (`gc.freeze`).

    After the imports and the model load a process holds ~500k objects that live to its end; a full
    collection walks all of them (~0.4 s here), and the Trainer calls one at the start of training
    (accelerate's `clear_device_cache`) besides the automatic ones. Frozen, they are skipped; objects
    made inside the block are collected as usual. Unfrozen at the end, so a process that calls
    `main()` repeatedly (the tests) can still free what an earlier run left in reference cycles.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
