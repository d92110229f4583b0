"""Turn records into PaliGemma training or generation batches (prefix-LM).

The sequence layout and masks follow big_vision's PaliGemma transfers
(`configs/proj/paligemma/transfers/common.py`: prefix + "\\n" + suffix with
`mask_ar=[0, 0, 1]`, `mask_loss=[0, 0, 1]`):

    <image> x N  <bos>  prefix "\\n"  |  suffix  <eos>
    token_type 0 (full attention)     |  token_type 1 (causal)
    labels -100                       |  labels = ids (loss)

transformers (5.x) turns `token_type_ids == 0` into one bidirectional block for
eager and sdpa attention, so the image tokens and the prompt see each other in
both directions while the suffix stays causal. Padding is masked out of both
the attention and the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from pg_finetune.speed import IGNORE_INDEX, KeyedTensorCache, pixel_key

logger = logging.getLogger(__name__)


class SequenceTooLongError(ValueError):
    """A record does not fit in `max_length` and the truncation policy is `error`."""


@dataclass
class TruncationStats:
    """Counts over the records collated: `truncated_records` is how many were cut at all (one record
    can lose prompt and target tokens both), the others say where."""

    records: int = 0
    truncated_records: int = 0
    truncated_prefix: int = 0
    truncated_suffix: int = 0
    prefix_tokens_removed: int = 0
    suffix_tokens_removed: int = 0

    def summary(self) -> str:
        return (
            f"{self.truncated_records} of {self.records} records truncated: "
            f"{self.truncated_prefix} prompts lost {self.prefix_tokens_removed} tokens, "
            f"{self.truncated_suffix} targets lost {self.suffix_tokens_removed} tokens (eos always kept)"
        )


@dataclass
class PaliGemmaCollator:
    """Collate records `{"image", "prefix", "suffix"}` into model inputs.

    Example (tiny model from `pg_finetune.tiny`, 16 image tokens; ids shortened)::

        >>> collator = PaliGemmaCollator(processor, max_length=64)
        >>> batch = collator([{"image": img, "prefix": "caption en", "suffix": "a red circle"}])
        >>> batch["input_ids"][0]       # 16 x <image>, <bos>, caption▁ en \\n, a▁ red▁ circle, <eos>
        tensor([587, ..., 587, 2, 363, 326, 15, 396, 522, 431, 294, 280, 288, 282, 1])
        >>> batch["token_type_ids"][0]  # 0 = bidirectional prefix, 1 = causal suffix
        tensor([0, ..., 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
        >>> batch["labels"][0]          # loss on the suffix and <eos> only
        tensor([-100, ..., -100, 396, 522, 431, 294, 280, 288, 282, 1])

    Records without a `suffix` (or with `suffix=None`) give generation batches
    (no labels); mixing both kinds in one batch is an error.

    max_length counts text tokens (<bos> + prefix + "\\n" + suffix + <eos>); the
    image tokens come on top. Over-long records are cut by `truncation`:
    "prefix_first" drops prompt tokens from the end of the prompt (the "\\n"
    separator stays), then suffix tokens from the end of the suffix, never the
    <eos>; "error" raises naming the record. Truncations are counted in
    `self.stats` and logged.

    Speed: `pixel_values` are cached by image content (a hash of the decoded RGB
    pixels), up to `pixel_cache_mb` megabytes per collator (per DataLoader
    worker); 0 turns the cache off. A repeated image (a later epoch, or several
    questions about one image as in easy-VQA) skips the resize/normalise, and the
    output is the image processor's own, bit for bit. Images that are not RGB PIL
    images yet (paths, bytes, other modes) are opened first and cached the same way.
    """

    processor: Any
    max_length: int = 512
    padding_side: Literal["right", "left"] = "right"
    truncation: Literal["prefix_first", "error"] = "prefix_first"
    pad_to_multiple_of: int | None = None
    pixel_cache_mb: float = 512.0
    stats: TruncationStats = field(default_factory=TruncationStats)

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer
        self.tokenizer = tokenizer
        self.image_seq_length = int(self.processor.image_seq_length)
        self.image_token_id = int(self.processor.image_token_id)
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.newline_ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.truncation not in ("prefix_first", "error"):
            raise ValueError(f"truncation must be 'prefix_first' or 'error', got {self.truncation!r}")
        # room for <bos>, the "\n" separator and <eos>
        if self.max_length < len(self.newline_ids) + 3:
            raise ValueError(f"max_length={self.max_length} leaves no room for a prompt and a target")
        self._pixel_cache = KeyedTensorCache(self.pixel_cache_mb)
        self._backend_encode = _BackendEncoder.of(tokenizer)
        self._process_images = BatchedPilPixels.of(self.processor.image_processor) or self._image_processor

    # -- public -----------------------------------------------------------------------------------
    def __call__(self, records: list[dict | None]) -> dict[str, torch.Tensor]:
        records = [r for r in records if r is not None]  # None: a bad record the dataset skipped
        if not records:
            # pg_finetune.train never gets here: it wraps the training records in
            # trainer.SubstituteBadRecords, which hands over the next good record instead of None.
            raise ValueError(
                "every record of this batch was skipped as bad (see the warnings above); wrap the dataset in "
                "pg_finetune.data.bad_records.SubstituteBadRecords so that a bad record is replaced, not dropped"
            )
        with_suffix = [r.get("suffix") is not None for r in records]
        if any(with_suffix) and not all(with_suffix):
            raise ValueError("a batch mixes records with and without `suffix`; train and eval batches are separate")
        train = all(with_suffix)

        for r in records:
            if not isinstance(r.get("prefix"), str):
                raise ValueError(f"{_where(r)}: record has no string `prefix` (got {type(r.get('prefix')).__name__})")

        prefixes = self._encode([r["prefix"] for r in records])
        suffixes = self._encode([r["suffix"] for r in records]) if train else [None] * len(records)

        rows = [self._layout(p, s, r) for p, s, r in zip(prefixes, suffixes, records, strict=True)]
        batch = self._pad(rows, train)
        batch["pixel_values"] = self._pixels(records)
        return batch

    # -- pieces -----------------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> list[list[int]]:
        ids = self._backend_encode(texts) if self._backend_encode is not None else None
        return ids if ids is not None else self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _layout(self, prefix: list[int], suffix: list[int] | None, record: dict) -> tuple[list[int], int, int]:
        """Return (text ids, length of the bidirectional part, number of loss tokens)."""
        self.stats.records += 1
        budget = self.max_length - 1 - len(self.newline_ids)  # <bos> and "\n" always stay
        target = [] if suffix is None else suffix + [self.eos_id]
        over = len(prefix) + len(target) - budget
        if over > 0:
            if self.truncation == "error":
                raise SequenceTooLongError(
                    f"{_where(record)}: {len(prefix) + len(target) + 1 + len(self.newline_ids)} text tokens "
                    f"exceed data.max_length={self.max_length}; raise max_length or set data.truncation: prefix_first"
                )
            self.stats.truncated_records += 1
            cut = min(over, len(prefix))
            if cut:
                prefix = prefix[: len(prefix) - cut]
                self.stats.truncated_prefix += 1
                self.stats.prefix_tokens_removed += cut
            over -= cut
            if over > 0:  # the prompt is gone; shorten the target but keep its <eos>
                target = target[: len(target) - 1 - over] + [self.eos_id]
                self.stats.truncated_suffix += 1
                self.stats.suffix_tokens_removed += over
            if self.stats.truncated_records == 1:
                logger.warning(
                    "%s: sequence longer than data.max_length=%d, truncated (prompt first, <eos> kept); "
                    "further truncations are counted and summarised at the end",
                    _where(record),
                    self.max_length,
                )
        prompt = [self.image_token_id] * self.image_seq_length + [self.bos_id] + prefix + self.newline_ids
        return prompt + target, len(prompt), len(target)

    def _pad(self, rows: list[tuple[list[int], int, int]], train: bool) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _, _ in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        # Rows are built as Python lists and turned into tensors once: a per-row torch loop costs
        # more than the whole layout at training batch sizes.
        input_ids, attention_mask, token_type_ids, labels = [], [], [], []
        for ids, prompt_len, _ in rows:
            n_pad, n_target = width - len(ids), len(ids) - prompt_len
            pad_ids, pad_zeros, pad_ignore = [self.pad_id] * n_pad, [0] * n_pad, [IGNORE_INDEX] * n_pad
            # Padding gets token type 0: with left padding a causal pad query would see no key at all,
            # and an all-masked attention row turns into NaNs under some kernels.
            types = [0] * prompt_len + [1] * n_target
            label = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
            mask = [1] * len(ids)
            if self.padding_side == "left":
                input_ids.append(pad_ids + ids)
                attention_mask.append(pad_zeros + mask)
                token_type_ids.append(pad_zeros + types)
                labels.append(pad_ignore + label)
            else:
                input_ids.append(ids + pad_ids)
                attention_mask.append(mask + pad_zeros)
                token_type_ids.append(types + pad_zeros)
                labels.append(label + pad_ignore)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
            "token_type_ids": torch.tensor(token_type_ids, dtype=torch.long),
        }
        if train:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch

    def _pixels(self, records: list[dict]) -> torch.Tensor:
        images = [r["image"] if _is_rgb_image(r["image"]) else _open(r) for r in records]
        if self.pixel_cache_mb <= 0:
            return self._process_images(images)
        # One copy of each image's pixels serves the cache key and, on a miss, the batched processing.
        arrays = [np.asarray(image) for image in images]
        # The image processor treats each image on its own (fixed output size, no padding),
        # so processing only the misses gives the same rows as processing the whole batch.
        return self._pixel_cache(
            [pixel_key(array) for array in arrays],
            lambda rows: self._process_images([images[i] for i in rows], [arrays[i] for i in rows]),
        )

    def _image_processor(self, images: list[Image.Image], arrays: object = None) -> torch.Tensor:
        # `arrays`: BatchedPilPixels' shortcut, not needed here (the processor reads the images)
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]


@dataclass(frozen=True)
class BatchedPilPixels:
    """The PIL image processor's own steps for a batch of RGB images at once, bit for bit.

    transformers' PIL backend (`SiglipImageProcessorPil`, what PaliGemma's processor uses without
    torchvision) resizes, rescales and normalises one image at a time through a chain of numpy
    helpers: ~4-6 ms for 16 small images, the largest part of a tiny model's collate. This does the
    same operations in the same dtypes (PIL `resize` with the processor's filter, `uint8 -> float64 *
    scale -> float32`, `(x - mean) / std` in float32): the same numbers (tested against the processor
    on images of many sizes), 5-6x faster (16 tiny images: ~0.6-0.8 ms). A channel's uint8 pixel has
    256 values, so rescale and normalise are worked once per value and channel into a table (`lut`,
    by those same operations) and a batch is a lookup. `of()` returns None for any configuration it
    does not transcribe (another backend, center crop, padding, aspect-preserving sizes, rescale or
    normalise off): the collator then calls the processor itself.
    """

    height: int
    width: int
    resample: int
    scale: float
    mean: np.ndarray
    std: np.ndarray
    lut: np.ndarray = field(init=False, repr=False, compare=False)  # (3, 256): channel, uint8 value -> float32

    def __post_init__(self) -> None:
        levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # (256, 3), as a pixel row
        values = (levels.astype(np.float64) * self.scale).astype(np.float32)
        values = (values - self.mean) / self.std
        object.__setattr__(self, "lut", np.ascontiguousarray(values.T))

    @classmethod
    def of(cls, image_processor: Any) -> BatchedPilPixels | None:
        ip = image_processor
        size = getattr(ip, "size", None)
        height, width = getattr(size, "height", None), getattr(size, "width", None)
        simple = (
            getattr(ip, "backend", None) == "pil"
            and getattr(ip, "do_resize", False) and height and width
            and not any(getattr(size, k, None) for k in ("shortest_edge", "longest_edge", "max_height", "max_width"))
            and getattr(ip, "do_rescale", False) and getattr(ip, "do_normalize", False)
            and not getattr(ip, "do_center_crop", False) and not getattr(ip, "do_pad", False)
        )  # fmt: skip
        if not simple:
            return None
        channels = np.ones(3, dtype=np.float32)
        return cls(
            height=int(height),
            width=int(width),
            resample=int(ip.resample if ip.resample is not None else Image.Resampling.BILINEAR),
            scale=float(ip.rescale_factor),
            mean=channels * np.asarray(ip.image_mean, dtype=np.float32),
            std=channels * np.asarray(ip.image_std, dtype=np.float32),
        )

    def __call__(self, images: list[Image.Image], arrays: Sequence[np.ndarray | None] | None = None) -> torch.Tensor:
        """`pixel_values` (N, 3, height, width) of RGB `images`; `arrays[i]`, when given, is `np.asarray(images[i])`."""
        arrays = arrays if arrays is not None else [None] * len(images)
        pixels = np.stack([self._resized(image, array) for image, array in zip(images, arrays, strict=True)])
        out = np.empty((len(images), 3, self.height, self.width), dtype=np.float32)
        for channel in range(3):
            np.take(self.lut[channel], pixels[..., channel], out=out[:, channel])
        return torch.from_numpy(out)

    def _resized(self, image: Image.Image, array: np.ndarray | None) -> np.ndarray:
        if image.size == (self.width, self.height):  # PIL's resize returns a plain copy then
            return array if array is not None else np.asarray(image)
        return np.asarray(image.resize((self.width, self.height), resample=self.resample))


@dataclass(frozen=True)
class _BackendEncoder:
    """`texts -> ids` straight from a fast tokenizer's Rust backend, when that is what its `__call__` does.

    For plain text without special tokens added, no truncation and no padding, transformers' fast
    tokenizer ends in `backend.encode_batch(texts, add_special_tokens=False)` after ~0.3 ms of Python
    per call (a tiny model's training step calls it twice). `of()` returns None when the tokenizer
    is not a plain `TokenizersBackend` (a subclass that encodes its own way, a slow tokenizer). A
    call returns None while the backend carries truncation or padding (transformers leaves a call's
    settings on the backend until the next call) or another special-token split than the
    tokenizer's: the collator then calls the tokenizer, which resets them. A plain object, so the
    collator still pickles for DataLoader workers started by spawn or forkserver.
    """

    tokenizer: Any

    @classmethod
    def of(cls, tokenizer: Any) -> _BackendEncoder | None:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        plain = (
            isinstance(tokenizer, TokenizersBackend) and getattr(tokenizer, "_tokenizer", None) is not None
            and type(tokenizer).__call__ is PreTrainedTokenizerBase.__call__
            and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
        )  # fmt: skip
        return cls(tokenizer) if plain else None

    def __call__(self, texts: list[str]) -> list[list[int]] | None:
        backend = self.tokenizer._tokenizer
        if backend.truncation is not None or backend.padding is not None:
            return None
        if backend.encode_special_tokens != self.tokenizer.split_special_tokens:
            return None
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]


def _is_rgb_image(image: Any) -> bool:
    return isinstance(image, Image.Image) and image.mode == "RGB"


def _open(record: dict) -> Image.Image:
    from pg_finetune.images import open_image  # paths, bytes and odd modes (CMYK, 16-bit, ...)

    return open_image(record["image"], where=_where(record))


def _where(record: dict) -> str:
    return str(record.get("where") or record.get("id") or "record")
