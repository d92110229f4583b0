"""best/ (eval.metric_for_best), early stopping (eval.early_stopping_patience), and both across a resume.

The selection rule is checked on hand-written score sequences; the training runs are real tiny runs
through `pg_finetune.train.main`, whose held-out loss (metric_for_best: loss, a real metric of the
real model) falls and then rises at a high constant learning rate. What the runs must do is worked
out in the test from their own log history by a plain loop, independent of `BestSoFar`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from pg_finetune.recipe import RecipeError, load_recipe, recipe_from_dict
from pg_finetune.report import _summary, load_run
from pg_finetune.tasks import get_task
from pg_finetune.train import _metric_for_best_problem, main
from pg_finetune.trainer import BestSoFar, RunEval

ROOT = Path(__file__).resolve().parents[1]
PATIENCE, SAVE_STEPS, CRASH_AT = 2, 4, 5
# lr 3e-2 constant on 8 records: the held-out loss falls for a few steps, then rises (the run overfits
# and overshoots); every step is evaluated, with one generated token (the generation path runs, cheaply).
RUN = [
    "--recipe", str(ROOT / "recipes/tiny/easyvqa_full.yaml"),
    "data.train_split=train[:8]", "data.eval_split=test[:4]", "eval.max_samples=4", "eval.batch_size=4",
    "eval.max_new_tokens=1", "eval.before_and_after=false", "training.per_device_train_batch_size=2",
    "training.max_steps=8", "training.logging_steps=1", "training.learning_rate=3e-2",
    "training.warmup_ratio=0", "training.lr_scheduler_type=constant", f"training.save_steps={SAVE_STEPS}",
    "eval.eval_steps=1", "eval.metric_for_best=loss", f"eval.early_stopping_patience={PATIENCE}",
    "logging.html_report=false",
]


# ---- the selection rule on hand sequences ------------------------------------------------------------
def _feed(best: BestSoFar, values: list[float]) -> list[bool]:
    """Update with values at steps 1, 2, ...; the should_stop flag after each."""
    stops = []
    for step, value in enumerate(values, start=1):
        best.update(step, {best.metric: value, "other": 10.0 * step})
        stops.append(best.should_stop)
    return stops


def test_higher_is_better_peak_in_the_middle_and_a_tie_keeps_the_earlier_step():
    best = BestSoFar("accuracy")
    _feed(best, [0.1, 0.5, 0.9, 0.4, 0.9, 0.2])
    assert (best.step, best.value) == (3, 0.9)
    assert best.scores == {"accuracy": 0.9, "other": 30.0}  # every score of the winning step
    assert best.evals_since_best == 3


def test_lower_is_better_and_nan_never_wins():
    best = BestSoFar("loss", lower_is_better=True)
    _feed(best, [math.nan, 3.0, 2.0, 2.5, math.nan, 1.0, 1.5])
    assert (best.step, best.value) == (6, 1.0)
    assert BestSoFar("cer", lower_is_better=False).is_better(5.0)  # the first finite value always wins
    nan_only = BestSoFar("accuracy")
    _feed(nan_only, [math.nan, math.nan])
    assert nan_only.step is None and nan_only.evals_since_best == 2


def test_patience_counts_evaluations_in_a_row_without_improvement():
    best = BestSoFar("accuracy", patience=2)
    # 0.3 at step 2; step 3 worse, step 4 equal (a tie is no improvement): stop after step 4
    assert _feed(best, [0.1, 0.3, 0.2, 0.3, 0.9]) == [False, False, False, True, False]
    assert best.step == 5  # fed on regardless: an improvement resets the count
    never = BestSoFar("accuracy", patience=None)
    assert not any(_feed(never, [0.5, 0.1, 0.1, 0.1, 0.1]))


def test_saved_and_restored_mid_sequence_continues_like_the_uninterrupted_one():
    values = [0.2, 0.6, 0.4, 0.5, 0.55]
    whole = BestSoFar("accuracy", patience=3)
    whole_stops = _feed(whole, values)
    first = BestSoFar("accuracy", patience=3)
    _feed(first, values[:3])
    restored = BestSoFar.from_json(json.loads(json.dumps(first.to_json())), patience=3)
    later = [restored.update(step, {"accuracy": v}) or restored.should_stop for step, v in enumerate(values[3:], 4)]
    assert later == whole_stops[3:] == [False, True]
    assert (restored.step, restored.value, restored.evals_since_best) == (2, 0.6, 3)


# ---- recipe checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("eval_section", "data_section", "key", "fix"),
    [
        ({"metric_for_best": "accuracy"}, {}, "eval.metric_for_best", "eval.eval_steps"),
        ({"early_stopping_patience": 2, "metric_for_best": "accuracy"}, {}, "eval.early_stopping_patience",
         "eval.eval_steps"),
        ({"eval_steps": 10, "early_stopping_patience": 2}, {}, "eval.early_stopping_patience", "eval.metric_for_best"),
        ({"eval_steps": 10, "metric_for_best": "accuracy"}, {"eval_split": None}, "eval.metric_for_best",
         "data.eval_split"),
        ({"eval_steps": 10, "metric_for_best": "eval/accuracy"}, {}, "eval.metric_for_best", "'accuracy'"),
        ({"eval_steps": 10, "metric_for_best": "loss", "loss": False}, {}, "eval.metric_for_best", "eval.loss"),
    ],
)  # fmt: skip
def test_recipe_refuses_best_and_patience_without_evaluations(eval_section, data_section, key, fix):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"eval": eval_section, "data": data_section})
    message = next(p for p in err.value.problems if p.startswith(key))
    assert fix in message


def test_recipe_accepts_best_with_eval_steps():
    recipe = recipe_from_dict({"eval": {"eval_steps": 5, "metric_for_best": "loss", "early_stopping_patience": 2}})
    assert recipe.eval.early_stopping_patience == 2


def test_metric_for_best_must_be_a_key_the_task_metric_reports(tmp_path):
    records = [
        {"prefix": "answer en is there a circle?", "suffix": "yes", "answer_type": "yes/no"},
        {"prefix": "answer en what color is it?", "suffix": "red", "answer_type": "other"},
    ]
    for metric_for_best, problem in (("exact_match", False), ("loss", False), ("accuracy", True)):
        recipe = recipe_from_dict({"eval": {"eval_steps": 5, "metric_for_best": metric_for_best}})
        run_eval = RunEval(recipe, None, get_task("vqa"), records, tmp_path, True, loss_collator=lambda rows: {})
        message = _metric_for_best_problem(recipe, run_eval)
        assert (message is not None) == problem
    # the valid keys are listed, the held-out loss among them
    assert "'accuracy'" in message and "exact_match" in message and "loss" in message
    recipe = recipe_from_dict({"eval": {"eval_steps": 5, "metric_for_best": "loss", "loss": True}})
    assert "loss" not in RunEval(recipe, None, get_task("vqa"), records, tmp_path, True).metric_keys()


def test_train_exits_2_on_an_unknown_metric_for_best_before_training(tmp_path, capsys):
    code = main([*RUN, f"training.output_dir={tmp_path / 'run'}", "eval.metric_for_best=cider"])
    assert code == 2
    err = capsys.readouterr().err
    assert "eval.metric_for_best: 'cider'" in err and "exact_match" in err and "loss" in err
    assert not (tmp_path / "run" / "checkpoint-1").exists()


# ---- real runs ---------------------------------------------------------------------------------------
def _evals(run: Path) -> list[tuple[int, float]]:
    history = json.loads((run / "log_history.json").read_text())
    return [(e["step"], e["eval/loss"]) for e in history if "eval/loss" in e]


def _expected(evals: list[tuple[int, float]], patience: int) -> tuple[int, int | None]:
    """(best step, step training stops at): the reference rule, written out plainly."""
    best_step, best_value, since = None, math.inf, 0
    for step, value in evals:
        if value < best_value:
            best_step, best_value, since = step, value, 0
        else:
            since += 1
            if since == patience:
                return best_step, step
    return best_step, None


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("best") / "run"
    assert main([*RUN, f"training.output_dir={out}"]) == 0
    return out


def test_best_is_the_argmin_of_the_logged_eval_and_training_stops_after_patience(whole_run, caplog):
    evals = _evals(whole_run)
    best_step, stop_step = _expected(evals, PATIENCE)
    values = [v for _, v in evals]
    assert stop_step is not None and stop_step < 8, evals  # stopped before max_steps
    assert 1 < best_step < stop_step  # the loss turned: the best is mid-run
    assert evals[-1][0] == stop_step  # no evaluation after the stop

    record = json.loads((whole_run / "best" / "best.json").read_text())
    assert record["step"] == best_step and record["metric"] == "loss" and record["better"] == "lower"
    assert record["value"] == pytest.approx(min(values), rel=1e-6)
    logged_then = next(e for e in json.loads((whole_run / "log_history.json").read_text())
                       if e.get("step") == best_step and "eval/loss" in e)  # fmt: skip
    assert record["scores"] == pytest.approx({k.removeprefix("eval/"): v for k, v in logged_then.items()
                                              if k.startswith("eval/")})  # fmt: skip

    # best/ holds what final/ holds, plus best.json; final/ is the last step's weights, not the best's
    best_files = {p.name for p in (whole_run / "best").iterdir()}
    assert best_files == {p.name for p in (whole_run / "final").iterdir()} - {"README.md"} | {"best.json"}
    assert not any(p.name.startswith("tmp-") for p in whole_run.iterdir())
    metrics = json.loads((whole_run / "metrics.json").read_text())
    assert metrics["steps"] == stop_step and metrics["early_stopped_at"] == stop_step
    assert metrics["best"]["step"] == best_step
    final, best = _weights(whole_run / "final"), _weights(whole_run / "best")
    assert any(not torch.equal(final[k], best[k]) for k in final)
    # the stop saved a checkpoint though stop_step is not a multiple of save_steps
    assert stop_step % SAVE_STEPS != 0 and (whole_run / f"checkpoint-{stop_step}").is_dir()
    summary = _summary(load_run(whole_run))
    assert f"step {best_step}, loss={record['value']:.4f}" in summary and f"at step {stop_step}" in summary


def test_rerun_of_an_early_stopped_run_does_nothing(whole_run, capsys):
    before = (whole_run / "best" / "best.json").stat().st_mtime_ns
    assert main([*RUN, f"training.output_dir={whole_run}", "training.resume_from_checkpoint=auto"]) == 0
    assert "nothing to do (stopped early" in capsys.readouterr().out
    assert (whole_run / "best" / "best.json").stat().st_mtime_ns == before


class _Crash(RuntimeError):
    pass


class CrashAtStep(TrainerCallback):
    """Raise at the end of `step` (after that step's evaluation, before its save): the run dies there,
    leaving on disk what a kill would (the last checkpoint, best/)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Crash(f"crash at step {self.step}")


def test_resume_keeps_the_best_so_far_and_a_worse_later_score_does_not_replace_it(whole_run, tmp_path):
    best_step, stop_step = _expected(_evals(whole_run), PATIENCE)
    assert best_step < SAVE_STEPS < CRASH_AT <= stop_step  # the best is in checkpoint-4, the crash after it
    out = tmp_path / "run"
    with pytest.raises(_Crash):
        main([*RUN, f"training.output_dir={out}"], callbacks=[CrashAtStep(CRASH_AT)])
    saved = json.loads((out / f"checkpoint-{SAVE_STEPS}" / "best_so_far.json").read_text())
    assert saved["step"] == best_step and saved["evals_since_best"] == SAVE_STEPS - best_step
    written = (out / "best" / "best.json").stat().st_mtime_ns

    assert main([*RUN, f"training.output_dir={out}", "training.resume_from_checkpoint=auto"]) == 0
    # the resumed run compared steps 5.. with step best_step's value: nothing better, best/ untouched
    assert (out / "best" / "best.json").stat().st_mtime_ns == written
    ours, theirs = (json.loads((run / "best" / "best.json").read_text()) for run in (out, whole_run))
    assert (ours["step"], ours["metric"]) == (theirs["step"], theirs["metric"]) == (best_step, "loss")
    assert ours["value"] == pytest.approx(theirs["value"], rel=1e-5)
    # and it stopped where the uninterrupted run stopped: the count of evaluations without improvement survived
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["early_stopped_at"] == stop_step and metrics["best"]["step"] == best_step
    ours, theirs = _weights(out / "best"), _weights(whole_run / "best")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
    assert load_recipe(out / "best" / "recipe.yaml").eval.metric_for_best == "loss"
