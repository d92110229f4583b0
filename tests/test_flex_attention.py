"""flex_attention gives the same PaliGemma / PaliGemma 2 outputs as eager attention (the reference).

Eager attention is transformers' plain matmul-softmax path: it applies Gemma 2's attention
soft-capping and the prefix-LM mask from token_type_ids (image + prompt bidirectional, suffix
causal). flex_attention must apply both too, through a `score_mod` (soft-cap) and a `BlockMask`
built from the same mask functions.

The comparisons are slow (opt-in, `pytest -m slow`): on CPU flex attention costs ~10 s of CPU per forward of the tiny
model even uncompiled, and transformers' default path compiles it with inductor (minutes on 2
cores). The test runs torch's flex_attention uncompiled (same semantics, torch's reference path).
Only forward passes: torch has no flex_attention backward on CPU ("FlexAttention does not support
backward on CPU"), so gradients can only be compared on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_recipes_accept_flex_attention():
    from pg_finetune.recipe import load_recipe

    overrides = ["model.name_or_path=tiny-paligemma2", "model.attn_implementation=flex_attention"]
    recipe = load_recipe(ROOT / "recipes/tiny/easyvqa_lora.yaml", overrides)
    assert recipe.model.attn_implementation == "flex_attention"


@pytest.fixture
def uncompiled_flex(monkeypatch):
    import transformers.integrations.flex_attention as flex_integration
    import transformers.masking_utils as masking_utils
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def plain_flex(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    def plain_block_mask(*args, _compile=False, **kwargs):
        return create_block_mask(*args, _compile=False, **kwargs)

    monkeypatch.setattr(flex_integration, "compile_friendly_flex_attention", plain_flex)
    monkeypatch.setattr(masking_utils, "create_block_mask", plain_block_mask)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["paligemma2", "paligemma"])
def test_flex_attention_matches_eager(variant, uncompiled_flex):
    from transformers import PaliGemmaForConditionalGeneration

    from pg_finetune.tiny import build_tiny

    reference, processor = build_tiny(variant)
    if variant == "paligemma2":
        assert reference.config.text_config.attn_logit_softcapping  # the case sdpa cannot do
    images = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 200, 10))]
    prompts = ["answer en what color", "caption en"]
    train_batch = processor(images=images, text=prompts, suffix=["red", "a green square shape"],
                            return_tensors="pt", padding="longest")
    processor.tokenizer.padding_side = "left"
    generate_batch = processor(images=images, text=prompts, return_tensors="pt", padding="longest")
    assert (train_batch["token_type_ids"] == 1).any()  # a suffix: the mask is prefix-LM, not all-bidirectional

    outputs = {}
    for attn in ("eager", "flex_attention"):
        model = PaliGemmaForConditionalGeneration._from_config(reference.config, attn_implementation=attn)
        model.load_state_dict(reference.state_dict())
        assert model.config.text_config._attn_implementation == attn
        with torch.no_grad():
            model.train()  # the training forward: the prefix-LM mask from token_type_ids
            loss = model(**train_batch).loss
            model.eval()
            logits = model(**generate_batch).logits
            tokens = model.generate(**generate_batch, max_new_tokens=4, do_sample=False)
        outputs[attn] = (loss, logits, tokens)

    (eager_loss, eager_logits, eager_tokens), (flex_loss, flex_logits, flex_tokens) = outputs.values()
    torch.testing.assert_close(flex_loss, eager_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex_logits, eager_logits, atol=1e-5, rtol=0)
    assert torch.equal(flex_tokens, eager_tokens)


@pytest.mark.slow
def test_causal_mask_would_differ():
    """The comparison above can fail: a plain causal mask gives other logits than the prefix-LM one."""
    from pg_finetune.tiny import build_tiny

    model, processor = build_tiny("paligemma2")
    batch = processor(images=[Image.new("RGB", (64, 64), (200, 10, 10))], text=["answer en what color"],
                      suffix=["red"], return_tensors="pt")
    with torch.no_grad():
        prefix_lm = model(**batch).logits
        causal = model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).logits
    assert (prefix_lm - causal).abs().max() > 1e-3
