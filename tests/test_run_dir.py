"""The run directory through the CLI (`pg_finetune.train.main`): a finished run is not trained again, two
runs never mix in one output_dir, damaged checkpoints are named, bad records are skipped at any batch
size, and metrics.json describes the whole run across a kill and resume.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from pg_finetune.train import main
from tests.hooks import TracingCollator

ROOT = Path(__file__).resolve().parents[1]
FULL = str(ROOT / "recipes/tiny/easyvqa_full.yaml")
LORA = str(ROOT / "recipes/tiny/easyvqa_lora.yaml")
FAST = [
    "data.max_train_samples=8", "data.eval_split=null", "eval.before_and_after=false", "logging.html_report=false",
    "training.per_device_train_batch_size=2", "training.logging_steps=1", "training.save_total_limit=null",
]


def _args(out: Path, *extra: str, recipe: str = FULL) -> list[str]:
    return ["--recipe", recipe, *FAST, f"training.output_dir={out}", *extra]


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(folder / name)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _logged_losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e}


# ----------------------------------------------------------------------------------------------------
# 1. a finished run, started again with resume auto, trains nothing. 8 records at batch 2 are 4 steps an
# epoch: a run of 3 steps ends mid-epoch, where transformers' loop would train a step past max_steps.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("recipe", "length", "last"),
    [
        (FULL, ["training.max_steps=3", "training.save_steps=2"], "checkpoint-3"),
        # epochs, not max_steps: 0.75 x (8 records / batch 2) = 3 steps, by the Trainer's own rule
        (LORA, ["training.max_steps=-1", "training.num_train_epochs=0.75", "training.save_steps=2"], "checkpoint-3"),
    ],
)
def test_a_finished_run_started_again_trains_nothing_and_keeps_final(tmp_path, capsys, recipe, length, last):
    out = tmp_path / "run"
    args = _args(out, *length, "training.resume_from_checkpoint=auto", recipe=recipe)
    assert main(args) == 0
    before = _weights(out / "final")
    listing = sorted(p.name for p in out.iterdir())
    final_mtime = (out / "final").stat().st_mtime_ns
    capsys.readouterr()
    for _ in range(2):  # each re-run used to add one more step
        assert main(args) == 0
        assert "complete" in capsys.readouterr().out
    assert _checkpoints(out)[-1] == last and sorted(p.name for p in out.iterdir()) == listing
    assert (out / "final").stat().st_mtime_ns == final_mtime and _same(before, _weights(out / "final"))
    assert _metrics(out)["steps"] == 3


def test_a_crash_while_writing_final_is_finished_without_training(tmp_path, monkeypatch):
    from pg_finetune import train as train_module

    out = tmp_path / "run"
    args = _args(out, "training.max_steps=3", "training.save_steps=2", "training.resume_from_checkpoint=auto")
    real = train_module.save_recipe

    def crash_in_final(recipe, path):
        if Path(path).name == "tmp-final":
            raise OSError("disk full (simulated)")
        return real(recipe, path)

    monkeypatch.setattr(train_module, "save_recipe", crash_in_final)
    with pytest.raises(OSError, match="simulated"):
        main(args)
    monkeypatch.setattr(train_module, "save_recipe", real)
    assert not (out / "final").exists() and not (out / "metrics.json").exists()

    assert main(args) == 0
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-3"]  # no step 4
    assert _same(_weights(out / "checkpoint-3"), _weights(out / "final"))
    assert sorted(_logged_losses(out)) == [1, 2, 3] and not list(out.glob("tmp-*"))
    metrics = _metrics(out)
    losses = _logged_losses(out)
    assert metrics["steps"] == 3 and metrics["segments"] == 2
    assert metrics["train_loss"] == pytest.approx(sum(losses.values()) / 3, rel=1e-5)


def test_a_kill_during_the_final_save_is_finished_without_training(tmp_path):
    out = tmp_path / "run"
    args = _args(out, "training.max_steps=3", "training.save_steps=2", "training.resume_from_checkpoint=auto")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "hooks.py"), "--kill-in-final-save", "--", *args],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "tmp-final").is_dir() and not (out / "final").exists()
    assert main(args) == 0
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    assert _same(_weights(out / "checkpoint-3"), _weights(out / "final"))
    assert not (out / "tmp-final").exists() and (out / "final" / "recipe.yaml").is_file()


# ----------------------------------------------------------------------------------------------------
# 2. two runs never mix in one output_dir
# ----------------------------------------------------------------------------------------------------
def test_a_fresh_run_next_to_another_recipes_checkpoints_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "training.max_steps=2", "training.save_steps=1", recipe=LORA)) == 0
    capsys.readouterr()
    code = main(_args(out, "training.max_steps=3", "training.save_steps=1"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(out) in err and "tuning.method ('lora' there, 'full' here)" in err
    assert "training.output_dir" in err and "training.overwrite_output_dir: true" in err
    assert _checkpoints(out) == ["checkpoint-1", "checkpoint-2"]  # untouched
    # 'auto' would have resumed the other run's checkpoint-2: refused the same way
    assert main(_args(out, "training.max_steps=3", "training.resume_from_checkpoint=auto")) == 2
    assert "tuning.method" in capsys.readouterr().err


def test_a_fresh_run_of_another_length_is_refused_and_overwrite_starts_clean(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "training.max_steps=5", "training.save_steps=1")) == 0
    capsys.readouterr()
    # checkpoint-5 (the old run's) would outlive this run's checkpoints under save_total_limit and be resumed
    args = _args(out, "training.max_steps=3", "training.save_steps=1", "training.save_total_limit=2")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "training.max_steps (5 there, 3 here)" in err and "overwrite_output_dir" in err
    assert main([*args, "training.overwrite_output_dir=true"]) == 0
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    assert _metrics(out)["steps"] == 3 and _metrics(out)["segments"] == 1


def test_resuming_a_checkpoint_of_a_different_recipe_names_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "training.max_steps=2", "training.save_steps=1")) == 0
    capsys.readouterr()
    changed = ["training.max_steps=4", "training.learning_rate=0.01", "data.max_length=48"]
    assert main(_args(out, *changed, "training.resume_from_checkpoint=auto")) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "checkpoint-2" in err and "Traceback" not in err
    assert "training.learning_rate (0.001 there, 0.01 here)" in err and "data.max_length (64 there, 48 here)" in err
    explicit = f"training.resume_from_checkpoint={out / 'checkpoint-1'}"
    assert main(_args(out, *changed, explicit)) == 2
    assert "checkpoint-1" in capsys.readouterr().err
    # what may change on a resume (run length, logging, eval, save cadence) does not stop it
    assert main(_args(out, "training.max_steps=4", "training.save_steps=2", "training.logging_steps=2",
                      "logging.log_level=warning", "training.resume_from_checkpoint=auto")) == 0
    assert _metrics(out)["steps"] == 4


# ----------------------------------------------------------------------------------------------------
# 10. a damaged checkpoint is named, with the previous complete one
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    runs = {}
    for name, recipe in (("full", FULL), ("lora", LORA)):
        out = tmp_path_factory.mktemp(name) / "run"
        assert main(_args(out, "training.max_steps=4", "training.save_steps=2", recipe=recipe)) == 0
        shutil.rmtree(out / "final")  # so 'auto' has work left: write final/ from checkpoint-4
        runs[name] = (recipe, out)
    return runs


@pytest.mark.parametrize(
    ("run", "damaged"),
    [("full", "optimizer.pt"), ("full", "scheduler.pt"), ("full", "rng_state.pth"), ("full", "trainer_state.json"),
     ("full", "model.safetensors"), ("lora", "adapter_model.safetensors")],
)
def test_a_truncated_checkpoint_file_is_named_with_the_previous_checkpoint(tmp_path, capsys, finished_runs, run, damaged):
    recipe, source = finished_runs[run]
    out = tmp_path / "run"
    shutil.copytree(source, out)
    path = out / "checkpoint-4" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code = main(_args(out, "training.max_steps=4", "training.resume_from_checkpoint=auto", recipe=recipe))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{out / 'checkpoint-4'} is damaged: {damaged}" in err
    assert f"training.resume_from_checkpoint={out / 'checkpoint-2'}" in err
    assert not (out / "final").exists()


# ----------------------------------------------------------------------------------------------------
# 3. bad records skipped at any batch size; images checked before training
# ----------------------------------------------------------------------------------------------------
def _jsonl_with_bad_images(tmp_path: Path, good: int, bad: int) -> Path:
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "good.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # a valid header, then the file ends
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = [{"image": "good.png", "prefix": "caption en", "suffix": f"a blue square {i}"} for i in range(good)]
    rows += [{"image": ("cut.png", "junk.png")[i % 2], "prefix": "caption en", "suffix": "broken"} for i in range(bad)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("batch", "good", "bad"), [(1, 1, 1), (2, 1, 3)])
def test_skip_bad_records_trains_every_step_with_full_batches(tmp_path, batch, good, bad):
    # batch 1: any bad record is a whole batch; batch 2 with 3 of 4 bad: one batch of each epoch is all bad
    data = _jsonl_with_bad_images(tmp_path, good, bad)
    out, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    args = ["--recipe", LORA, f"training.output_dir={out}", f"data.train={data}", "data.eval_split=null",
            "task.name=caption", "training.max_steps=4", "logging.html_report=false",
            f"training.per_device_train_batch_size={batch}", "data.skip_bad_records=true"]
    assert main(args, wrap_collator=lambda c: TracingCollator(c, str(trace))) == 0
    batches = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(batches) >= 4 and all(len(b["ids"]) == batch for b in batches)  # never a short or empty batch
    metrics = _metrics(out)
    assert metrics["steps"] == 4 and metrics["skipped_records"] == {"image cannot be decoded": bad}


def test_check_images_lists_every_unreadable_image_before_training(tmp_path, capsys, monkeypatch):
    data = _jsonl_with_bad_images(tmp_path, 2, 2)
    out = tmp_path / "run"
    args = ["--recipe", LORA, f"training.output_dir={out}", f"data.train={data}", "data.eval_split=null",
            "task.name=caption", "training.max_steps=2", "logging.html_report=false", "data.check_images=true"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "2 bad records" in err
    assert "train.jsonl:3" in err and "cut.png" in err and "train.jsonl:4" in err and "junk.png" in err
    assert not out.exists()  # refused before anything was written

    # with skip_bad_records they are skipped from the first step (never decoded) and counted
    from pg_finetune.data import records as records_module

    decoded, real_open = [], records_module.open_image
    monkeypatch.setattr(records_module, "open_image", lambda src, where="": decoded.append(str(src)) or real_open(src, where))
    assert main([*args, "data.skip_bad_records=true", "training.per_device_train_batch_size=1"]) == 0
    assert decoded and not any("cut.png" in s or "junk.png" in s for s in decoded)
    assert _metrics(out)["skipped_records"] == {"image cannot be decoded": 2}


# ----------------------------------------------------------------------------------------------------
# 4. metrics.json describes the whole run, not its last segment
# ----------------------------------------------------------------------------------------------------
class StopAtStep(TrainerCallback):
    """Ends training cleanly after optimizer step `step` (a run stopped early, later resumed)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_metrics_after_a_resume_cover_every_segment(tmp_path):
    # logging every 3 steps, saves every 2: steps 1-2's losses are in no log entry, only in checkpoint-2's totals
    common = ["training.max_steps=4", "training.save_steps=2", "training.logging_steps=3"]
    assert main(_args(tmp_path / "ref", *common)) == 0
    reference = _metrics(tmp_path / "ref")

    out = tmp_path / "run"
    assert main(_args(out, *common), callbacks=[StopAtStep(2)]) == 0
    first = _metrics(out)
    assert first["steps"] == 2 and first["segments"] == 1
    assert main(_args(out, *common, "training.resume_from_checkpoint=auto")) == 0
    metrics = _metrics(out)
    assert metrics["steps"] == 4 and metrics["segments"] == 2
    # the same run as the uninterrupted reference (resume is exact), so the same whole-run numbers
    assert metrics["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    assert metrics["total_flos"] == pytest.approx(reference["total_flos"])
    assert metrics["train_runtime_s"] > first["train_runtime_s"] and metrics["wall_time_s"] > first["wall_time_s"]
    state = json.loads((out / "run_state.json").read_text())
    assert [(s["first_step"], s["last_step"]) for s in state["segments"]] == [(0, 2), (2, 4)]
    assert metrics["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in state["segments"]), abs=0.2)
