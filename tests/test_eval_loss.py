"""The held-out loss (eval/loss): teacher-forced, suffix tokens only, on the eval records.

The reference is worked out here without our collator or `suffix_loss`: PaliGemmaProcessor builds
each record's ids and labels (one record at a time: no padding), the model gives logits at every
position, and -log p of each labelled token is read off a log-softmax by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration

from pg_finetune.collator import PaliGemmaCollator
from pg_finetune.model import load_model, load_processor
from pg_finetune.recipe import ModelConfig, load_recipe, recipe_from_dict
from pg_finetune.recipe_data import load_eval_records
from pg_finetune.report import load_run, plot_curves, training_series
from pg_finetune.tasks import get_task
from pg_finetune.train import main
from pg_finetune.trainer import RunEval

ROOT = Path(__file__).resolve().parents[1]
EVAL_AT = 2


def _image(color) -> Image.Image:
    image = Image.new("RGB", (64, 64), color)
    image.paste((255, 255, 255), (8, 8, 30, 40))
    return image


RECORDS = [  # suffixes of different lengths: batches pad, and the mean is over tokens, not records
    {"image": _image((200, 30, 30)), "prefix": "answer en what color is the shape?", "suffix": "red"},
    {"image": _image((30, 30, 200)), "prefix": "answer en what is it?", "suffix": "a blue circle on the left"},
    {"image": _image((30, 200, 30)), "prefix": "answer en is there a square?", "suffix": "no"},
]


@torch.no_grad()
def reference_loss(model, processor, records) -> float:
    """Sum over records and suffix (+ eos) tokens of -log p(token), divided by the number of tokens."""
    model.eval()
    total, count = 0.0, 0
    for r in records:
        inputs = processor(images=[r["image"]], text=[r["prefix"]], suffix=[r["suffix"]], return_tensors="pt")
        labels = inputs.pop("labels")[0]
        logits = model(**inputs).logits[0]
        for t in range(1, labels.shape[0]):  # position t - 1 predicts token t
            if labels[t] != -100:
                total -= torch.log_softmax(logits[t - 1].double(), dim=-1)[labels[t]].item()
                count += 1
    return total / count


def test_held_out_loss_equals_the_hand_computed_mean_over_suffix_tokens(tmp_path):
    processor = load_processor("tiny")
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path="tiny")).train()  # train mode: the loss must switch to eval
    recipe = recipe_from_dict({"eval": {"batch_size": 2}})  # 3 records: a full batch and a partial one
    collator = PaliGemmaCollator(processor, max_length=64)
    run_eval = RunEval(recipe, processor, get_task("vqa"), RECORDS, tmp_path, True, loss_collator=collator)
    value = run_eval.loss(model)
    assert model.training  # put back as it was
    assert value == pytest.approx(reference_loss(model, processor, RECORDS), rel=1e-5)
    # the mean is per token: a per-record mean of means differs here (suffixes of 2, 7 and 2 tokens)
    assert run_eval.loss(model.eval()) == pytest.approx(value, rel=1e-6)
    no_suffix = RunEval(recipe, processor, get_task("vqa"), [dict(RECORDS[0], suffix=None, answers=["red"])],
                        tmp_path, True, loss_collator=collator)  # fmt: skip
    assert no_suffix.loss(model) is None
    assert RunEval(recipe, processor, get_task("vqa"), RECORDS, tmp_path, True).loss(model) is None  # eval.loss off


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_loss") / "run"
    code = main([
        "--recipe", str(ROOT / "recipes/tiny/easyvqa_full.yaml"), f"training.output_dir={out}",
        "data.train_split=train[:8]", "data.eval_split=test[:3]", "eval.max_samples=3", "eval.batch_size=2",
        "eval.max_new_tokens=1", "training.per_device_train_batch_size=2", f"training.max_steps={EVAL_AT}",
        "training.logging_steps=1", f"eval.eval_steps={EVAL_AT}", f"training.save_steps={EVAL_AT}",
        "training.learning_rate=1e-2", "logging.html_report=false",
    ])  # fmt: skip
    assert code == 0
    return out


def test_logged_eval_loss_is_the_models_held_out_loss_at_that_step(run):
    history = json.loads((run / "log_history.json").read_text())
    logged = [e for e in history if "eval/loss" in e]
    assert [e["step"] for e in logged] == [EVAL_AT]
    assert "eval/exact_match" in logged[0]  # logged with the generation metrics of the same evaluation
    processor = load_processor("tiny")
    records = load_eval_records(load_recipe(run / "recipe.yaml"))
    at_step = PaliGemmaForConditionalGeneration.from_pretrained(run / f"checkpoint-{EVAL_AT}")
    assert logged[0]["eval/loss"] == pytest.approx(reference_loss(at_step, processor, records), rel=1e-4)
    metrics = json.loads((run / "metrics.json").read_text())
    base = load_model(ModelConfig(name_or_path="tiny"))  # the tiny model is the same random weights every time
    assert metrics["eval_loss_before"] == pytest.approx(reference_loss(base, processor, records), rel=1e-4)
    assert metrics["eval_loss_after"] == pytest.approx(logged[0]["eval/loss"], rel=1e-5)  # final/ = step 2
    assert metrics["eval_loss_before"] != pytest.approx(metrics["eval_loss_after"], rel=1e-3)  # it trained


def test_report_draws_the_held_out_loss_beside_the_training_loss(run, tmp_path, monkeypatch):
    loaded = load_run(run)
    series = training_series(loaded.log_history)
    assert [s for s, _ in series["eval/loss"]] == [EVAL_AT] and [s for s, _ in series["loss"]] == [1, 2]
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    plot_curves(loaded, tmp_path / "curves.png")
    axes = [ax for ax in figures[0].axes if ax.get_visible()]
    loss_panel = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata(), strict=True))
                  for line in axes[0].get_lines()}  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert loss_panel["train loss"] == [pytest.approx(p) for p in series["loss"]]
    expected = [(0, metrics["eval_loss_before"]), *series["eval/loss"]]
    assert loss_panel["held-out loss"] == [pytest.approx(p) for p in expected]
    # a panel per generation metric, none for the loss (it is on the first one)
    assert all(ax.get_title() != f"{loaded.recipe.task.name}/loss" for ax in axes[1:])
    assert {ax.get_title() for ax in axes[1:]} >= {"vqa/exact_match"}
