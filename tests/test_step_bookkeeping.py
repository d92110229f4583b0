"""PaliGemmaTrainer's per-step bookkeeping (FLOPs estimate, gradient clipping) equals the stock Trainer's.

The reference is `transformers.Trainer`'s own method, called on the same trainer and the same gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from PIL import Image
from transformers import Trainer

from pg_finetune.collator import PaliGemmaCollator
from pg_finetune.model import load_model, load_processor
from pg_finetune.recipe import recipe_from_dict
from pg_finetune.speed import suffix_loss
from pg_finetune.train import training_arguments
from pg_finetune.trainer import PaliGemmaTrainer
from pg_finetune.tuning import apply_tuning


def _trainer(tmp_path, method: str, max_grad_norm: float = 1e-3) -> PaliGemmaTrainer:
    recipe = recipe_from_dict({"model": {"name_or_path": "tiny"}, "tuning": {"method": method},
                               "training": {"max_grad_norm": max_grad_norm}})
    model = load_model(recipe.model, recipe.tuning)
    model = apply_tuning(model, recipe.tuning) or model
    return PaliGemmaTrainer(model=model, args=training_arguments(recipe, tmp_path / "run"),
                            processing_class=load_processor("tiny"))


def _batch() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    records = [{"image": Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
                "prefix": f"answer en question {i}?", "suffix": "a red circle" if i % 2 else "no"} for i in range(4)]
    return PaliGemmaCollator(load_processor("tiny"), max_length=32)(records)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_flops_estimate_equals_the_stock_one_and_follows_a_new_model(tmp_path, method):
    trainer = _trainer(tmp_path, method)
    batch = _batch()
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
    assert trainer.floating_point_ops({"pixel_values": batch["pixel_values"]}) == 0  # no input_ids: stock answer
    trainer.model = _trainer(tmp_path, "attention_only").model  # a model swapped in (e.g. wrapped): counted afresh
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_clipping_gives_the_stock_norm_and_gradients(tmp_path, method):
    trainer = _trainer(tmp_path, method, max_grad_norm=1e-3)  # small: clipping scales every gradient
    model = trainer.model
    suffix_loss(model, _batch()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in trainable]

    stock_norm = Trainer._clip_grad_norm(trainer, model)
    stock = [p.grad.clone() for p in trainable]
    for p, g in zip(trainable, grads, strict=True):
        p.grad = g.clone()
    ours_norm = trainer._clip_grad_norm(model)
    assert ours_norm > 1e-3  # the clip did scale
    assert torch.equal(ours_norm, stock_norm)
    for p, expected in zip(trainable, stock, strict=True):
        assert torch.equal(p.grad, expected)
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)


def test_sharded_runs_clip_the_stock_way(tmp_path, monkeypatch):
    # accelerate's FSDP path compares the list it gets with model.parameters(): a subset would skip it
    trainer = _trainer(tmp_path, "lora")
    calls = []
    monkeypatch.setattr(Trainer, "_clip_grad_norm", lambda self, model: calls.append(model) or torch.tensor(0.0))
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        monkeypatch.setattr(type(trainer.accelerator), "distributed_type", property(lambda self, k=kind: k))
        trainer._clip_grad_norm(trainer.model)
    assert calls == [trainer.model, trainer.model]
