"""Training-step speed-ups that keep the loss and its gradients unchanged.

    loss = suffix_loss(model, batch)                       # == model(**batch).loss, to float rounding
    loss = suffix_loss(model, batch, num_items_in_batch=n) # sum over label tokens / n (Trainer's GA form)
    loss = suffix_loss(model, batch, label_smoothing=0.1, per_example=True)  # big_vision's loss options

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

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
import xxhash
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


def pixel_key(array: np.ndarray) -> bytes:
    """A 128-bit key of an array's bytes, shape and dtype (XXH3-128: ~20 GB/s, where blake2b's ~1 GB/s
    cost ~1 ms a training batch; accidental collisions of 128-bit keys are not a practical concern).
    The shape is part of it: a 2 x 8 and an 8 x 2 image can hold the same bytes.
    """
    digest = xxhash.xxh3_128(np.ascontiguousarray(array).data)
    digest.update(f"{array.shape}{array.dtype}".encode())
    return digest.digest()


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
        host = pixel_values.detach().cpu().contiguous().numpy()
        keys = [pixel_key(host[i]) for i in range(len(host))]

        @torch.no_grad()
        def compute(rows: list[int]) -> torch.Tensor:
            # every image new (the first epoch over distinct images): no gather copy of the batch
            images = pixel_values if len(rows) == len(pixel_values) else pixel_values[rows]
            with self._autocast():
                return _paligemma(model).model.get_image_features(images).pooler_output

        return self._cache(keys, compute)


def token_losses(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of each row of `logits` (n, V) against `targets` (n,), with big_vision's label smoothing.

    With smoothing eps the target distribution puts 1 - eps on the label and eps / (V - 1) on each of
    the V - 1 other classes (big_vision `trainers/proj/paligemma/train.py`: `off_value / (V - 1)`), so

        loss = -(1 - eps) * logp[y] - eps / (V - 1) * sum_{j != y} logp[j]

    This is not torch's `F.cross_entropy(label_smoothing=eps)`, which mixes eps uniformly over all V
    classes (the label then gets 1 - eps + eps / V); torch's with eps * V / (V - 1) is the same target.
    V is the logit width (PaliGemma's HF checkpoints: 257,216 rows, big_vision's 257,152: the 64 padding
    rows take eps / (V - 1) each too, 0.03% of eps in all).
    """
    targets = targets.to(logits.device)
    if not label_smoothing:
        return F.cross_entropy(logits, targets, reduction="none")
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    others = -logp.sum(-1) - nll  # -sum over the V - 1 classes that are not the label
    return (1.0 - label_smoothing) * nll + label_smoothing / (logits.shape[-1] - 1) * others


def suffix_loss(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    image_features: ImageFeatureCache | None = None,
    label_smoothing: float = 0.0,
    per_example: bool = False,
) -> torch.Tensor:
    """Causal-LM loss of `batch["labels"]`, with the lm_head applied at label positions only.

    Equals `model(**batch).loss` (mean over label tokens), or with `num_items_in_batch` the sum
    over label tokens divided by it, as transformers' loss does for gradient accumulation.
    With `image_features`, a frozen vision tower's output comes from that cache.

    `label_smoothing` is big_vision's (see `token_losses`). `per_example=True` is big_vision's
    normalisation: each example's token losses are averaged over its own label tokens (an example
    without any counts as 0, `clip(n, 1)`), and those means are averaged over the batch's examples,
    or summed and divided by `num_items_in_batch`, which must then count examples (all accumulated
    micro-batches and processes) for the split batch to give the same gradient as the whole one.
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
    losses = token_losses(logits, targets, label_smoothing)  # rows in keep's row-major order
    if per_example:
        example = keep.nonzero(as_tuple=True)[0].to(losses.device)
        sums = losses.new_zeros(labels.shape[0]).index_add(0, example, losses)
        losses = sums / keep.sum(dim=1).clamp(min=1).to(losses.device)  # one mean per example
    if num_items_in_batch is None:
        return losses.mean()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(losses.device)
    return losses.sum() / num_items_in_batch
