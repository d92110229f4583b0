"""The prefix-LM collator: layout, masks, loss positions, padding and truncation.

The semantic tests run the tiny PaliGemma and perturb single tokens: what a
position may see is read off which hidden states change.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pg_finetune.collator import IGNORE_INDEX, PaliGemmaCollator, SequenceTooLongError
from pg_finetune.tiny import build_tiny


@pytest.fixture(scope="module", params=["paligemma", "paligemma2"])
def tiny(request):
    model, processor = build_tiny(variant=request.param, seed=0)
    return model.eval(), processor


def _image(color) -> Image.Image:
    image = Image.new("RGB", (64, 64), color)
    image.paste((255, 255, 255), (8, 8, 30, 40))
    return image


RECORDS = [
    {"image": _image((200, 30, 30)), "prefix": "caption en", "suffix": "a red circle on the left"},
    {"image": _image((30, 30, 200)), "prefix": "answer en what color is the shape?", "suffix": "blue"},
]


def _hidden(model, batch, attn="sdpa") -> torch.Tensor:
    if attn == "sdpa" and getattr(model.config.text_config, "attn_logit_softcapping", None):
        pytest.skip("Gemma 2 attention soft-capping runs only with eager attention in transformers 5.x")
    model.config._attn_implementation = attn
    model.config.text_config._attn_implementation = attn
    with torch.no_grad():
        out = model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            pixel_values=batch["pixel_values"],
        )
    return out.last_hidden_state


def test_layout_matches_the_reference_processor(tiny):
    """Ids, token types and labels agree with PaliGemmaProcessor(text=prefix, suffix=suffix)."""
    _, processor = tiny
    batch = PaliGemmaCollator(processor, max_length=128)(RECORDS)
    for i, r in enumerate(RECORDS):
        ref = processor(images=[r["image"]], text=[r["prefix"]], suffix=[r["suffix"]], return_tensors="pt")
        keep = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][keep].tolist() == ref["input_ids"][0].tolist()
        assert batch["token_type_ids"][i][keep].tolist() == ref["token_type_ids"][0].tolist()
        assert batch["labels"][i][keep].tolist() == ref["labels"][0].tolist()
        torch.testing.assert_close(batch["pixel_values"][i], ref["pixel_values"][0])


def test_sequence_layout_and_loss_positions(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    n_img = processor.image_seq_length
    batch = PaliGemmaCollator(processor, max_length=128, padding_side="right")(RECORDS)
    for i, r in enumerate(RECORDS):
        prefix_ids = tok(r["prefix"] + "\n", add_special_tokens=False)["input_ids"]
        suffix_ids = tok(r["suffix"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected = [processor.image_token_id] * n_img + [tok.bos_token_id] + prefix_ids + suffix_ids
        length = len(expected)
        assert batch["input_ids"][i, :length].tolist() == expected
        assert batch["attention_mask"][i].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
        n_prompt = n_img + 1 + len(prefix_ids)
        assert batch["token_type_ids"][i, :n_prompt].eq(0).all()
        assert batch["token_type_ids"][i, n_prompt:length].eq(1).all()
        # loss exactly on suffix + eos, never on the prompt or the padding
        labelled = (batch["labels"][i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(range(n_prompt, length))
        assert batch["labels"][i, n_prompt:length].tolist() == suffix_ids
        assert batch["labels"][i, length - 1].item() == tok.eos_token_id


def test_model_loss_is_cross_entropy_over_suffix_tokens_only(tiny):
    model, processor = tiny
    batch = PaliGemmaCollator(processor, max_length=128)(RECORDS)
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    in_loss = (batch["token_type_ids"][:, 1:] == 1) & (batch["attention_mask"][:, 1:] == 1)
    manual = torch.nn.functional.cross_entropy(logits[in_loss], targets[in_loss])
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-5)


def _perturb(batch: dict, position: int) -> dict:
    """Return a copy of a one-row batch with the token at `position` replaced by another text token."""
    other = dict(batch)
    other["input_ids"] = batch["input_ids"].clone()
    old = int(other["input_ids"][0, position])
    other["input_ids"][0, position] = 300 if old != 300 else 301
    return other


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_is_bidirectional(tiny, attn):
    """The last prompt token changes the hidden states of every image and earlier prompt position."""
    model, processor = tiny
    a = PaliGemmaCollator(processor, max_length=128)([RECORDS[1]])
    n_prompt = int((a["token_type_ids"][0] == 0).sum())
    newline = len(processor.tokenizer("\n", add_special_tokens=False)["input_ids"])
    position = n_prompt - newline - 1  # the last prompt word, just before the "\n" separator
    ha, hb = _hidden(model, a, attn), _hidden(model, _perturb(a, position), attn)
    changed = (ha[0, :position] - hb[0, :position]).abs().amax(-1) > 1e-6
    n_img = processor.image_seq_length
    assert changed[:n_img].all(), "image tokens did not attend to the later prompt token"
    assert changed[n_img:].all(), "earlier prompt tokens (and <bos>) did not attend to a later one"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_suffix_is_causal(tiny, attn):
    """Changing a suffix token never changes any earlier position, and does change itself and later ones."""
    model, processor = tiny
    a = PaliGemmaCollator(processor, max_length=128)([RECORDS[0]])
    n_prompt = int((a["token_type_ids"][0] == 0).sum())
    for position in (n_prompt, n_prompt + 2):
        assert a["token_type_ids"][0, position] == 1
        ha, hb = _hidden(model, a, attn), _hidden(model, _perturb(a, position), attn)
        torch.testing.assert_close(ha[0, :position], hb[0, :position], rtol=0, atol=1e-6)
        assert ((ha[0, position:] - hb[0, position:]).abs().amax(-1) > 1e-6).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_changes_nothing(tiny, padding_side, attn):
    """Hidden states of real tokens do not depend on how much padding there is or what it holds."""
    model, processor = tiny
    collator = PaliGemmaCollator(processor, max_length=128, padding_side=padding_side)
    padded = collator(RECORDS)
    row = int(padded["attention_mask"].sum(1).argmin())  # the shorter record gets padding
    alone = collator([RECORDS[row]])
    keep = padded["attention_mask"][row].bool()
    assert (~keep).sum() > 0
    h_alone = _hidden(model, alone, attn)[0]
    h_padded = _hidden(model, padded, attn)[row][keep]
    torch.testing.assert_close(h_padded, h_alone, rtol=1e-4, atol=1e-4)

    garbage = dict(padded)
    garbage["input_ids"] = padded["input_ids"].clone()
    garbage["input_ids"][row][~keep] = torch.randint(5, 500, (int((~keep).sum()),))
    h_garbage = _hidden(model, garbage, attn)[row][keep]
    torch.testing.assert_close(h_garbage, h_padded, rtol=0, atol=1e-6)
    assert torch.isfinite(_hidden(model, padded, attn)).all()


def test_left_and_right_padding_give_the_same_loss(tiny):
    model, processor = tiny
    losses = {}
    for side in ("right", "left"):
        batch = PaliGemmaCollator(processor, max_length=128, padding_side=side)(RECORDS)
        with torch.no_grad():
            losses[side] = model(**batch).loss
    torch.testing.assert_close(losses["right"], losses["left"], rtol=1e-4, atol=1e-4)


def test_generation_batch_has_no_labels_and_ends_with_the_separator(tiny):
    model, processor = tiny
    collator = PaliGemmaCollator(processor, max_length=128, padding_side="left")
    records = [{k: v for k, v in r.items() if k != "suffix"} for r in RECORDS]
    batch = collator(records)
    assert "labels" not in batch
    assert batch["token_type_ids"].eq(0).all()
    newline = processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][:, -len(newline) :].tolist() == [newline] * len(records)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_mixed_batch_is_refused(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="mixes records"):
        PaliGemmaCollator(processor)([RECORDS[0], {"image": RECORDS[1]["image"], "prefix": "caption en"}])


def test_truncation_cuts_the_prompt_first_and_keeps_eos(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    long_prefix = "answer en " + "what color is the shape? " * 20
    suffix = "blue"
    suffix_ids = tok(suffix, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    max_length = 20
    collator = PaliGemmaCollator(processor, max_length=max_length)
    batch = collator([{"image": RECORDS[0]["image"], "prefix": long_prefix, "suffix": suffix}])
    text_len = int(batch["attention_mask"].sum()) - processor.image_seq_length
    assert text_len == max_length
    labels = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labels == suffix_ids  # the target is intact
    n_prompt = processor.image_seq_length + max_length - len(suffix_ids)
    assert batch["input_ids"][0, n_prompt - len(newline) : n_prompt].tolist() == newline
    assert collator.stats.truncated_prefix == 1 and collator.stats.truncated_suffix == 0
    full = len(tok(long_prefix, add_special_tokens=False)["input_ids"])
    assert collator.stats.prefix_tokens_removed == full - (max_length - 1 - len(newline) - len(suffix_ids))


def test_truncation_of_a_too_long_target_keeps_eos(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    suffix = "a red circle on the left " * 10
    collator = PaliGemmaCollator(processor, max_length=12)
    batch = collator([{"image": RECORDS[0]["image"], "prefix": "caption en", "suffix": suffix}])
    labels = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labels[-1] == tok.eos_token_id
    assert int(batch["attention_mask"].sum()) - processor.image_seq_length == 12
    assert collator.stats.truncated_prefix == 1 and collator.stats.truncated_suffix == 1
    # One record lost prompt and target tokens both: one truncated record, not two "truncations".
    collator([{"image": RECORDS[0]["image"], "prefix": "caption en", "suffix": "a red circle"}])  # fits
    assert (collator.stats.records, collator.stats.truncated_records) == (2, 1)
    assert collator.stats.summary().startswith("1 of 2 records truncated: 1 prompts lost ")


def test_truncation_error_policy_names_the_record(tiny):
    _, processor = tiny
    collator = PaliGemmaCollator(processor, max_length=10, truncation="error")
    record = dict(RECORDS[0], where="data/train.jsonl:7", suffix="a red circle on the left " * 5)
    with pytest.raises(SequenceTooLongError, match=r"data/train\.jsonl:7.*max_length=10"):
        collator([record])
    assert collator.stats.truncated_records == 0  # refused, not truncated


def test_skipped_records_are_dropped(tiny):
    _, processor = tiny
    batch = PaliGemmaCollator(processor)([None, RECORDS[0]])
    assert batch["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match="skipped"):
        PaliGemmaCollator(processor)([None])
