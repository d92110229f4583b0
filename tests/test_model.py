"""The tiny offline model and the model loader."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

from pg_finetune.model import ModelLoadError, load_model, load_processor, preflight_hub
from pg_finetune.recipe import ModelConfig


@pytest.mark.parametrize("variant", ["paligemma", "paligemma2"])
def test_tiny_cli_writes_a_directory_plain_transformers_reads(tmp_path, variant):
    out = tmp_path / variant
    proc = subprocess.run(
        [sys.executable, "-m", "pg_finetune.tiny", "--out", str(out), "--variant", variant],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    processor = AutoProcessor.from_pretrained(out)
    model = PaliGemmaForConditionalGeneration.from_pretrained(out)
    expected_text = "gemma" if variant == "paligemma" else "gemma2"
    assert model.config.text_config.model_type == expected_text
    assert model.config.vision_config.model_type == "siglip_vision_model"

    tok = processor.tokenizer
    vocab = tok.get_vocab()
    locs = [f"<loc{i:04d}>" for i in range(1024)]
    segs = [f"<seg{i:03d}>" for i in range(128)]
    for token in ["<image>", "<bos>", "<eos>", "<pad>", *locs, *segs]:
        assert token in vocab, token
    # each special token is one id, and the loc tokens are contiguous as in Gemma's vocabulary
    loc_ids = tok.convert_tokens_to_ids(locs)
    assert loc_ids == list(range(loc_ids[0], loc_ids[0] + 1024))
    assert tok("<loc0001><loc1023> cat", add_special_tokens=False)["input_ids"][:2] == [loc_ids[1], loc_ids[1023]]
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.get_input_embeddings().num_embeddings >= len(tok)
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert processor.image_seq_length == n
    # unknown text still encodes (byte fallback), and decodes back
    text = "zebra ünïcode 42"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def _cfg(**kw) -> ModelConfig:
    return replace(ModelConfig(), **kw)


def test_our_loader_reads_the_tiny_model_and_refuses_flash_attention():
    model = load_model(_cfg(name_or_path="tiny"))
    assert model.config._attn_implementation == "sdpa"
    assert load_processor("tiny").image_seq_length == 16
    with pytest.raises(ModelLoadError, match="prefix-LM mask"):
        load_model(_cfg(name_or_path="tiny", attn_implementation="flash_attention_2"))


def test_paligemma2_softcapping_override_and_eager_fallback():
    keep = load_model(_cfg(name_or_path="tiny-paligemma2"))
    assert keep.config.text_config.final_logit_softcapping == 30.0
    assert keep.config._attn_implementation == "eager"  # sdpa cannot soft-cap attention logits
    off = load_model(_cfg(name_or_path="tiny-paligemma2", final_logit_softcapping=0.0))
    assert off.config.text_config.final_logit_softcapping is None
    # the override changes the logits: without capping they may exceed the cap
    ids = torch.tensor([[2, 300, 301]])
    with torch.no_grad():
        capped = keep(input_ids=ids).logits
        uncapped = off(input_ids=ids).logits
    assert capped.abs().max() <= 30.0
    assert not torch.allclose(capped, uncapped)


def test_dtype_is_applied():
    model = load_model(_cfg(name_or_path="tiny", dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_one_dtype_map_serves_every_dtype_field_of_the_schema():
    import typing

    from pg_finetune.model import DTYPES
    from pg_finetune.recipe import TuningConfig

    model_dtypes = typing.get_args(typing.get_type_hints(ModelConfig)["dtype"])
    compute_dtypes = typing.get_args(typing.get_type_hints(TuningConfig)["bnb_4bit_compute_dtype"])
    assert set(model_dtypes) == set(DTYPES) and set(compute_dtypes) <= set(DTYPES) - {"auto"}


def test_missing_local_dir_and_unreachable_hub_say_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(_cfg(name_or_path=str(tmp_path / "nope") + "/"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"google/paligemma-3b-pt-224.*\n.*hf download"):
        preflight_hub("google/paligemma-3b-pt-224", "model config")


def test_a_non_paligemma_checkpoint_is_refused(tmp_path):
    from transformers import GemmaConfig, GemmaForCausalLM

    GemmaForCausalLM(
        GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not PaliGemma"):
        load_model(_cfg(name_or_path=str(tmp_path)))
