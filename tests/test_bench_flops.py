"""bench/gpu_3b.py's analytic counts: parameters against the model built on the meta device, FLOPs against
torch's FlopCounterMode on the tiny model, and the no-GPU / --estimate entry points. No GPU needed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PaliGemmaForConditionalGeneration

from pg_finetune.recipe import TuningConfig
from pg_finetune.speed import suffix_loss
from pg_finetune.tiny import build_config, build_processor, build_tiny
from pg_finetune.tuning import apply_tuning

_spec = importlib.util.spec_from_file_location("gpu_3b", Path(__file__).parents[1] / "bench" / "gpu_3b.py")
gpu_3b = importlib.util.module_from_spec(_spec)
sys.modules["gpu_3b"] = gpu_3b  # dataclasses look their module up there
_spec.loader.exec_module(gpu_3b)


def _meta_count(config) -> int:
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields the tied lm_head once


@pytest.mark.parametrize("name", ["paligemma", "paligemma2"])
def test_full_size_parameter_count_matches_the_model(name):
    config = gpu_3b.paligemma_config(name)
    assert gpu_3b.count_params(config)["total"] == _meta_count(config)


def test_full_size_configs_have_the_published_dimensions():
    pg, pg2 = gpu_3b.paligemma_config("paligemma"), gpu_3b.paligemma_config("paligemma2")
    parts = gpu_3b.count_params(pg)
    assert parts["total"] == 2_923_466_480  # "PaliGemma-3B": 2.92 B
    assert parts["embeddings"] == 257_216 * 2048
    # SigLIP So400m/14: 27 layers of width 1152, MLP 4304, plus patch/position embeddings and norms
    layer = 4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
    assert parts["vision"] == 3 * 14 * 14 * 1152 + 1152 + 256 * 1152 + 27 * layer + 2 * 1152
    assert (pg2.text_config.hidden_size, pg2.text_config.num_hidden_layers, pg2.text_config.num_key_value_heads) == (
        2304, 26, 4)
    assert 3.0e9 < gpu_3b.count_params(pg2)["total"] < 3.1e9


@pytest.mark.parametrize("variant", ["paligemma", "paligemma2"])
def test_tiny_parameter_count_matches_the_model(variant):
    config = build_config(build_processor(), variant=variant)
    assert gpu_3b.count_params(config)["total"] == _meta_count(config)


def _tiny_batch(processor, batch=3, prompt=4, suffix=6):
    n_img = processor.image_seq_length
    ids = torch.randint(5, 500, (batch, n_img + prompt + suffix), generator=torch.Generator().manual_seed(0))
    ids[:, :n_img] = processor.image_token_id
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, n_img + prompt :] = 1
    labels = torch.where(token_type_ids == 1, ids, torch.full_like(ids, -100))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=token_type_ids,
                pixel_values=torch.randn(batch, 3, 64, 64), labels=labels)


def _eager(model):
    for config in (model.config, model.config.text_config, model.config.vision_config):
        config._attn_implementation = "eager"  # FlopCounterMode does not count the CPU flash-attention kernel
    return model


@pytest.mark.parametrize("variant", ["paligemma", "paligemma2"])
def test_forward_flops_match_torch_flop_counter(variant):
    model, processor = build_tiny(variant=variant)
    batch = _tiny_batch(processor)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        _eager(model)(**batch)
    seq_len = batch["input_ids"].shape[1]
    assert gpu_3b.count_flops(model.config, seq_len, 3)["forward"] == counter.get_total_flops()


@pytest.mark.parametrize("method,train_vision", [("full", True), ("full", False), ("attention_only", False)])
def test_training_flops_match_torch_flop_counter(method, train_vision):
    model, processor = build_tiny(variant="paligemma")
    cfg = TuningConfig(method=method, train_vision_tower=train_vision, train_projector=train_vision)
    model = apply_tuning(_eager(model), cfg).train()
    batch = _tiny_batch(processor, suffix=6)
    with FlopCounterMode(display=False) as counter:
        suffix_loss(model, batch).backward()
    seq_len = batch["input_ids"].shape[1]
    # 6 suffix labels -> 6 positions predict a label (the last prompt position and 5 suffix positions)
    expected = gpu_3b.count_flops(model.config, seq_len, 3, loss_positions=6, method=method, train_vision=train_vision)
    assert expected["train"] == counter.get_total_flops()


def test_full_size_flops_by_hand():
    config = gpu_3b.paligemma_config("paligemma")
    flops = gpu_3b.count_flops(config, 280, 1, loss_positions=10)
    assert flops["lm_head"] == 2 * 10 * 257_216 * 2048
    assert flops["decoder_mlp"] == 2 * 280 * 18 * 3 * 2048 * 16384
    assert flops["decoder_attention"] == 2 * 18 * 2 * 280 * 280 * (8 * 256)
    assert flops["vision_attention"] == 2 * 27 * 2 * 256 * 256 * 1152
    # full fine-tuning of the decoder: forward + input grads + weight grads ~ 3 x the decoder's forward
    decoder = flops["decoder_attention_linear"] + flops["decoder_mlp"] + flops["lm_head"]
    assert flops["train"] == pytest.approx(flops["forward"] + 2 * decoder + 2 * flops["decoder_attention"])
    # about 6 x 2 B decoder parameters x 280 tokens, plus the frozen vision tower's forward
    assert 2.9e12 < flops["train"] < 3.9e12


def test_memory_estimate_orders_the_methods():
    config = gpu_3b.paligemma_config("paligemma")
    est = {m: gpu_3b.estimate_memory(config, m, 4, 280, loss_positions=10) for m in gpu_3b.METHODS}
    assert est["qlora"].weights < est["full"].weights < est["lora"].weights  # lora: bf16 base + fp32 adapters
    assert est["qlora"].total < est["lora"].total < est["full"].total
    assert est["attention_only"].total < est["full"].total
    # LoRA's activations are the layer's plus what its adapters save (counted on the tiny model below):
    # at batch 4 without checkpointing that outweighs attention_only's gradients and optimizer state
    adapters = 4 * 280 * 18 * gpu_3b.adapter_activations(config, 8)
    assert est["lora"].activations - est["attention_only"].activations == adapters
    assert est["lora"].total > est["attention_only"].total
    assert est["full"].optimizer == 4 * (2_923_466_480 - gpu_3b.count_params(config)["vision"]
                                         - gpu_3b.count_params(config)["projector"])
    assert est["qlora"].total < 16 * 2**30  # the claim RESULTS.md makes
    ckpt = gpu_3b.estimate_memory(config, "lora", 4, 280, gradient_checkpointing=True, loss_positions=10)
    assert ckpt.activations < est["lora"].activations / 5
    full_logits = gpu_3b.estimate_memory(config, "lora", 4, 280)
    assert full_logits.logits == 4 * 280 * 257_216 * 10


def test_estimate_mode_and_no_gpu_mode(tmp_path, capsys):
    assert gpu_3b.main(["--estimate", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_3b_estimate.json").read_text())
    assert data["qlora_3b_batch4_fits_16gb"] is True
    assert len(data["rows"]) == 2 * 4 * 3 * 2  # models x methods x batch sizes x checkpointing
    if not torch.cuda.is_available():
        assert gpu_3b.main(["--out", str(tmp_path)]) == 0
        assert "no CUDA GPU" in capsys.readouterr().out


def _saved_bytes_per_token(method: str, lora_dropout: float, autocast: bool) -> float:
    """Bytes autograd saves per token in one decoder layer: unique non-parameter storages, slope over 2 lengths."""
    torch.manual_seed(0)
    model = build_tiny()[0].to(torch.bfloat16)
    if method == "frozen":
        model.requires_grad_(False)
    else:
        model = apply_tuning(model, TuningConfig(method=method, lora_r=8, lora_alpha=16, lora_dropout=lora_dropout)) or model
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = base.model.language_model.layers[0]
    params = {p.data_ptr() for p in model.parameters()}
    state = {"on": False, "seen": set(), "bytes": 0}

    def pack(t):
        storage = t.untyped_storage()
        if state["on"] and t.data_ptr() not in params and storage.data_ptr() not in state["seen"]:
            state["seen"].add(storage.data_ptr())
            state["bytes"] += storage.nbytes()
        return t

    layer.register_forward_pre_hook(lambda *a, **k: state.update(on=True, seen=set(), bytes=0))
    layer.register_forward_hook(lambda *a, **k: state.update(on=False))
    sizes = {}
    for seq in (40, 72):
        hidden = torch.randn(2, seq, base.config.text_config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            base.model.language_model(inputs_embeds=hidden, use_cache=False)
        sizes[seq] = state["bytes"]
    return (sizes[72] - sizes[40]) / (2 * 32)


@pytest.mark.parametrize("lora_dropout,autocast", [(0.0, True), (0.05, True), (0.0, False)])
def test_lora_activation_estimate_equals_what_autograd_saves(lora_dropout, autocast):
    # peft's adapters save tensors of their own (input copies, lora_A outputs, dropout masks): counted
    # on the tiny decoder against the same frozen layer without adapters (gradients to its input only)
    extra = (_saved_bytes_per_token("lora", lora_dropout, autocast)
             - _saved_bytes_per_token("frozen", 0.0, autocast))
    config = build_tiny()[0].config
    expected = gpu_3b.adapter_activations(config, 8, lora_dropout=lora_dropout, autocast=autocast, device="cpu")
    assert extra == expected
