"""The real-size (3B) random checkpoints, and the QLoRA preparation that keeps bf16 weights in bf16.

Fast tests: the published parameter counts (meta device, no memory), and the k-bit preparation
on the tiny model. `slow` tests (opt-in, `pytest -m slow tests/test_real_size.py`; ~6 GB of disk
once, 8 GB of RAM and tens of minutes on 2 cores): the tokenizer layout, and every path of the real
CLIs on the 3B architecture through bench/real_size.py (train with lora / qlora / attention_only,
SIGKILL + resume, merge, evaluate, predict).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from pg_finetune.real_size import CONFIGS, build_config

ROOT = Path(__file__).resolve().parent.parent

# "Model size" on the Hugging Face model pages of google/paligemma-3b-pt-224 (2.92B) and
# google/paligemma2-3b-pt-224 (3.03B): what the transcribed configs must reproduce.
PUBLISHED_BILLIONS = {"paligemma-3b-pt-224": 2.92, "paligemma2-3b-pt-224": 3.03}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_parameter_count_matches_the_published_size(name):
    from transformers import PaliGemmaForConditionalGeneration

    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(build_config(name))
    total = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert round(total / 1e9, 2) == PUBLISHED_BILLIONS[name]
    assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("name, tokens", [("paligemma2-3b-pt-224", 256), ("paligemma2-3b-pt-448", 1024),
                                          ("paligemma2-3b-pt-896", 4096), ("paligemma-3b-pt-448", 1024)])
def test_image_tokens_follow_the_resolution(name, tokens):
    config = build_config(name)
    v = config.vision_config
    assert (v.image_size // v.patch_size) ** 2 == tokens
    assert config.image_token_id == 257152 and config.text_config.vocab_size == 257216


def test_unknown_config_lists_the_valid_ones():
    with pytest.raises(ValueError, match="paligemma2-3b-pt-224"):
        build_config("paligemma-10b")
    assert len(CONFIGS) == 5


# ---------------------------------------------------------------- QLoRA keeps frozen bf16 weights in bf16
def _tiny_4bit(tmp_path, dtype):
    pytest.importorskip("bitsandbytes")
    from types import SimpleNamespace

    from transformers import PaliGemmaForConditionalGeneration

    from pg_finetune.tiny import save_tiny
    from pg_finetune.tuning import quantization_config

    cfg = SimpleNamespace(method="qlora", train_vision_tower=False, train_projector=False, lora_r=4, lora_alpha=8,
                          lora_dropout=0.0, lora_target_modules=r".*language_model.*\.(q_proj|v_proj)",
                          lora_vision=False, lora_projector=False, bnb_4bit_quant_type="nf4",
                          bnb_4bit_compute_dtype="bfloat16", bnb_4bit_use_double_quant=True)
    path = tmp_path / "tiny"
    if not path.exists():
        save_tiny(path)
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        path, quantization_config=quantization_config(cfg), dtype=dtype)
    return model, cfg


def _frozen_float_bytes(model) -> dict[torch.dtype, int]:
    sizes: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.__class__.__name__ != "Params4bit" and not param.requires_grad:
            sizes[param.dtype] = sizes.get(param.dtype, 0) + param.numel()
    return sizes


def test_qlora_keeps_bf16_frozen_weights_where_peft_upcasts_them(tmp_path):
    from peft import prepare_model_for_kbit_training

    from pg_finetune.tuning import apply_tuning

    reference, _ = _tiny_4bit(tmp_path, torch.bfloat16)
    reference = prepare_model_for_kbit_training(reference, use_gradient_checkpointing=False)
    ref_sizes = _frozen_float_bytes(reference)
    assert torch.bfloat16 not in ref_sizes and ref_sizes[torch.float32] > 0  # what peft does: all to fp32

    model, cfg = _tiny_4bit(tmp_path, torch.bfloat16)
    peft_model = apply_tuning(model, cfg)
    sizes = _frozen_float_bytes(peft_model)
    assert torch.float32 not in sizes
    assert sizes[torch.bfloat16] == ref_sizes[torch.float32]  # the same weights, half the bytes
    embeddings = peft_model.get_base_model().get_input_embeddings().weight
    vision = peft_model.get_base_model().model.vision_tower
    assert embeddings.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in vision.parameters())
    adapters = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in adapters)  # peft's autocast_adapter_dtype

    # and it trains: a finite loss, LoRA B moves off zero
    from PIL import Image

    from pg_finetune.tiny import build_processor

    processor = build_processor()
    batch = processor(images=[Image.new("RGB", (64, 64), (200, 10, 10))], text=["answer en what color"],
                      suffix=["red"], return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    peft_model.train()
    loss = peft_model(**batch).loss
    loss.backward()
    torch.optim.SGD(adapters, lr=1.0).step()
    assert torch.isfinite(loss)
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_qlora_still_upcasts_float16(tmp_path):
    from pg_finetune.tuning import apply_tuning

    model, cfg = _tiny_4bit(tmp_path, torch.float16)
    peft_model = apply_tuning(model, cfg)
    sizes = _frozen_float_bytes(peft_model)
    assert torch.float16 not in sizes and sizes[torch.float32] > 0


# ------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_tokenizer_has_the_published_ids():
    from pg_finetune.real_size import build_processor

    processor = build_processor("paligemma2-3b-pt-448")
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 257153  # 256000 + 1024 + 128 + <image>; the embeddings pad to 257216
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>"]) == [0, 1, 2]
    assert tokenizer.convert_tokens_to_ids(["<loc0000>", "<loc1023>", "<seg000>", "<seg127>", "<image>"]) == [
        256000, 257023, 257024, 257151, 257152]
    assert processor.image_seq_length == 1024
    ids = tokenizer("<loc0012><loc0500> red", add_special_tokens=False).input_ids
    assert ids[:2] == [256012, 256500]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_real_size", ROOT / "bench" / "real_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_cli_path_on_the_3b_architecture(tmp_path):
    """lora (+ merge), qlora, attention_only, SIGKILL + resume, evaluate, predict: all exit 0."""
    config = os.environ.get("PG_REAL_SIZE_CONFIG", "paligemma-3b-pt-224")
    out = tmp_path / "real_size.json"
    bench = _bench()
    rc = bench.main(["--config", config, "--steps", "2", "--work", str(tmp_path / "work"), "--out", str(out)])
    rows = {r["stage"]: r for r in json.loads(out.read_text())[config]["rows"]}
    assert rc == 0, rows
    assert rows["resume_killed"]["killed"] and rows["resume"]["resumed_from_checkpoint"]
    for stage in ("lora", "qlora", "attention_only"):
        assert len(rows[stage]["step_s"]) == 2, rows[stage]
    # QLoRA keeps the 4-bit decoder: its parameters take well under half of bf16 LoRA's
    assert rows["qlora"]["param_gib"] < 0.6 * rows["lora"]["param_gib"]
    run = tmp_path / "work" / config / "runs"
    assert (run / "lora" / "final" / "adapter_model.safetensors").is_file()
    assert (run / "lora" / "merged" / "model.safetensors.index.json").is_file() or any(
        (run / "lora" / "merged").glob("model*.safetensors"))
