"""PaliGemmaTrainer options: length-grouped batches (`training.group_by_length`) and the image feature cache."""

from __future__ import annotations

import json
import random

from PIL import Image

from pg_finetune.data import load_records
from pg_finetune.model import load_processor
from pg_finetune.trainer import LengthGroupedEpochSampler, text_lengths

BATCH = 4


def _dataset(tmp_path, n: int = 240):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rng = random.Random(0)
    rows = [{"image": "a.png", "prefix": "caption en", "suffix": " ".join(["word"] * rng.randint(1, 60))}
            for _ in range(n)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_records(str(tmp_path / "d.jsonl"), "train")


def _padding(order: list[int], lengths: list[int]) -> float:
    batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
    slots = sum(max(lengths[j] for j in b) * len(b) for b in batches)
    return 1 - sum(lengths) / slots


def test_lengths_come_from_the_text_without_decoding_images(tmp_path):
    dataset = _dataset(tmp_path, n=5)
    tokenizer = load_processor("tiny").tokenizer
    expected = [len(tokenizer(f"{dataset.rows_meta(i)['prefix']}\n{dataset.rows_meta(i)['suffix']}",
                              add_special_tokens=False)["input_ids"]) for i in range(5)]
    assert text_lengths(dataset, tokenizer) == expected
    assert len(set(expected)) > 1


def test_grouped_epochs_are_permutations_reproducible_and_less_padded(tmp_path):
    dataset = _dataset(tmp_path)
    lengths = text_lengths(dataset, load_processor("tiny").tokenizer)
    sampler = LengthGroupedEpochSampler(BATCH, lengths, seed=7)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(dataset)))  # every record once per epoch
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled every epoch
    again = LengthGroupedEpochSampler(BATCH, lengths, seed=7)
    again.set_epoch(1)
    assert list(again) == orders[1]  # a resumed run (or another process) gets the same order
    shuffled = list(range(len(dataset)))
    random.Random(0).shuffle(shuffled)
    assert _padding(orders[0], lengths) < 0.5 * _padding(shuffled, lengths)


def test_the_recipe_switch_reaches_the_trainer(tmp_path):
    from pg_finetune.model import load_model
    from pg_finetune.recipe import recipe_from_dict
    from pg_finetune.train import training_arguments
    from pg_finetune.trainer import PaliGemmaTrainer

    dataset = _dataset(tmp_path, n=16)
    processor = load_processor("tiny")
    samplers = {}
    for grouped in (False, True):
        recipe = recipe_from_dict({"model": {"name_or_path": "tiny"}, "training": {"group_by_length": grouped}})
        trainer = PaliGemmaTrainer(model=load_model(recipe.model, recipe.tuning), processing_class=processor,
                                   args=training_arguments(recipe, tmp_path / "run"), train_dataset=dataset)
        samplers[grouped] = trainer._get_train_sampler()
    assert isinstance(samplers[True], LengthGroupedEpochSampler)
    assert not isinstance(samplers[False], LengthGroupedEpochSampler)


def test_image_feature_cache_is_off_when_parameters_are_sharded(tmp_path, monkeypatch):
    # FSDP / ZeRO-3 gather parameters only inside the wrapped forward; the cache calls the tower outside it
    from transformers import Trainer

    from pg_finetune.model import load_model
    from pg_finetune.recipe import recipe_from_dict
    from pg_finetune.train import training_arguments
    from pg_finetune.trainer import PaliGemmaTrainer

    recipe = recipe_from_dict({"model": {"name_or_path": "tiny"}, "tuning": {"method": "lora"}})
    model, args = load_model(recipe.model, recipe.tuning), training_arguments(recipe, tmp_path / "run")
    assert PaliGemmaTrainer(model=model, args=args).image_features is not None
    original = Trainer.create_accelerator_and_postprocess

    def as_if_fsdp(self):
        original(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", as_if_fsdp)
    assert PaliGemmaTrainer(model=model, args=args).image_features is None
