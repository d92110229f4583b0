"""Exact resume after SIGKILL, atomic checkpoints, checkpoint rotation.

The reference is an uninterrupted run; the interrupted run is a real subprocess that SIGKILLs
itself at the end of a step between two saves (`tests/hooks.py --kill-at-step`), then resumes with
`training.resume_from_checkpoint=auto`. Every collated batch is traced (`hooks.TracingCollator`)
so the test compares the exact sequence of records each step consumed, not only the end result.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from pg_finetune.run_dir import last_complete_checkpoint
from pg_finetune.train import main
from tests.hooks import TracingCollator

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5

# 6 records, batch 2: 3 steps per epoch. Saves at 2 and 4; the kill at step 3 lands between them,
# so resume starts mid-epoch 0 (skipping 1 batch) and crosses into epochs 1 and 2.
# warmup 0.2 + cosine: the learning rate changes every step, so a schedule off by one shows.
COMMON = [
    "data.max_train_samples=6", "data.eval_split=null", "eval.before_and_after=false",
    "training.per_device_train_batch_size=2", "training.max_steps=7", "training.save_steps=2",
    "training.logging_steps=1", "training.save_total_limit=null", "training.warmup_ratio=0.2",
]
CHECKPOINT_BEFORE_KILL, KILL_AT = 2, 3
CONFIGS = {
    "full": ["--recipe", str(ROOT / "recipes/tiny/easyvqa_full.yaml")],
    # LoRA dropout draws from the torch RNG: only a restored rng_state.pth gives the same masks
    "lora": ["--recipe", str(ROOT / "recipes/tiny/easyvqa_lora.yaml"), "tuning.lora_dropout=0.3"],
    # DetectionAugment: absent classes in the prompt, re-drawn per (seed, epoch, index)
    "detect": ["--recipe", str(ROOT / "recipes/tiny/easyvqa_detect.yaml"), "task.negatives=2"],
    # length-grouped batches: the sampler's order comes from seed + epoch, not from the global RNG
    "grouped": ["--recipe", str(ROOT / "recipes/tiny/easyvqa_full.yaml"), "training.group_by_length=true"],
}


def _args(config: str, out: Path, *extra: str) -> list[str]:
    return [*CONFIGS[config], *COMMON, f"training.output_dir={out}", *extra]


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(final / name)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _losses(run: Path) -> dict[int, float]:
    history = json.loads((run / "log_history.json").read_text())
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def _run_in_process(trace: Path, args: list[str]) -> int:
    return main(args, wrap_collator=lambda collator: TracingCollator(collator, str(trace)))


def _check_exact_resume(tmp_path: Path, monkeypatch, config: str) -> None:
    # uninterrupted reference
    ref = tmp_path / "ref"
    assert _run_in_process(tmp_path / "ref.jsonl", _args(config, ref)) == 0

    # interrupted: a real process, really SIGKILLed after step 3 (checkpoint-2 saved, checkpoint-4 not yet)
    run = tmp_path / "run"
    hooks = ["--kill-at-step", str(KILL_AT), "--trace-batches", str(tmp_path / "killed.jsonl")]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "hooks.py"), *hooks, "--", *_args(config, run)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # died by SIGKILL, not a clean exit
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{CHECKPOINT_BEFORE_KILL}"]
    assert not (run / "final").exists()

    # resume
    resumed_trace = tmp_path / "resumed.jsonl"
    assert _run_in_process(resumed_trace, _args(config, run, "training.resume_from_checkpoint=auto")) == 0

    # the exact sequence of records (and, for detect, of augmented prompts) each step consumed
    reference, killed, resumed = _trace(tmp_path / "ref.jsonl"), _trace(tmp_path / "killed.jsonl"), _trace(resumed_trace)
    assert len(killed) >= KILL_AT  # at least the batches of steps 1-3 were collated before the kill
    assert killed[:CHECKPOINT_BEFORE_KILL] + resumed == reference
    if config == "detect":  # the augmentation really differs between epochs, so epoch seeding is tested
        epoch0, epoch1 = {b["ids"][0]: b["texts"][0] for b in reference[:3]}, {b["ids"][0]: b["texts"][0] for b in reference[3:6]}
        assert any(epoch0[k] != epoch1[k] for k in epoch0.keys() & epoch1.keys()) or epoch0.keys() != epoch1.keys()

    # same losses at every step (steps 1-2 come from the checkpoint's log history), same lr, same weights
    ref_losses, run_losses = _losses(ref), _losses(run)
    assert sorted(run_losses) == list(range(1, 8))
    for step in ref_losses:
        assert abs(ref_losses[step] - run_losses[step]) <= TOLERANCE, (step, ref_losses[step], run_losses[step])
    assert _max_diff(_weights(ref), _weights(run)) <= TOLERANCE
    ref_lr = [e["learning_rate"] for e in json.loads((ref / "log_history.json").read_text()) if "learning_rate" in e]
    run_lr = [e["learning_rate"] for e in json.loads((run / "log_history.json").read_text()) if "learning_rate" in e]
    assert ref_lr == run_lr and len(set(ref_lr)) >= 5
    # metrics.json describes the whole run (both segments), so it matches the uninterrupted one
    ref_metrics, run_metrics = (json.loads((p / "metrics.json").read_text()) for p in (ref, run))
    assert run_metrics["steps"] == 7 and run_metrics["segments"] == 2
    assert abs(run_metrics["train_loss"] - ref_metrics["train_loss"]) <= TOLERANCE
    assert run_metrics["total_flos"] == ref_metrics["total_flos"]

    # the checks above are sharp: a resume that skips one batch too many fails both of them
    import transformers.trainer as trainer_module

    original = trainer_module.skip_first_batches
    monkeypatch.setattr(trainer_module, "skip_first_batches", lambda loader, n: original(loader, n + 1))
    for path in run.iterdir():  # back to the state right after the kill
        if path.name != f"checkpoint-{CHECKPOINT_BEFORE_KILL}":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    skipped_trace = tmp_path / "skipped.jsonl"
    assert _run_in_process(skipped_trace, _args(config, run, "training.resume_from_checkpoint=auto")) == 0
    assert killed[:CHECKPOINT_BEFORE_KILL] + _trace(skipped_trace) != reference
    assert _max_diff(_weights(ref), _weights(run)) > 100 * TOLERANCE


@pytest.mark.parametrize("config", ["full", "grouped"])
def test_resume_after_sigkill_is_exact_full(tmp_path, monkeypatch, config):
    _check_exact_resume(tmp_path, monkeypatch, config)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["lora", "detect"])
def test_resume_after_sigkill_is_exact_lora_and_detect_augment(tmp_path, monkeypatch, config):
    _check_exact_resume(tmp_path, monkeypatch, config)


# ----------------------------------------------------------------------------------------------------
# atomic checkpoints and rotation (in process: fast)
# ----------------------------------------------------------------------------------------------------
SMALL = [
    "--recipe", str(ROOT / "recipes/tiny/easyvqa_full.yaml"), "data.max_train_samples=8",
    "data.eval_split=null", "eval.before_and_after=false", "training.per_device_train_batch_size=2",
    "training.logging_steps=1",
]


def test_crash_during_a_save_leaves_no_checkpoint_that_resume_would_pick(tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = Trainer._save_rng_state

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:  # model, optimizer and scheduler are written; the rest never comes
            raise OSError("disk full (simulated)")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", crash_at_step_4)
    args = [*SMALL, f"training.output_dir={out}", "training.max_steps=5", "training.save_steps=2"]
    with pytest.raises(OSError, match="disk full"):
        main(args)
    assert (out / "tmp-checkpoint-4" / "checkpoint-4" / "model.safetensors").is_file()  # the partial save
    assert not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-2" / "recipe.yaml").is_file()  # the recipe is inside the atomic rename
    assert get_last_checkpoint(str(out)).endswith("checkpoint-2")  # transformers' own pick agrees
    assert last_complete_checkpoint(out).endswith("checkpoint-2")

    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    assert main([*args, "training.resume_from_checkpoint=auto"]) == 0
    assert not list(out.glob("tmp-*"))  # the stale partial save was cleaned up
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and (out / "checkpoint-4" / "rng_state.pth").is_file()
    assert [e["step"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e] == [1, 2, 3, 4, 5]

    # a stale staging dir is removed at start even when the run trains nothing more (checkpoint-5 is the
    # last step: final/ is written from it, and no step 6 is trained)
    (out / "tmp-checkpoint-9" / "checkpoint-9").mkdir(parents=True)
    shutil.rmtree(out / "final")
    assert main([*args, "training.resume_from_checkpoint=auto"]) == 0
    assert not list(out.glob("tmp-*")) and (out / "final" / "model.safetensors").is_file()
    assert not (out / "checkpoint-6").exists()


def test_save_total_limit_keeps_the_newest_complete_checkpoints(tmp_path):
    out = tmp_path / "run"
    args = [*SMALL, f"training.output_dir={out}", "training.max_steps=5", "training.save_steps=1",
            "training.save_total_limit=2"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-5"]
    for name in ("checkpoint-4", "checkpoint-5"):
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                "recipe.yaml"} <= {p.name for p in (out / name).iterdir()}
    history = json.loads((out / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5]


def test_resume_from_a_partial_checkpoint_path_is_refused(tmp_path, capsys):
    partial = tmp_path / "run" / "checkpoint-3"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"")
    args = [*SMALL, f"training.output_dir={tmp_path / 'run'}", "training.max_steps=1",
            f"training.resume_from_checkpoint={partial}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "training.resume_from_checkpoint" in err and "checkpoint-3" in err and "trainer_state.json" in err
    # `auto` skips it (no trainer_state.json) and starts fresh instead of crashing on it
    assert last_complete_checkpoint(tmp_path / "run") is None
