"""A one-page report of a finished run: settings, curves, metrics, and base vs fine-tuned outputs.

    python -m pg_finetune.report runs/tiny_easyvqa_full
    python -m pg_finetune.report runs/tiny_easyvqa_detect --sample 20 --seed 1

Reads what a training run leaves in its output dir (`recipe.yaml`, `metrics.json`,
`predictions_before.jsonl` / `predictions_after.jsonl`, `log_history.json` or the latest
`checkpoint-N/trainer_state.json`) and writes beside them:

- `curves.png`: training loss with the held-out loss (`eval/loss`) beside it, and every generation
  metric the run logged as `eval/...`, against optimiser steps; before / after values are marked at
  step 0 and the last step, and the best evaluation (eval.metric_for_best) on its metric's panel;
- `report.html` (+ `report_files/` with the example images): the recipe summary, the metrics
  table, the curves, and a seeded sample of held-out examples showing the base model's and the
  fine-tuned model's outputs side by side with per-example scores.

Everything task-specific comes from the task (`pg_finetune.tasks`): per-example scores
(`task.metric.scores_each`, named `example_label`), how a reference reads (`describe_reference`),
the boxes of tasks whose scores draw some (`Scored.drawn`: true boxes green, predicted red, by
`pg_finetune.draw`), and confusion matrices for tasks that define `confusion` (counting).
The page is `templates/report.html`, filled with `string.Template`.

Prediction rows carry no image, so the eval records are loaded again from the saved recipe the
way train.py loads them (`pg_finetune.recipe_data.eval_dataset`) and matched to the rows by id,
prompt and references; a row that matches no record is shown without an image, and the page says so.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import random
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from PIL import Image

from pg_finetune.data import RecordDataset
from pg_finetune.draw import PREDICTED_COLOUR, TRUTH_COLOUR, draw_masks, resize_for_display
from pg_finetune.jsonl import jsonl_objects
from pg_finetune.recipe import Recipe, RecipeError, load_recipe, recipe_to_dict
from pg_finetune.recipe_data import eval_dataset
from pg_finetune.tasks import Scored, ScoreOptions, Task, get_task

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
CURVES_NAME = "curves.png"
FILES_DIR = "report_files"
# Examples are shown at about this size: small images enlarged by a whole factor (pixels stay crisp),
# large ones shrunk.
THUMBNAIL_SIDE = 256
MAX_METRIC_PANELS = 8
MAX_PROBLEMS_SHOWN = 5  # per output: a garbled one can have dozens
EVAL_LOSS = "eval/loss"  # the held-out loss's key in the log history (trainer.RunEval.loss)


# ----------------------------------------------------------------------------------------------------
# What the run left on disk
# ----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    run_dir: Path
    recipe: Recipe
    metrics: dict | None
    before: list[dict] | None
    after: list[dict] | None
    log_history: list[dict]
    notes: list[str] = field(default_factory=list)  # what is missing, shown at the top of the page


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, row, problem in jsonl_objects(path):
        if row is None:
            raise ValueError(f"{path}:{number}: {problem}; regenerate the predictions")
        rows.append(row)
    return rows


def read_log_history(run_dir: Path) -> tuple[list[dict], str | None]:
    """Trainer log entries: `log_history.json` when the run wrote one, else the latest checkpoint's."""
    path = run_dir / "log_history.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        return (data["log_history"] if isinstance(data, dict) else data), str(path)
    checkpoints = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for checkpoint in sorted(checkpoints, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        state = checkpoint / "trainer_state.json"
        if state.is_file():
            return json.loads(state.read_text(encoding="utf-8")).get("log_history", []), str(state)
    return [], None


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise FileNotFoundError(
            f"{recipe_path} not found: pass the training.output_dir of a run (it holds recipe.yaml, "
            "metrics.json and the predictions)"
        )
    recipe = load_recipe(recipe_path)
    notes = []
    metrics = None
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    else:
        notes.append("metrics.json is missing: the run did not finish (or is still running).")
    predictions = {}
    for which in ("before", "after"):
        path = run_dir / f"predictions_{which}.jsonl"
        predictions[which] = _read_jsonl(path) if path.is_file() else None
        if predictions[which] is None:
            notes.append(
                f"{path.name} is missing (eval.before_and_after off, no eval split, or unfinished run)."
            )
    log_history, log_source = read_log_history(run_dir)
    if log_source is None:
        notes.append("no log_history.json and no checkpoint trainer_state.json: no training curves.")
    return Run(run_dir, recipe, metrics, predictions["before"], predictions["after"], log_history, notes)


# ----------------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------------
def training_series(log_history: Sequence[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"loss": [(step, value), ...], "eval/loss": [...], "eval/<metric>": [...]} from Trainer logs.

    `eval/loss` is the held-out teacher-forced loss (trainer.RunEval.loss), the other `eval/...` the
    generation metrics. A stock `eval_loss` entry could only come from elsewhere and is not plotted.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            wanted = key == "loss" or key.startswith("eval/")
            if wanted and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((int(step), float(value)))
    return series


def _metric_keys(series: dict, metrics: dict | None) -> list[str]:
    """Metric names to plot: the after-training ones first (headline first), then any other logged.
    The held-out loss is not one: it is drawn on the loss panel."""
    keys = list((metrics or {}).get("after") or {})
    keys += [
        k.removeprefix("eval/")
        for k in series
        if k.startswith("eval/") and k != EVAL_LOSS and k.removeprefix("eval/") not in keys
    ]
    logged = {k.removeprefix("eval/") for k in series if k.startswith("eval/") and k != EVAL_LOSS}
    # without step-wise metrics, plot only the headline metric's before -> after
    return keys[:MAX_METRIC_PANELS] if logged else keys[:1]


def plot_curves(run: Run, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = training_series(run.log_history)
    task = run.recipe.task.name
    metric_keys = _metric_keys(series, run.metrics)
    panels = 1 + len(metric_keys)
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    flat = list(axes.flat)

    ax = flat[0]
    m = run.metrics or {}
    if series.get("loss") or series.get(EVAL_LOSS):
        losses: list[float] = []
        if series.get("loss"):
            steps, train = zip(*series["loss"], strict=True)
            ax.plot(steps, train, "-", label="train loss")
            losses += train
        # the same loss (suffix tokens) on the eval records, teacher-forced: where it turns up, overfitting begins
        held_out = [*([(0, m["eval_loss_before"])] if m.get("eval_loss_before") is not None else []),
                    *series.get(EVAL_LOSS, [])]  # fmt: skip
        if held_out:
            steps, values = zip(*held_out, strict=True)
            ax.plot(steps, values, "o-", color="C3", markersize=3, label="held-out loss")
            losses += values
        if min(losses) > 0 and max(losses) / min(losses) > 4:  # log scale shows both ends of a long fall
            ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(
            0.5, 0.5, "no loss logged\n(training.logging_steps > steps?)",
            ha="center", va="center", transform=ax.transAxes,
        )  # fmt: skip
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (suffix tokens)")
    ax.grid(alpha=0.3)

    last_step = (run.metrics or {}).get("steps") or max((s for v in series.values() for s, _ in v), default=0)
    best = m.get("best") or {}
    if best.get("metric") == "loss" and best.get("step") is not None:
        flat[0].plot([best["step"]], [best["value"]], "*", color="C3", markersize=12, label="best (best/)")
        flat[0].legend()
    for ax, key in zip(flat[1:], metric_keys, strict=False):
        logged = series.get(f"eval/{key}", [])
        if logged:
            steps, values = zip(*logged, strict=True)
            ax.plot(steps, values, "o-", color="C0", markersize=3, label="during training")
        if best.get("metric") == key and best.get("step") is not None:
            ax.plot([best["step"]], [best["value"]], "*", color="C3", markersize=12, label="best (best/)")
        for which, step, marker, color in (("before", 0, "s", "C1"), ("after", last_step, "D", "C2")):
            value = ((run.metrics or {}).get(which) or {}).get(key)
            if value is not None:
                ax.plot([step], [value], marker, color=color, markersize=7, label=which)
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if ys and all(0.0 <= y <= 1.0 for y in ys):  # rates and accuracies: show the whole 0..1 range
            ax.set_ylim(-0.04, 1.04)
        ax.set_title(f"{task}/{key}")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle(run.recipe.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Per-example scores, notes and boxes: the task's own metric
# ----------------------------------------------------------------------------------------------------
def example_scores(task: Task, rows: Sequence[dict]) -> list[float]:
    """Each row's score by the task's metric (`scores_each`: its mean is the headline metric)."""
    predictions = [r["prediction"] for r in rows]
    return task.metric.scores_each(predictions, [r["references"] for r in rows], ScoreOptions())


def score_row(task: Task, row: dict) -> Scored | None:
    """One row scored alone (its notes in `problems[0]`, its boxes in `drawn[0]`); None if it cannot be."""
    try:
        return task.metric.score([row["prediction"]], [row["references"]], ScoreOptions())
    except (KeyError, TypeError, ValueError, IndexError):  # a row written by an older pg-finetune
        return None


def _confusion_html(title: str, matrix: tuple[list[str], list[str], Counter]) -> str:
    truths, predicted, cells = matrix
    head = "".join(f"<th>{_e(p)}</th>" for p in predicted)
    body = []
    for t in truths:
        tds = []
        for p in predicted:
            count = cells.get((t, p), 0)
            kind = "hit" if t == p and count else ("miss" if count else "zero")
            tds.append(f'<td class="{kind}" data-true="{_e(t)}" data-pred="{_e(p)}">{count}</td>')
        body.append(f"<tr><th>{_e(t)}</th>{''.join(tds)}</tr>")
    return (
        f'<table class="confusion" data-which="{_e(title)}">'
        f"<caption>{_e(title)}: rows true, columns predicted</caption>"
        f"<tr><th>true \\ pred</th>{head}</tr>{''.join(body)}</table>"
    )


# ----------------------------------------------------------------------------------------------------
# Matching prediction rows to eval records
# ----------------------------------------------------------------------------------------------------
def _as_json(value: Any) -> Any:
    """`value` as it reads back from a JSONL file (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def match_rows(rows: Sequence[dict], dataset: RecordDataset, task: Task) -> list[int | None]:
    """Index into `dataset` of each prediction row, or None where no record has its id, prompt and references.

    Ids are matched in order (the k-th row with an id goes to the k-th record with it), so duplicate
    ids still pair up as train.py wrote them; the prompt and references must then agree too, or the
    image would belong to another example. References are compared as JSON reads them back.
    """
    by_id: dict[str, list[int]] = {}
    for index in range(len(dataset)):
        by_id.setdefault(str(dataset.rows_meta(index).get("id")), []).append(index)
    taken: Counter = Counter()
    matched: list[int | None] = []
    for row in rows:
        candidates = by_id.get(str(row.get("id")), [])
        k = taken[str(row.get("id"))]
        taken[str(row.get("id"))] += 1
        index = candidates[k] if k < len(candidates) else None
        if index is not None:
            meta = dataset.rows_meta(index)
            try:
                same = _as_json(task.reference(meta)) == row.get("references")
            except (KeyError, TypeError, ValueError):  # a record the metric cannot score was not written
                same = False
            if meta.get("prefix") != row.get("prefix") or not same:
                index = None
        matched.append(index)
    return matched


# ----------------------------------------------------------------------------------------------------
# The page: templates/report.html, filled with escaped HTML fragments
# ----------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))


def _rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({}, {}, {})".format(*colour)


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else _e(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs if v not in (None, ""))
    return f'<table class="summary">{rows}</table>'


def _summary(run: Run) -> str:
    r, m = run.recipe, run.metrics or {}
    t, tu, d = r.training, r.tuning, r.data
    method = tu.method
    if tu.method_spec.is_adapter:
        method += f" (r={tu.lora_r}, alpha={tu.lora_alpha}, dropout={tu.lora_dropout})"
    extra = [
        name
        for name, on in (("vision tower", tu.train_vision_tower), ("projector", tu.train_projector))
        if on
    ]
    if extra:
        method += "; also trains the " + " and ".join(extra)
    throughput = m.get("train_samples_per_second")
    pairs = [
        ("model", f"{r.model.name_or_path} ({r.model.dtype}, {r.model.attn_implementation} attention)"),
        ("task", r.task.name + (f" (prefix {r.task.prefix!r})" if r.task.prefix else "")),
        ("method", method),
        (
            "train data",
            f"{d.train} split {d.train_split}"
            + (f", at most {d.max_train_samples} records" if d.max_train_samples else ""),
        ),
        (
            "eval data",
            f"{d.eval or d.train} split {d.eval_split}, at most "
            f"{r.eval.max_samples or 'all'} records"
            if d.eval_split
            else "none",
        ),
        ("max text tokens", d.max_length),
        ("schedule", f"{t.num_train_epochs:g} epochs" if t.max_steps < 0 else f"max_steps {t.max_steps}"),
        (
            "batch",
            f"{t.per_device_train_batch_size} per device x {t.gradient_accumulation_steps} accumulation",
        ),
        (
            "optimizer",
            f"{t.optim}, lr {t.learning_rate:g} ({t.lr_scheduler_type}, warmup {t.warmup_ratio:g}), "
            f"weight decay {t.weight_decay:g}, grad clip {t.max_grad_norm:g}",
        ),
        ("precision", "bf16" if t.bf16 else "fp16" if t.fp16 else "float32"),
        ("seed", t.seed),
        ("trainable parameters", m.get("parameters")),
        ("steps", m.get("steps")),
        ("final train loss", _number(m.get("train_loss"))),
        ("wall time", f"{m['wall_time_s']:.1f} s" if m.get("wall_time_s") is not None else None),
        ("throughput", f"{throughput:.1f} samples/s" if isinstance(throughput, (int, float)) else None),
        ("held-out loss", _held_out_loss(m)),
        ("stopped early", f"at step {m['early_stopped_at']} (eval.early_stopping_patience)" if m.get("early_stopped_at") else None),
        ("best", _best_line(m.get("best"))),
        ("checkpoint", m.get("final_dir")),
    ]
    recipe_yaml = _e(_yaml(recipe_to_dict(r)))
    return f"{_kv_table(pairs)}<details><summary>resolved recipe</summary><pre>{recipe_yaml}</pre></details>"


def _held_out_loss(m: dict) -> str | None:
    before, after = m.get("eval_loss_before"), m.get("eval_loss_after")
    if before is None or after is None:
        return None
    return f"{_number(before)} before, {_number(after)} after (teacher-forced, eval records' suffix tokens)"


def _best_line(best: dict | None) -> str | None:
    """"best: step N, metric=value" (metrics.json `best`, eval.metric_for_best)."""
    if not best or best.get("step") is None:
        return None
    return f"step {best['step']}, {best['metric']}={_number(best['value'])} ({best.get('dir') or 'best/'})"


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _metrics_table(run: Run) -> str:
    m = run.metrics or {}
    before, after = m.get("before") or {}, m.get("after") or {}
    if not after and not before:
        return "<p>No before / after metrics (eval.before_and_after off or no eval split).</p>"
    keys = list(after) + [k for k in before if k not in after]
    lower_is_better = set(get_task(run.recipe.task.name).metric.lower_is_better)  # the rest: higher is better
    rows = []
    for key in keys:
        b, a = before.get(key), after.get(key)
        change = "<td></td>"
        if isinstance(b, (int, float)) and isinstance(a, (int, float)):
            sign = -1 if key in lower_is_better else 1
            kind = "better" if sign * (a - b) > 0 else "worse" if sign * (a - b) < 0 else "same"
            change = f'<td class="num {kind}">{a - b:+.4f}</td>'
        rows.append(
            f'<tr><th>{_e(run.recipe.task.name)}/{_e(key)}</th><td class="num">{_number(b)}</td>'
            f'<td class="num">{_number(a)}</td>{change}</tr>'
        )
    lower = [k for k in keys if k in lower_is_better]
    hint = (
        f'<p class="raw">{_e(", ".join(lower))}: lower is better; every other metric: higher is better.</p>'
        if lower
        else ""
    )
    header = "<tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>"
    return f'<table class="metrics">{header}{"".join(rows)}</table>{hint}'


def _text_block(text: str, css: str) -> str:
    if not text.strip():
        return f'<span class="{css} empty">(empty)</span>'
    return f'<span class="{css}">{_e(text)}</span>'


def _references_html(task: Task, reference: Any) -> str:
    try:
        text = task.describe_reference(reference)
    except (KeyError, TypeError, ValueError, IndexError):  # a row written by an older pg-finetune
        text = json.dumps(reference)
    return _text_block(text, "reference")


def _output_cell(
    which: str, row: dict | None, score: float | None, task: Task, scored: Scored | None, src: str | None
) -> str:
    """One model's output for one example: its image (when drawn), text, parse notes and score."""
    if row is None:
        return f'<td class="{which}"><span class="empty">no prediction</span></td>'
    parts = []
    if src:
        parts.append(f'<img class="example" src="{_e(src)}" alt="{_e(which)}">')
    parts.append(_text_block(row["prediction"], "prediction"))
    if row.get("raw") is not None and row["raw"].strip() != row["prediction"]:
        parts.append(f'<div class="raw">raw: {_e(repr(row["raw"]))}</div>')
    if scored is not None:
        if 0 in scored.drawn:
            found = len(scored.drawn[0].predicted)
            parts.append(f'<div class="raw">{found} box{"es" if found != 1 else ""}</div>')
        problems = scored.problems.get(0, [])
        parts += [f'<div class="raw">{_e(p)}</div>' for p in problems[:MAX_PROBLEMS_SHOWN]]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            parts.append(f'<div class="raw">... and {len(problems) - MAX_PROBLEMS_SHOWN} more</div>')
    if score is not None:
        if task.metric.binary:
            verdict = "correct" if score >= 1.0 else "wrong"
            parts.append(f'<div class="score {verdict}">{verdict}</div>')
        else:
            parts.append(f'<div class="score">{_e(task.metric.example_label)} {score:.3f}</div>')
    return f'<td class="{which}">{"".join(parts)}</td>'


def _example_images(
    k: int, image: Image.Image, scored: dict[str, Scored | None], files_dir: Path
) -> tuple[str, dict[str, str]]:
    """Write example k's images; return (image cell html, {"before" / "after": src of that output's image}).

    When the task's score draws boxes: the image with the true boxes, and one per model with its
    predicted boxes too; otherwise the image alone. Segmentation entries carry masks, blended in
    (`draw.draw_masks`, which draws plain boxes as `draw_boxes` does).
    """
    size = dict(min_side=THUMBNAIL_SIDE, max_side=THUMBNAIL_SIDE, whole=True)
    drawn = {which: s.drawn[0] for which, s in scored.items() if s is not None and 0 in s.drawn}
    if drawn:
        name = f"{k:03d}_truth.png"
        draw_masks(image, next(iter(drawn.values())).truth, **size).save(files_dir / name)
    else:
        name = f"{k:03d}_image.png"
        resize_for_display(image, **size).save(files_dir / name)
    sources = {}
    for which, boxes in drawn.items():
        draw_masks(image, boxes.truth, boxes.predicted, **size).save(files_dir / f"{k:03d}_{which}.png")
        sources[which] = f"{FILES_DIR}/{k:03d}_{which}.png"
    return f'<img class="example" src="{FILES_DIR}/{name}" alt="example {k}">', sources


def _examples(run: Run, files_dir: Path, sample_size: int, seed: int) -> str:
    task = get_task(run.recipe.task.name)
    base = run.before if run.before is not None else run.after
    if not base:
        return "<p>No prediction files: nothing to compare.</p>"
    notes = []
    before = run.before or [None] * len(base)
    after = run.after or [None] * len(base)
    if run.before is not None and run.after is not None:
        same = len(run.before) == len(run.after) and all(
            b.get("id") == a.get("id") and b.get("prefix") == a.get("prefix")
            for b, a in zip(run.before, run.after, strict=True)
        )
        if not same:
            notes.append(
                "predictions_before.jsonl and predictions_after.jsonl do not list the same examples in the "
                "same order; rows are paired by position."
            )
        n = min(len(run.before), len(run.after))
        before, after, base = before[:n], after[:n], base[:n]
    scores: dict[str, list[float] | None] = {"before": None, "after": None}
    for which, rows in (("before", run.before), ("after", run.after)):
        if rows is None:
            continue
        try:
            scores[which] = example_scores(task, rows)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            notes.append(
                f"predictions_{which}.jsonl cannot be scored by the {task.name} task's metric "
                f"({type(err).__name__}: {err}); it may come from an older pg-finetune: train again to rewrite it."
            )
    picked = sorted(random.Random(seed).sample(range(len(base)), min(sample_size, len(base))))

    # images: reload the eval records the run scored and match them to the rows
    matched: list[int | None] = [None] * len(base)
    dataset = None
    try:
        dataset = eval_dataset(run.recipe)
    except Exception as err:  # data moved, offline hub, ...: the table still shows the text
        notes.append(
            f"the eval records could not be loaded again, so no images are shown: {type(err).__name__}: {err}"
        )
    if dataset is not None:
        matched = match_rows(base, dataset, task)
        unmatched = sum(matched[i] is None for i in picked)
        if unmatched:
            notes.append(
                f"{unmatched} of {len(picked)} sampled prediction rows match no eval record of the saved "
                "recipe (by id, prompt and references): their images are not shown rather than guessed."
            )
    elif not notes:
        notes.append("the saved recipe has no eval split: no images to show.")

    drew_boxes = False
    trs = []
    for k, i in enumerate(picked):
        rows = {"before": before[i], "after": after[i]}
        scored = {which: score_row(task, row) for which, row in rows.items() if row is not None}
        record = dataset[matched[i]] if dataset is not None and matched[i] is not None else None
        image_cell, sources = '<span class="empty">no image</span>', {}
        if record is not None:
            image_cell, sources = _example_images(k, record["image"], scored, files_dir)
            drew_boxes = drew_boxes or bool(sources)
        cells = ""
        for which, row in rows.items():
            score = scores[which][i] if scores[which] is not None else None
            cells += _output_cell(which, row, score, task, scored.get(which), sources.get(which))
        trs.append(
            f'<tr data-id="{_e(base[i].get("id"))}"><td class="num">{i}</td><td>{image_cell}'
            f'<div class="raw">{_e(base[i].get("id"))}</div></td>'
            f"<td>{_text_block(base[i]['prefix'], 'prompt')}</td>"
            f"<td>{_references_html(task, base[i].get('references'))}</td>{cells}</tr>"
        )
    legend = (
        '<p>Boxes: <span class="legend-truth">green = ground truth</span>, '
        '<span class="legend-pred">red = the model\'s prediction</span>.</p>'
        if drew_boxes
        else ""
    )
    note_html = "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    label = _e(task.metric.example_label)
    header = (
        "<tr><th>#</th><th>image</th><th>prompt</th><th>reference(s)</th>"
        f"<th>base model ({label})</th><th>fine-tuned ({label})</th></tr>"
    )
    return (
        f"<p>{len(picked)} of {len(base)} held-out examples, sampled with seed {seed} (the same rows for "
        f"both models).</p>{note_html}{legend}"
        f'<table class="examples">{header}{"".join(trs)}</table>'
    )


def _confusions(run: Run, task: Task) -> str:
    """The confusion-matrix section (before, after) of a task that defines `confusion`; "" otherwise."""
    if task.confusion is None:
        return ""
    tables = [
        _confusion_html(which, task.confusion(rows))
        for which, rows in (("before", run.before), ("after", run.after))
        if rows
    ]
    if not tables:
        return ""
    return (
        '<section id="confusion">\n<h2>Confusion matrices</h2>\n'
        f'<div class="confusions">{"".join(tables)}</div>\n</section>'
    )


def _page(**fragments: str) -> str:
    """templates/report.html with its `$name` fields filled (a field left unfilled is a KeyError)."""
    text = (resources.files("pg_finetune") / "templates" / "report.html").read_text(encoding="utf-8")
    return Template(text).substitute(fragments)


def write_report(run_dir: str | Path, *, sample_size: int = 12, seed: int = 0) -> Path:
    """Write curves.png, report.html and report_files/ into `run_dir`; return the report's path."""
    run = load_run(run_dir)
    task = get_task(run.recipe.task.name)
    out = run.run_dir
    files_dir = out / FILES_DIR
    if files_dir.is_dir():  # ours: drop images of an earlier report (another sample may be smaller)
        shutil.rmtree(files_dir)
    files_dir.mkdir(parents=True)
    plot_curves(run, out / CURVES_NAME)
    confusions = _confusions(run, task)
    page = _page(
        title=_e(run.recipe.name),
        description=_e(run.recipe.description),
        notes="".join(f'<p class="note">{_e(n)}</p>' for n in run.notes),
        truth_colour=_rgb(TRUTH_COLOUR),
        predicted_colour=_rgb(PREDICTED_COLOUR),
        confusion_link='<li><a href="#confusion">Confusion matrices</a></li>' if confusions else "",
        summary=_summary(run),
        metrics=_metrics_table(run),
        curves=CURVES_NAME,
        confusions=confusions,
        examples=_examples(run, files_dir, sample_size, seed),
        run_dir=_e(out.resolve()),
    )
    path = out / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pg_finetune.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dir", help="a run's training.output_dir (holds recipe.yaml, metrics.json, predictions)"
    )
    parser.add_argument("--sample", type=int, default=12, help="held-out examples to show (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example sample (default 0)")
    args = parser.parse_args(argv)
    if args.sample < 1:
        parser.error(f"--sample must be >= 1, got {args.sample}")
    try:
        path = write_report(args.run_dir, sample_size=args.sample, seed=args.seed)
    except (FileNotFoundError, RecipeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
