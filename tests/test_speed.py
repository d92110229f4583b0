"""Speed-ups that must not change the numbers: suffix-only loss, collator pixel cache and padding."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from pg_finetune.collator import IGNORE_INDEX, PaliGemmaCollator
from pg_finetune.model import load_model, load_processor
from pg_finetune.recipe import ModelConfig, TuningConfig
from pg_finetune.speed import label_positions, suffix_loss
from pg_finetune.tuning import apply_tuning


def _image(color, box=(8, 8, 30, 40)) -> Image.Image:
    image = Image.new("RGB", (64, 64), color)
    image.paste((255, 255, 255), box)
    return image


RECORDS = [
    {"image": _image((200, 30, 30)), "prefix": "caption en", "suffix": "a red circle on the left"},
    {"image": _image((30, 30, 200)), "prefix": "answer en what color is the shape?", "suffix": "blue"},
    {"image": _image((30, 200, 30), (0, 0, 10, 60)), "prefix": "answer en what is the shape?", "suffix": "rectangle"},
]


def test_label_positions_shift_by_one():
    labels = torch.tensor([[-100, -100, 7, 8, 1, -100], [-100, 5, 1, -100, -100, -100]])
    keep, targets = label_positions(labels)
    # position t is kept when label t+1 is a token: it is the position that predicts it
    assert keep.tolist() == [[False, True, True, True, False, False], [True, True, False, False, False, False]]
    assert targets.tolist() == [7, 8, 1, 5, 1]


def _model(name: str, method: str):
    tuning = TuningConfig(
        method=method, bnb_4bit_compute_dtype="float32", lora_dropout=0.0
    )
    torch.manual_seed(0)
    model = apply_tuning(load_model(ModelConfig(name_or_path=name), tuning), tuning).train()
    # dropout off so two forwards are the same function of the weights
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [("tiny", "full"), ("tiny", "lora"), ("tiny-paligemma2", "full"), ("tiny-paligemma2", "lora")]
if importlib.util.find_spec("bitsandbytes") is not None:
    CASES.append(("tiny", "qlora"))


@pytest.mark.parametrize("name,method", CASES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_suffix_loss_equals_the_model_loss_and_its_gradients(name, method, padding_side):
    model = _model(name, method)
    batch = PaliGemmaCollator(load_processor(name), max_length=64, padding_side=padding_side)(RECORDS)
    if name == "tiny-paligemma2":  # the soft-capping path is the one under test
        assert model.config.text_config.final_logit_softcapping == 30.0

    reference = model(**batch).loss
    reference.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    loss = suffix_loss(model, batch)
    loss.backward()
    got = _grads(model)

    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    assert got.keys() == expected.keys() and len(got) > 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)


def test_suffix_loss_with_num_items_in_batch_is_a_sum_over_label_tokens():
    model = _model("tiny", "full").eval()
    batch = PaliGemmaCollator(load_processor("tiny"), max_length=64)(RECORDS)
    n_labels = int((batch["labels"] != IGNORE_INDEX).sum())
    # "a red circle on the left" + eos, "blue" + eos, "rectangle" + eos: at least 3 + 2 + 2 tokens
    assert n_labels >= 7
    with torch.no_grad():
        mean = suffix_loss(model, batch)
        scaled = suffix_loss(model, batch, num_items_in_batch=torch.tensor(2 * n_labels))
        reference = model(**batch, num_items_in_batch=torch.tensor(2 * n_labels)).loss
    torch.testing.assert_close(scaled, mean * n_labels / (2 * n_labels))
    torch.testing.assert_close(scaled, reference, atol=1e-6, rtol=1e-5)


def test_suffix_loss_needs_labels():
    model = _model("tiny", "full")
    batch = PaliGemmaCollator(load_processor("tiny"), max_length=64)([{k: v for k, v in RECORDS[0].items() if k != "suffix"}])
    with pytest.raises(KeyError, match="labels"):
        suffix_loss(model, batch)


def _fresh(records):
    """The same records with new PIL objects, as a dataset that decodes on every read gives them."""
    return [{**r, "image": r["image"].copy()} for r in records]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pixel_cache_and_padding_leave_the_batch_unchanged(padding_side):
    processor = load_processor("tiny")
    cached = PaliGemmaCollator(processor, max_length=64, padding_side=padding_side)
    uncached = PaliGemmaCollator(processor, max_length=64, padding_side=padding_side, pixel_cache_mb=0)
    full_once = processor.image_processor([r["image"] for r in RECORDS], return_tensors="pt")["pixel_values"]
    for _ in range(2):  # first call fills the cache, second reads it back
        for records in (RECORDS, _fresh(RECORDS), _fresh(RECORDS[1:]) + RECORDS[:1], [RECORDS[0], RECORDS[0]]):
            a, b = cached(records), uncached(records)
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), key
    assert torch.equal(cached(RECORDS)["pixel_values"], full_once)
    assert len(cached._pixel_cache) == 3  # one entry per distinct image, however many copies were read
    assert not uncached._pixel_cache


def test_pixel_cache_is_bounded_and_keyed_by_content():
    processor = load_processor("tiny")
    one_image_mb = 3 * 64 * 64 * 4 / 2**20
    collator = PaliGemmaCollator(processor, max_length=64, pixel_cache_mb=1.5 * one_image_mb)
    batch = collator(RECORDS)
    assert len(collator._pixel_cache) == 1  # room for one image only; the rest are computed each time
    assert torch.equal(collator(RECORDS)["pixel_values"], batch["pixel_values"])
    changed = [{**RECORDS[0], "image": _image((200, 30, 31))}]  # one channel of the background differs by 1
    expected = processor.image_processor([changed[0]["image"]], return_tensors="pt")["pixel_values"]
    assert torch.equal(collator(changed)["pixel_values"], expected)
    assert not torch.equal(expected, batch["pixel_values"][:1])


def test_padding_layout_by_hand():
    """Right and left padding of two rows of different length, compared with a hand-written layout."""
    processor = load_processor("tiny")
    n_img = processor.image_seq_length
    for side in ("right", "left"):
        collator = PaliGemmaCollator(processor, max_length=64, padding_side=side)
        rows = [([5] * (n_img + 2) + [9, 1], n_img + 2, 2), ([5] * (n_img + 2) + [1], n_img + 2, 1)]
        batch = collator._pad(rows, train=True)
        pad, ign = collator.pad_id, IGNORE_INDEX
        body = [5] * (n_img + 2)
        if side == "right":
            assert batch["input_ids"].tolist() == [body + [9, 1], body + [1, pad]]
            assert batch["attention_mask"].tolist() == [[1] * (n_img + 4), [1] * (n_img + 3) + [0]]
            assert batch["token_type_ids"].tolist() == [[0] * (n_img + 2) + [1, 1], [0] * (n_img + 2) + [1, 0]]
            assert batch["labels"].tolist() == [[ign] * (n_img + 2) + [9, 1], [ign] * (n_img + 2) + [1, ign]]
        else:
            assert batch["input_ids"].tolist() == [body + [9, 1], [pad] + body + [1]]
            assert batch["attention_mask"].tolist() == [[1] * (n_img + 4), [0] + [1] * (n_img + 3)]
            assert batch["token_type_ids"].tolist() == [[0] * (n_img + 2) + [1, 1], [0] * (n_img + 3) + [1]]
            assert batch["labels"].tolist() == [[ign] * (n_img + 2) + [9, 1], [ign] * (n_img + 3) + [1]]
        assert all(t.dtype == torch.long for t in batch.values())


@pytest.mark.parametrize("method", ["lora", "attention_only"])
def test_image_feature_cache_gives_the_same_loss_and_gradients(method):
    from pg_finetune.speed import ImageFeatureCache

    model = _model("tiny", method)
    collator = PaliGemmaCollator(load_processor("tiny"), max_length=64)
    batch = collator(RECORDS + [RECORDS[0]])  # one image twice in the batch
    cache = ImageFeatureCache()
    assert cache.applies_to(model)

    reference = suffix_loss(model, batch)
    reference.backward()
    expected = _grads(model)
    for _ in range(2):  # first call fills the cache, second reads it
        model.zero_grad(set_to_none=True)
        loss = suffix_loss(model, batch, image_features=cache)
        loss.backward()
        torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
        got = _grads(model)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)
    assert (cache.misses, cache.hits) == (3, 5)  # 3 distinct images; 1 repeat, then 4 cached reads


def test_image_feature_cache_is_bypassed_when_the_vision_tower_trains():
    from pg_finetune.speed import ImageFeatureCache

    tuning = TuningConfig(method="full", train_vision_tower=True)
    model = apply_tuning(load_model(ModelConfig(name_or_path="tiny"), tuning), tuning).train()
    batch = PaliGemmaCollator(load_processor("tiny"), max_length=64)(RECORDS)
    cache = ImageFeatureCache()
    assert not cache.applies_to(model)
    suffix_loss(model, batch, image_features=cache).backward()
    assert cache.hits == cache.misses == 0
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is not None


def test_image_feature_cache_runs_under_the_forwards_autocast():
    """accelerate wraps model.forward in bf16 autocast; the cache calls the tower beside it, so it must
    use the same autocast, or the cached loss differs from the uncached one (7.450754 vs 7.450650)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState


    AcceleratorState._reset_state(reset_partial_state=True)  # the state is a process-wide singleton
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = accelerator.prepare(_model("tiny", "lora"))
    batch = PaliGemmaCollator(load_processor("tiny"), max_length=64)(RECORDS)
    try:
        _check_cached_equals_uncached(model, batch, accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _check_cached_equals_uncached(model, batch, accelerator):
    from pg_finetune.speed import ImageFeatureCache

    with torch.no_grad():
        reference = suffix_loss(model, batch)
        cache = ImageFeatureCache(autocast=accelerator.autocast)
        for _ in range(2):  # computed, then read from the cache
            assert suffix_loss(model, batch, image_features=cache).item() == reference.item()
        assert (cache.misses, cache.hits) == (3, 3)
        # Without the forward's autocast the tower runs in fp32 and the loss moves: the bug this guards.
        assert suffix_loss(model, batch, image_features=ImageFeatureCache()).item() != reference.item()
