"""big_vision's loss options: label smoothing, per-example normalisation, llm dropout (issue #15).

References are computed here independently of our code: numpy with big_vision's formula
(`trainers/proj/paligemma/train.py`: target 1 - eps on the label, eps / (V - 1) elsewhere; per example
`sum(token losses) / clip(n_tokens, 1)`, then the mean over the batch's examples), from the model's
full logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import TrainingArguments

from pg_finetune.collator import IGNORE_INDEX, PaliGemmaCollator
from pg_finetune.generate import GenerationSettings, generate
from pg_finetune.model import load_model, load_processor
from pg_finetune.recipe import ModelConfig, RecipeError, recipe_from_dict
from pg_finetune.speed import suffix_loss, token_losses
from pg_finetune.trainer import PaliGemmaTrainer


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


# suffixes of very different token counts, so per-token and per-example means differ
SUFFIXES = ["yes", "a red circle on the left of a blue square", "two", "rectangle", "no",
            "three green triangles and one small yellow circle", "blue", "a circle"]
RECORDS = [{"image": _image(i), "prefix": "answer en what is it?", "suffix": s} for i, s in enumerate(SUFFIXES)]


def _bv_token_losses(logits: np.ndarray, targets: np.ndarray, eps: float) -> np.ndarray:
    """big_vision: -sum(log_softmax(logits) * where(onehot, 1 - eps, eps / (V - 1))), in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    onehot = np.eye(logits.shape[-1])[targets]
    weights = np.where(onehot == 1.0, 1.0 - eps, eps / (logits.shape[-1] - 1)) if eps > 0 else onehot
    return -(logp * weights).sum(-1)


def _bv_loss(logits: np.ndarray, labels: np.ndarray, eps: float, per_example: bool) -> float:
    """Loss of a batch from full (B, T, V) logits and (B, T) labels, -100 = no loss (big_vision's mask_loss)."""
    per_row_sums, per_row_counts = [], []
    for b in range(labels.shape[0]):
        t = np.nonzero(labels[b, 1:] != IGNORE_INDEX)[0]  # position t predicts label t + 1
        losses = _bv_token_losses(logits[b, t], labels[b, t + 1], eps) if len(t) else np.zeros(0)
        per_row_sums.append(losses.sum())
        per_row_counts.append(len(t))
    sums, counts = np.array(per_row_sums), np.array(per_row_counts)
    if per_example:
        return float(np.mean(sums / np.clip(counts, 1, None)))
    return float(sums.sum() / counts.sum())


# ---------------------------------------------------------------------------------------- smoothing
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_token_losses_are_big_visions_smoothing_on_a_small_vocab(eps):
    rng = np.random.default_rng(0)
    logits, targets = rng.normal(size=(6, 7)).astype(np.float32) * 3, rng.integers(0, 7, 6)
    got = token_losses(torch.from_numpy(logits), torch.from_numpy(targets), eps)
    np.testing.assert_allclose(got.numpy(), _bv_token_losses(logits, targets, eps), rtol=1e-5, atol=1e-6)
    if eps:
        # not torch's own smoothing (eps / V everywhere)...
        torch_own = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets), label_smoothing=eps, reduction="none")
        assert not torch.allclose(got, torch_own, atol=1e-4)
        # ...but torch's with eps * V / (V - 1), which puts the same target distribution
        same = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets), label_smoothing=eps * 7 / 6, reduction="none")
        torch.testing.assert_close(got, same, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(ModelConfig(name_or_path="tiny")).eval(), load_processor("tiny")


@pytest.mark.parametrize("eps,per_example", [(0.0, True), (0.2, False), (0.2, True)])
def test_suffix_loss_equals_big_visions_formula_on_model_logits(tiny, eps, per_example):
    model, processor = tiny
    batch = PaliGemmaCollator(processor, max_length=64, padding_side="right")(RECORDS[:2])
    labels = batch["labels"].numpy()
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    assert counts[0] != counts[1]  # different suffix lengths: per-example differs from per-token
    with torch.no_grad():
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float().numpy()
        got = suffix_loss(model, batch, label_smoothing=eps, per_example=per_example)
        # the Trainer's form: a sum divided by the count of the global batch (here: this batch)
        n = labels.shape[0] if per_example else int(counts.sum())
        got_n = suffix_loss(model, batch, n, label_smoothing=eps, per_example=per_example)
    expected = _bv_loss(full, labels, eps, per_example)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(got_n) == pytest.approx(expected, rel=1e-5)
    other = _bv_loss(full, labels, eps, not per_example)
    assert abs(other - expected) > 1e-3 * expected  # the two normalisations are told apart here


def test_example_without_label_tokens_counts_as_zero(tiny):
    model, processor = tiny
    batch = PaliGemmaCollator(processor, max_length=64, padding_side="right")(RECORDS[:2])
    batch["labels"][1] = IGNORE_INDEX  # e.g. a suffix truncated away: big_vision's clip(n, 1)
    with torch.no_grad():
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float().numpy()
        got = suffix_loss(model, batch, per_example=True)
    expected = _bv_loss(full, batch["labels"].numpy(), 0.0, per_example=True)
    first_alone = _bv_loss(full[:1], batch["labels"].numpy()[:1], 0.0, per_example=True)
    assert expected == pytest.approx(first_alone / 2)
    assert float(got) == pytest.approx(expected, rel=1e-5)


# -------------------------------------------------------------------- accumulation invariance (example)
def _train_one_step(tmp_path, batch: int, accumulation: int) -> tuple[dict[str, torch.Tensor], float]:
    """(weights, train_loss) after one SGD step on all of RECORDS, per-example loss, smoothing 0.1."""
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path="tiny"))
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}x{accumulation}"),
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,  # SGD: scale matters
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        remove_unused_columns=False, label_names=["labels"], seed=0, data_seed=0,
    )
    trainer = PaliGemmaTrainer(
        model=model, args=args, train_dataset=RECORDS,
        data_collator=PaliGemmaCollator(load_processor("tiny"), max_length=64, padding_side="right"),
        loss_normalization="example", label_smoothing=0.1, cache_image_features=False,
    )
    output = trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}, output.training_loss


def test_example_normalisation_batch_8_equals_batch_2_times_accumulation_4(tmp_path, tiny):
    whole, whole_loss = _train_one_step(tmp_path, 8, 1)
    split, split_loss = _train_one_step(tmp_path, 2, 4)
    # The loss the Trainer optimised is big_vision's per-example one over all 8 (not per token, not per
    # micro-batch): numpy on the untrained model's full logits. Order does not matter for a mean.
    model, processor = tiny
    batch = PaliGemmaCollator(processor, max_length=64, padding_side="right")(RECORDS)
    full = _forward(model, batch).float().numpy()
    expected = _bv_loss(full, batch["labels"].numpy(), 0.1, per_example=True)
    assert abs(_bv_loss(full, batch["labels"].numpy(), 0.1, per_example=False) - expected) > 1e-2
    assert whole_loss == pytest.approx(expected, rel=1e-5)
    assert split_loss == pytest.approx(expected, rel=1e-5)
    # ...and the gradient is the same: with SGD (no Adam normalisation) a count off by the
    # accumulation factor would scale the step 4x.
    base = dict(model.named_parameters())
    assert max((whole[k] - base[k]).abs().max().item() for k in whole) > 1e-3  # the step moved the weights
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------ recipe
def test_recipe_refuses_the_options_with_the_stock_loss():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(
            {"training": {"label_positions_loss": False, "label_smoothing": 0.1, "loss_normalization": "example"}},
            source="t.yaml",
        )
    problems = info.value.problems
    assert any(p.startswith("training.label_smoothing:") and "label_positions_loss: true" in p for p in problems)
    assert any(p.startswith("training.loss_normalization:") and "label_positions_loss: true" in p for p in problems)


# ----------------------------------------------------------------------------------------- dropout
def _forward(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_dropout_is_on_in_train_mode_and_off_in_eval():
    name = "tiny"
    processor = load_processor(name)
    batch = PaliGemmaCollator(processor, max_length=64, padding_side="right")(RECORDS[:2])
    plain = load_model(ModelConfig(name_or_path=name))
    dropped = load_model(ModelConfig(name_or_path=name, dropout=0.3))
    checkpoint_value = plain.config.text_config.attention_dropout
    assert dropped.config.text_config.attention_dropout == checkpoint_value  # attention probabilities untouched

    dropped.train()
    first, second = _forward(dropped, batch), _forward(dropped, batch)
    assert not torch.allclose(first, second)
    dropped.eval()
    torch.testing.assert_close(_forward(dropped, batch), _forward(dropped, batch), rtol=0, atol=0)
    torch.testing.assert_close(_forward(dropped, batch), _forward(plain.eval(), batch))
    plain.train()  # no dropout asked: train mode is deterministic
    torch.testing.assert_close(_forward(plain, batch), _forward(plain, batch), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-paligemma2"])
def test_dropout_sits_where_big_vision_puts_it(name):
    """The MLP branch (and Gemma 2's normed attention branch) reaches the residual as 0 or x / (1 - p)."""
    p = 0.5
    model = load_model(ModelConfig(name_or_path=name, dropout=p)).train()
    layer = model.model.language_model.layers[0]
    targets = [layer.mlp] + ([layer.post_attention_layernorm] if name == "tiny-paligemma2" else [])
    seen = []
    for module in targets:  # registered after the dropout hook: sees what goes into the residual add
        module.register_forward_hook(lambda m, args, out: seen.append((m, args[0].detach(), out.detach())))
    batch = PaliGemmaCollator(load_processor(name), max_length=64, padding_side="right")(RECORDS[:2])
    _forward(model, batch)
    assert len(seen) == len(targets)
    for module, inputs, out in seen:
        clean = module.forward(inputs)  # the module without hooks
        zero = out == 0
        assert 0.4 < zero.float().mean().item() < 0.6
        torch.testing.assert_close(out[~zero], clean[~zero] / (1 - p))


def test_generation_runs_without_dropout():
    processor = load_processor("tiny")
    records = [{k: v for k, v in r.items() if k != "suffix"} for r in RECORDS[:3]]
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    reference = generate(load_model(ModelConfig(name_or_path="tiny")), processor, records, settings, progress=False)
    model = load_model(ModelConfig(name_or_path="tiny", dropout=0.5)).train()
    assert generate(model, processor, records, settings, progress=False) == reference
    assert model.training  # generate restores the mode it found
