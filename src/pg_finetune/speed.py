"""Training-step speed-ups that keep the loss and its gradients unchanged.

    loss = suffix_loss(model, batch)                       # == model(**batch).loss, to float rounding
    loss = suffix_loss(model, batch, num_items_in_batch=n) # sum over label tokens / n (Trainer's GA form)

**Logits only where the loss is.** PaliGemma's loss covers the suffix only (the
collator sets every image/prompt/padding label to -100), yet `model(**batch)`
projects every position through the lm_head and log-softmaxes the whole
(batch, seq, vocab) tensor. `suffix_loss` passes the model a boolean
`logits_to_keep` mask of the positions whose *next* token has a label, so the
lm_head (and PaliGemma 2's final logit soft-capping, which the model applies
itself) runs on those rows only and cross-entropy sees `(n_label_tokens, vocab)`.
On PaliGemma-3B-224 that is ~10 of ~280 positions per example: the 257k x 2048
lm_head and the ~1 GB of fp32 logits at batch 4 mostly disappear.

It calls the model's own `forward` (not its sub-modules), so it works unchanged
on a plain `PaliGemmaForConditionalGeneration`, a peft `PeftModel` (LoRA/QLoRA),
DDP / accelerate wrappers, and both Gemma (tiny) and Gemma 2 (tiny-paligemma2)
decoders.

**Image features once per image** (`ImageFeatureCache`, opt-in): while the vision
tower and the projector are frozen (the default of every method), their output
for an image never changes, so `suffix_loss(..., image_features=cache)` computes
it once per distinct `pixel_values` row and hands it to the model through
`mm_encoder_outputs` afterwards. The moment any vision/projector parameter trains
(train_vision_tower, train_projector, lora_vision, lora_projector) the cache is
bypassed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

# Label value of positions without loss: torch's cross-entropy and transformers' loss skip it. The
# collator writes it (and imports it from here: speed.py is the lower of the two modules).
IGNORE_INDEX = -100


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): `keep[b, t]` is True where position t predicts a labelled token t + 1.

    This is transformers' causal shift (`ForCausalLMLoss`: pad labels by one -100 on the right,
    drop the first) turned into a mask, so the rows kept are exactly the rows its loss averages.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = shifted != IGNORE_INDEX
    return keep, shifted[keep]


class KeyedTensorCache:
    """Per-row tensors memoised by key under a memory budget, computed in one batched call per miss set.

    `cache(keys, compute)` returns `torch.stack` of one tensor per key; `compute(rows)` gets the
    positions (first occurrence) of the keys not cached yet and returns their tensors in that order.
    Tensors are kept until `max_mb` megabytes are used; later ones are recomputed on each use.
    Serves the collator's pixel_values and the frozen vision tower's features alike.
    """

    def __init__(self, max_mb: float):
        self.max_mb = max_mb
        self._values: dict[bytes, torch.Tensor] = {}
        self._bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:  # entries held
        return len(self._values)

    def __call__(self, keys: list[bytes], compute: Callable[[list[int]], Sequence[torch.Tensor]]) -> torch.Tensor:
        missing = list(dict.fromkeys(k for k in keys if k not in self._values))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            for key, value in zip(missing, compute([keys.index(k) for k in missing]), strict=True):
                fresh[key] = value
                size = value.numel() * value.element_size()
                if self._bytes + size <= self.max_mb * 2**20:
                    self._values[key] = value
                    self._bytes += size
        return torch.stack([fresh[k] if k in fresh else self._values[k] for k in keys])


def _paligemma(model: torch.nn.Module) -> torch.nn.Module:
    """The PaliGemmaForConditionalGeneration inside DDP/accelerate (`.module`) and peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class ImageFeatureCache:
    """Projected image features of a frozen vision tower + projector, keyed by the pixel values' bytes.

    Holds at most `max_mb` megabytes of features (on the device they were computed on); images
    past that are recomputed on each use. Use one cache per model.

    `autocast` is the context the model's forward runs under (a factory, e.g. an `Accelerator`'s
    `autocast`): accelerate wraps `model.forward` in autocast for bf16/fp16 mixed precision, and
    the cache calls the vision tower beside that forward, so without it the features would be
    computed in fp32 and the loss would differ from the uncached one.
    """

    def __init__(self, max_mb: float = 1024.0, autocast: Callable[[], AbstractContextManager] | None = None):
        self._cache = KeyedTensorCache(max_mb)
        self._autocast = autocast or nullcontext

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    def applies_to(self, model: torch.nn.Module) -> bool:
        inner = _paligemma(model).model
        towers = (inner.vision_tower, inner.multi_modal_projector)
        return not any(p.requires_grad for tower in towers for p in tower.parameters())

    def __call__(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        host = pixel_values.detach().cpu().contiguous()
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in host]

        @torch.no_grad()
        def compute(rows: list[int]) -> torch.Tensor:
            with self._autocast():
                return _paligemma(model).model.get_image_features(pixel_values[rows]).pooler_output

        return self._cache(keys, compute)


def suffix_loss(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    image_features: ImageFeatureCache | None = None,
) -> torch.Tensor:
    """Causal-LM loss of `batch["labels"]`, with the lm_head applied at label positions only.

    Equals `model(**batch).loss` (mean over label tokens), or with `num_items_in_batch` the sum
    over label tokens divided by it, as transformers' loss does for gradient accumulation.
    With `image_features`, a frozen vision tower's output comes from that cache.
    """
    if "labels" not in batch:
        raise KeyError("suffix_loss needs batch['labels'] (a training batch from PaliGemmaCollator with suffixes)")
    labels = batch["labels"]
    keep, targets = label_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if image_features is not None and "pixel_values" in inputs and image_features.applies_to(model):
        features = image_features(model, inputs.pop("pixel_values"))
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    # A 2-D bool logits_to_keep makes the model gather hidden_states[keep] -> (n, hidden) before its
    # lm_head and soft-capping; use_cache=False: no KV cache to build in training.
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()  # transformers upcasts before the loss too
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets.to(logits.device))
    loss = F.cross_entropy(logits, targets.to(logits.device), reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
