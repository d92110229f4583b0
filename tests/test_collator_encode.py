"""The collator's text encoding (straight from the fast tokenizer's backend) equals the tokenizer's own call."""

from __future__ import annotations

import torch

from pg_finetune.collator import PaliGemmaCollator
from pg_finetune.model import load_processor

TEXTS = [
    "answer en what is the blue shape?", "rectangle", "", " ", "\n", "a  b\tc\n\nd", "detect cat ; dog",
    "<loc0000><loc1023><loc0512><loc0007> cat ; <loc0100><loc0200><loc0300><loc0400> dog",
    "<seg000><seg127> segment the thing", "<eos> <bos> <pad> literal specials", "ünïcödé – 中文 😀",
    "caption en " + "word " * 200, "x" * 500,
]


def test_backend_encoding_equals_the_tokenizer_call():
    processor = load_processor("tiny")
    collator = PaliGemmaCollator(processor, max_length=64)
    assert collator._backend_encode is not None  # the fast path is the one under test
    expected = processor.tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    assert collator._backend_encode(TEXTS) == expected
    assert collator._encode(TEXTS) == expected
    assert any(len(ids) > 100 for ids in expected)  # long texts are not cut here (the layout truncates)


def test_settings_left_on_the_backend_by_another_call_do_not_leak():
    processor = load_processor("tiny")
    collator = PaliGemmaCollator(processor, max_length=64)
    full = processor.tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    # transformers leaves truncation (and padding) enabled on the Rust backend after such a call
    processor.tokenizer(TEXTS, add_special_tokens=False, truncation=True, max_length=5, padding="max_length")
    assert collator._backend_encode(TEXTS) is None  # refuses while the backend is configured so
    assert collator._encode(TEXTS) == full  # and the tokenizer call used instead resets it
    assert collator._backend_encode(TEXTS) == full


def test_a_tokenizer_that_encodes_its_own_way_is_called_as_is():
    processor = load_processor("tiny")
    tokenizer = processor.tokenizer

    class Shouting(type(tokenizer)):
        def _encode_plus(self, text, *args, **kwargs):
            return super()._encode_plus([t.upper() for t in text], *args, **kwargs)

    tokenizer.__class__ = Shouting
    try:
        collator = PaliGemmaCollator(processor, max_length=64)
        assert collator._backend_encode is None
        assert collator._encode(["red circle"]) == tokenizer(["RED CIRCLE"], add_special_tokens=False)["input_ids"]
    finally:
        tokenizer.__class__ = Shouting.__mro__[1]


def test_the_collator_pickles_for_spawned_workers():
    # DataLoader workers started by spawn or forkserver receive the collate function pickled
    import pickle

    import numpy as np
    from PIL import Image

    collator = PaliGemmaCollator(load_processor("tiny"), max_length=64)
    clone = pickle.loads(pickle.dumps(collator))
    assert clone._backend_encode is not None
    records = [{"image": Image.fromarray(np.full((20, 30, 3), 90 * i, dtype=np.uint8)), "prefix": "caption en",
                "suffix": TEXTS[i]} for i in range(3)]
    expected, got = collator(records), clone(records)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
