"""End to end: the training entry on the tiny model, offline, a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration

from pg_finetune.train import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes/tiny/easyvqa_lora.yaml")


def _run(tmp_path: Path, *overrides: str, recipe: str = RECIPE, **hooks) -> int:
    return main(
        [
            "--recipe", recipe,
            f"training.output_dir={tmp_path / 'run'}",
            "data.train_split=train[:24]",
            "data.eval_split=test[:6]",
            "eval.max_samples=6",
            "eval.batch_size=3",
            "training.per_device_train_batch_size=4",
            "training.max_steps=3",
            "training.logging_steps=1",
            *overrides,
        ],
        **hooks,
    )


def test_lora_run_writes_adapter_processor_recipe_and_metrics(tmp_path):
    assert _run(tmp_path, "training.save_steps=2") == 0
    run = tmp_path / "run"
    final = run / "final"
    assert (final / "adapter_config.json").is_file()
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # an adapter, not a full copy
    assert (final / "processor_config.json").is_file() and (final / "tokenizer.json").is_file()
    saved = yaml.safe_load((final / "recipe.yaml").read_text())
    assert saved["training"]["max_steps"] == 3 and saved["tuning"]["method"] == "lora"
    assert (run / "checkpoint-2" / "recipe.yaml").is_file()  # beside every checkpoint
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3
    history = json.loads((run / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    assert set(metrics["before"]) == set(metrics["after"])
    assert "exact_match" in metrics["after"]
    rows = [json.loads(line) for line in (run / "predictions_after.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all({"id", "prediction", "references"} <= set(r) for r in rows)


def test_full_run_saves_full_weights_that_differ_from_the_base(tmp_path):
    assert _run(tmp_path, "tuning.method=full", "training.learning_rate=1e-3", "eval.before_and_after=false") == 0
    final = tmp_path / "run" / "final"
    trained = PaliGemmaForConditionalGeneration.from_pretrained(final)
    from pg_finetune.model import resolve_model_path

    base = PaliGemmaForConditionalGeneration.from_pretrained(resolve_model_path("tiny"))
    t, b = trained.state_dict(), base.state_dict()
    decoder_changed = any(not torch.equal(t[k], b[k]) for k in t if "language_model" in k)
    vision_same = all(torch.equal(t[k], b[k]) for k in t if "vision_tower" in k)
    assert decoder_changed and vision_same


def test_merge_lora_gives_the_same_outputs_as_the_adapter(tmp_path):
    assert _run(tmp_path, "training.merge_lora=true", "training.learning_rate=1e-2", "eval.before_and_after=false") == 0
    from peft import PeftModel

    from pg_finetune.collator import PaliGemmaCollator
    from pg_finetune.model import load_processor, resolve_model_path

    run = tmp_path / "run"
    processor = load_processor(str(run / "final"))
    base = PaliGemmaForConditionalGeneration.from_pretrained(resolve_model_path("tiny"))
    adapted = PeftModel.from_pretrained(base, run / "final").eval()
    merged = PaliGemmaForConditionalGeneration.from_pretrained(run / "merged").eval()
    batch = PaliGemmaCollator(processor)(
        [{"image": Image.new("RGB", (64, 64), "red"), "prefix": "answer en what color is the shape?", "suffix": "red"}]
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-4, atol=1e-4)


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    assert _run(tmp_path, "training.save_steps=2", "eval.before_and_after=false") == 0
    run = tmp_path / "run"
    assert (run / "checkpoint-3").is_dir()
    assert _run(
        tmp_path, "training.save_steps=2", "training.max_steps=5", "training.resume_from_checkpoint=auto",
        "eval.before_and_after=false",
    ) == 0
    state = json.loads((run / "checkpoint-5" / "trainer_state.json").read_text())
    logged_steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged_steps == [1, 2, 3, 4, 5]  # steps 1-3 come from the first run's state, not repeated


def test_bad_recipe_lists_every_problem(tmp_path, capsys):
    code = _run(tmp_path, "tuning.lora_rank=4", "training.learning_rate=-1")
    err = capsys.readouterr().err
    assert code == 2
    assert "tuning.lora_rank" in err and "training.learning_rate" in err


def test_bad_recipe_is_refused_before_torch_is_imported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tuning:\n  lora_rank: 4\n")
    # -X importtime lists every module the process imports, on stderr
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pg_finetune.train", "--recipe", str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "pg_finetune.recipe" in imported  # the listing is real
    assert not {"torch", "transformers", "numpy", "scipy"} & imported
    errors = [line for line in lines if not line.startswith("import time:")]
    assert any("tuning.lora_rank" in line and "lora_r" in line for line in errors), errors


def test_usage_errors_exit_2_without_raising(capsys):
    assert main(["--no-such-flag"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_bad_record_names_file_and_line(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "blue").save(image)
    lines = [
        {"image": "a.png", "prefix": "caption en", "suffix": "a blue square"},
        {"image": "a.png", "prefix": "caption en"},
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = [f"data.train={data}", "data.train_split=train", "data.eval_split=null", "task.name=caption"]
    code = main(["--recipe", RECIPE, f"training.output_dir={tmp_path / 'run'}", "training.max_steps=1", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:2" in err or "train.jsonl:2" in err
    assert "suffix" in err

    code = main(
        ["--recipe", RECIPE, f"training.output_dir={tmp_path / 'run'}", "training.max_steps=1",
         "training.per_device_train_batch_size=1", "data.skip_bad_records=true", *args]
    )
    assert code == 0


def test_hub_recipe_fails_fast_offline_and_says_what_to_do(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pg_finetune.train", "--recipe", str(ROOT / "recipes/tuxemon_caption.yaml"),
         f"training.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert time.time() - start < 60
    assert "google/paligemma" in proc.stderr and "name_or_path" in proc.stderr


@pytest.mark.parametrize("method", ["attention_only", "qlora"])
def test_other_methods_train(tmp_path, method):
    overrides = [f"tuning.method={method}", "eval.before_and_after=false"]
    if method == "qlora":
        overrides += ["tuning.bnb_4bit_compute_dtype=float32"]
    assert _run(tmp_path, *overrides) == 0
    assert (tmp_path / "run" / "final").is_dir()


def test_wandb_offline_and_tensorboard_logging(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert _run(tmp_path, "logging.report_to=wandb", "logging.wandb_mode=offline", "eval.before_and_after=false") == 0
    assert list(tmp_path.glob("wandb/offline-run-*")), "no offline wandb run written"
    assert _run(tmp_path, "logging.report_to=tensorboard", "eval.before_and_after=false") == 0
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))


def test_corrupt_image_found_mid_training_names_file_and_line(tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "blue").save(good)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = [{"image": "good.png", "prefix": "caption en", "suffix": "a blue square"}] * 3
    rows.insert(1, {"image": "bad.png", "prefix": "caption en", "suffix": "broken"})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--recipe", RECIPE, f"training.output_dir={tmp_path / 'run'}", f"data.train={data}",
            "data.eval_split=null", "task.name=caption", "training.max_steps=2",
            "training.per_device_train_batch_size=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:2" in err and "bad.png" in err
    assert main([*args, "data.skip_bad_records=true"]) == 0


def test_a_single_jsonl_file_is_not_evaluated_on_itself(tmp_path):
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "a.png")
    row = {"image": "a.png", "prefix": "caption en", "suffix": "a blue square"}
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(row) + "\n")
    code = main(["--recipe", RECIPE, f"training.output_dir={tmp_path / 'run'}", f"data.train={data}",
                 "task.name=caption", "training.max_steps=1", "training.per_device_train_batch_size=1"])
    assert code == 0
    assert not (tmp_path / "run" / "predictions_before.jsonl").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["after"] is None


def _poison_forward(monkeypatch, bad_call: int):
    """Make the `bad_call`-th training forward return a NaN loss (the model itself stays finite)."""
    original = PaliGemmaForConditionalGeneration.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:  # the trainer's loss is computed from the logits (suffix_loss) or is out.loss
            calls["n"] += 1
            if calls["n"] >= bad_call:
                out.logits = out.logits * float("nan")
                if out.loss is not None:
                    out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(PaliGemmaForConditionalGeneration, "forward", forward)


def _all_finite(checkpoint: Path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


@pytest.mark.parametrize("logging_steps", [1, 10])
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch, logging_steps
):
    # logging_steps=10: the NaN at step 3 is never logged, yet it is caught before its optimizer step
    _poison_forward(monkeypatch, bad_call=3)
    code = _run(tmp_path, "tuning.method=full", "training.save_steps=1", "training.max_steps=5",
                "eval.before_and_after=false", f"training.logging_steps={logging_steps}")
    err = capsys.readouterr().err
    assert code == 3
    assert "NaN" in err and "step 3" in err and "checkpoint-2" in err
    run = tmp_path / "run"
    assert (run / "checkpoint-2").is_dir() and _all_finite(run / "checkpoint-2")
    assert not (run / "checkpoint-3").exists() and not (run / "final").exists()
    assert not list(run.glob("tmp-*"))
    assert json.loads((run / "log_history.json").read_text()) is not None  # written for the run report


def test_learning_rate_blow_up_exits_3_before_saving_nan_weights(tmp_path, capsys):
    # lr 1.0 with SGD and no clipping: the loss overflows within a few steps (no injection at all)
    code = _run(tmp_path, "tuning.method=full", "training.optim=sgd", "training.learning_rate=1.0",
                "training.max_grad_norm=0", "training.save_steps=4", "training.max_steps=30",
                "eval.before_and_after=false", "training.logging_steps=100", "training.save_total_limit=null")
    err = capsys.readouterr().err
    assert code == 3, err[-1000:]
    assert "NaN/inf at step" in err and "Last good checkpoint" in err
    run = tmp_path / "run"
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    bad_step = int(err.split("NaN/inf at step ")[1].split(";")[0])
    assert all(int(p.name.split("-")[1]) < bad_step for p in checkpoints)
    assert all(_all_finite(p) for p in checkpoints)
    if checkpoints:
        assert str(checkpoints[-1]) in err


def test_nan_weight_is_never_saved(tmp_path, capsys):
    from transformers import TrainerCallback

    class PoisonWeight(TrainerCallback):  # a finite loss can still leave inf weights (e.g. inf gradients)
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    code = _run(tmp_path, "tuning.method=full", "training.save_steps=1", "training.max_steps=4",
                "eval.before_and_after=false", callbacks=[PoisonWeight()])
    err = capsys.readouterr().err
    assert code == 3
    assert "trainable weight" in err and "step 2" in err and "checkpoint-1" in err
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    assert _all_finite(tmp_path / "run" / "checkpoint-1")


def _front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_card_front_matter_and_snippet_that_runs(tmp_path, method):
    overrides = ["training.merge_lora=true"] if method == "lora" else ["tuning.method=full"]
    assert _run(tmp_path, *overrides) == 0
    final = tmp_path / "run" / "final"
    front = _front_matter(final / "README.md")
    assert front["library_name"] == ("peft" if method == "lora" else "transformers")
    assert front["pipeline_tag"] == "image-text-to-text"
    assert {"paligemma", "vqa", method} <= set(front["tags"])
    assert front["datasets"] == ["easy-vqa"]
    assert Path(front["base_model"]).is_dir()  # the tiny model's directory, loadable by transformers
    text = (final / "README.md").read_text()
    assert "| vqa/exact_match |" in text
    # the usage snippet runs as written, on a real image
    image = tmp_path / "your_image.jpg"
    Image.new("RGB", (64, 64), "red").save(image)
    snippet = text.split("```python\n")[1].split("```")[0].replace("your_image.jpg", str(image))
    exec(compile(snippet, "README snippet", "exec"), {})
    if method == "lora":
        assert _front_matter(tmp_path / "run" / "merged" / "README.md")["library_name"] == "transformers"


def test_final_dir_appears_only_when_complete(tmp_path, monkeypatch):
    from pg_finetune import train as train_module

    real_save_recipe = train_module.save_recipe

    def crash_while_writing_final(recipe, path):
        if Path(path).name == "tmp-final":
            raise OSError("disk full (simulated)")
        return real_save_recipe(recipe, path)

    monkeypatch.setattr(train_module, "save_recipe", crash_while_writing_final)
    with pytest.raises(OSError, match="simulated"):
        _run(tmp_path, "eval.before_and_after=false", "logging.html_report=false")
    run = tmp_path / "run"
    assert list((run / "tmp-final").glob("*.safetensors"))  # the weights were half-way there...
    assert not (run / "final").exists()  # ...but nothing named final/ that someone would load

    monkeypatch.setattr(train_module, "save_recipe", real_save_recipe)
    assert _run(tmp_path, "eval.before_and_after=false", "logging.html_report=false") == 0
    assert list((run / "final").glob("*.safetensors")) and (run / "final" / "recipe.yaml").is_file()
    assert not (run / "tmp-final").exists() and not (run / "final" / "training_args.bin").exists()


def test_an_output_dir_that_cannot_be_a_directory_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    for out in (tmp_path / "taken", tmp_path / "taken" / "run"):
        code = main(["--recipe", str(ROOT / "recipes/tiny/easyvqa_lora.yaml"), f"training.output_dir={out}"])
        assert code == 2
        err = capsys.readouterr().err
        assert "training.output_dir" in err and str(tmp_path / "taken") in err and "Traceback" not in err
