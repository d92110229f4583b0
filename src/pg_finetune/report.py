"""A one-page report of a finished run: settings, curves, metrics, and base vs fine-tuned outputs.

    python -m pg_finetune.report runs/tiny_easyvqa_full
    python -m pg_finetune.report runs/tiny_easyvqa_detect --sample 20 --seed 1

Reads what a training run leaves in its output dir (`recipe.yaml`, `metrics.json`,
`predictions_before.jsonl` / `predictions_after.jsonl`, `log_history.json` or the latest
`checkpoint-N/trainer_state.json`) and writes beside them:

- `curves.png`: training loss (and eval loss, when logged) and every generation metric the run
  logged as `eval/...`, against optimiser steps; before / after values are marked at step 0 and
  the last step;
- `report.html` (+ `report_files/` with the example images): the recipe summary, the metrics
  table, the curves, and a seeded sample of held-out examples showing the base model's and the
  fine-tuned model's outputs side by side with per-example scores. Detection examples have the
  true (green) and predicted (magenta) boxes drawn; counting gets confusion matrices.

Prediction rows carry no image, so the eval records are loaded again from the saved recipe the
way train.py loads them (`pg_finetune.recipe_data.load_eval_records`) and matched to the rows by id, prompt and references;
a row that matches no record is shown without an image, and the page says so.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from pg_finetune.data import RecordDataset
from pg_finetune.jsonl import jsonl_objects
from pg_finetune.metrics.captions import cider_each
from pg_finetune.recipe import Recipe, RecipeError, load_recipe, recipe_to_dict
from pg_finetune.recipe_data import eval_dataset, smallest
from pg_finetune.tasks import Task, get_task

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
CURVES_NAME = "curves.png"
FILES_DIR = "report_files"
TRUTH_COLOR = (0, 255, 0)  # lime: not one of the easy-vqa shape colours
PREDICTION_COLOR = (255, 0, 255)  # magenta
THUMBNAIL_SIDE = 256  # examples are shown at about this size; small images are enlarged (nearest neighbour)
MAX_METRIC_PANELS = 8
LOWER_IS_BETTER = {"invalid_rate"}  # every other task metric: higher is better


# ----------------------------------------------------------------------------------------------------
# Eval records: the same records train.py scores before and after training
# ----------------------------------------------------------------------------------------------------
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
    """{"loss": [(step, value), ...], "eval_loss": [...], "eval/<metric>": [...]} from Trainer logs."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            wanted = key in ("loss", "eval_loss") or key.startswith("eval/")
            if wanted and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((int(step), float(value)))
    return series


def _metric_keys(series: dict, metrics: dict | None) -> list[str]:
    """Metric names to plot: the after-training ones first (headline first), then any other logged."""
    keys = list((metrics or {}).get("after") or {})
    keys += [
        k.removeprefix("eval/")
        for k in series
        if k.startswith("eval/") and k.removeprefix("eval/") not in keys
    ]
    logged = {k.removeprefix("eval/") for k in series if k.startswith("eval/")}
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
    losses = [v for key in ("loss", "eval_loss") for _, v in series.get(key, [])]
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o--")):
        if series.get(key):
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, style, label=label, markersize=3)
    if (
        losses and min(losses) > 0 and max(losses) / min(losses) > 4
    ):  # log scale shows both ends of a long fall
        ax.set_yscale("log")
    if not losses:
        ax.text(
            0.5,
            0.5,
            "no loss logged\n(training.logging_steps > steps?)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    else:
        ax.legend()
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (suffix tokens)")
    ax.grid(alpha=0.3)

    last_step = (run.metrics or {}).get("steps") or max((s for v in series.values() for s, _ in v), default=0)
    for ax, key in zip(flat[1:], metric_keys, strict=False):
        logged = series.get(f"eval/{key}", [])
        if logged:
            steps, values = zip(*logged, strict=True)
            ax.plot(steps, values, "o-", color="C0", markersize=3, label="during training")
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
# Per-example scores: one function per task, registry keyed by task name
# ----------------------------------------------------------------------------------------------------
def _headline_each(
    task: Task, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> list[float]:
    """The task's headline metric on each example alone (exact match, correct count, per-image mIoU)."""
    return [
        next(iter(task.score([p], [refs]).values())) for p, refs in zip(predictions, references, strict=True)
    ]


def caption_cider_each(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-example CIDEr-D, tokenized as the caption task's metric is, so the mean is its `cider`."""
    return cider_each(predictions, references, tokenizer="auto")


@dataclass(frozen=True)
class ExampleScore:
    name: str  # column title
    binary: bool  # 0/1 scores, shown as correct / wrong
    compute: Callable[[Task, Sequence[str], Sequence[Sequence[str]]], list[float]]


EXAMPLE_SCORES: dict[str, ExampleScore] = {
    "vqa": ExampleScore("exact match", True, _headline_each),
    "count_intersections": ExampleScore("correct", True, _headline_each),
    "detect": ExampleScore("mIoU", False, _headline_each),
    "caption": ExampleScore("CIDEr", False, lambda task, p, r: caption_cider_each(p, r)),
}


def example_scores(task: Task, rows: Sequence[dict]) -> list[float]:
    spec = EXAMPLE_SCORES.get(task.name, ExampleScore(task.name, False, _headline_each))
    return spec.compute(task, [r["prediction"] for r in rows], [r["references"] for r in rows])


# ----------------------------------------------------------------------------------------------------
# Counting: confusion matrix
# ----------------------------------------------------------------------------------------------------
def confusion_matrix(rows: Sequence[dict]) -> tuple[list[str], list[str], Counter]:
    """(true labels, predicted labels, Counter[(true, predicted)]) of counting rows.

    Labels are counts as digits (parsed as the task scores them); a prediction holding no number
    is counted under "other".
    """
    from pg_finetune.metrics.counting import read_count

    def label(text: str) -> str:
        count = read_count(text)
        return "other" if count is None else str(count)

    cells: Counter = Counter()
    for row in rows:
        truth = label(str(row["references"][0])) if row["references"] else "other"
        cells[(truth, label(row["prediction"]))] += 1

    def order(label: str) -> tuple[int, int | str]:
        return (0, int(label)) if label.isdigit() else (1, label)

    truths = sorted({t for t, _ in cells}, key=order)
    predicted = sorted({p for _, p in cells} | set(truths), key=order)
    return truths, predicted, cells


def _confusion_html(title: str, rows: Sequence[dict]) -> str:
    truths, predicted, cells = confusion_matrix(rows)
    head = "".join(f"<th>{html.escape(p)}</th>" for p in predicted)
    body = []
    for t in truths:
        tds = []
        for p in predicted:
            count = cells.get((t, p), 0)
            kind = "hit" if t == p and count else ("miss" if count else "zero")
            tds.append(
                f'<td class="{kind}" data-true="{html.escape(t)}" data-pred="{html.escape(p)}">{count}</td>'
            )
        body.append(f"<tr><th>{html.escape(t)}</th>{''.join(tds)}</tr>")
    return (
        f'<table class="confusion" data-which="{html.escape(title)}">'
        f"<caption>{html.escape(title)}: rows true count, columns predicted</caption>"
        f"<tr><th>true \\ pred</th>{head}</tr>{''.join(body)}</table>"
    )


# ----------------------------------------------------------------------------------------------------
# Example images
# ----------------------------------------------------------------------------------------------------
def _thumbnail(image: Image.Image) -> tuple[Image.Image, float]:
    """(display copy, scale): small images enlarged by a whole factor, large ones shrunk to THUMBNAIL_SIDE."""
    side = max(image.size)
    if side <= THUMBNAIL_SIDE // 2:
        scale = float(THUMBNAIL_SIDE // side)
        resample = Image.Resampling.NEAREST  # keep small images' pixels crisp
    else:
        scale = min(1.0, THUMBNAIL_SIDE / side)
        resample = Image.Resampling.LANCZOS
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, resample), scale


def draw_boxes(image: Image.Image, reference: dict, prediction: str | None) -> Image.Image:
    """Display copy of `image` with the true boxes (lime) and, when given, the predicted ones (magenta).

    Boxes are in the reference's pixel frame (`width` x `height`), rescaled to the image actually shown.
    """
    from pg_finetune.loc import parse_detections

    canvas, scale = _thumbnail(image)
    sx = scale * image.width / reference["width"]
    sy = scale * image.height / reference["height"]
    draw = ImageDraw.Draw(canvas)

    def box(xyxy: Sequence[float], color: tuple[int, int, int], label: str | None) -> None:
        x1, y1, x2, y2 = xyxy
        draw.rectangle((x1 * sx, y1 * sy, x2 * sx, y2 * sy), outline=color, width=2)
        if label:
            draw.text((x1 * sx + 3, y1 * sy + 2), label, fill=color)

    for xyxy in reference["boxes"]:
        box(xyxy, TRUTH_COLOR, None)
    if prediction is not None:
        classes = reference.get("classes", reference["labels"])
        for det in parse_detections(prediction, reference["width"], reference["height"], classes).detections:
            box(det.box, PREDICTION_COLOR, det.label)
    return canvas


# ----------------------------------------------------------------------------------------------------
# Matching prediction rows to eval records
# ----------------------------------------------------------------------------------------------------
def match_rows(rows: Sequence[dict], dataset: RecordDataset, task: Task) -> list[int | None]:
    """Index into `dataset` of each prediction row, or None where no record has its id, prompt and references.

    Ids are matched in order (the k-th row with an id goes to the k-th record with it), so duplicate
    ids still pair up as train.py wrote them; the prompt and references must then agree too, or the
    image would belong to another example.
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
                references = task.references(meta)
            except (KeyError, TypeError, ValueError):
                references = None
            if meta.get("prefix") != row.get("prefix") or references != row.get("references"):
                index = None
        matched.append(index)
    return matched


# ----------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.examples td { max-width: 320px; overflow-wrap: anywhere; }
.prediction, .reference { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.raw { color: #777; font-size: 0.85em; font-family: ui-monospace, monospace; white-space: pre-wrap; }
.empty { color: #999; font-style: italic; }
.score { font-weight: bold; }
.correct { color: #087f23; } .wrong { color: #b00020; }
.note { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.5em 1em; }
.better { color: #087f23; } .worse { color: #b00020; }
table.confusion td.hit { background: #d8f5dc; } table.confusion td.miss { background: #fde2e2; }
table.confusion td.zero { color: #bbb; }
img.example { image-rendering: pixelated; display: block; margin-bottom: 4px; }
.legend-truth { color: #0a0; font-weight: bold; } .legend-pred { color: #c0c; font-weight: bold; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


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
    if tu.method in ("lora", "qlora"):
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
            f"{smallest(r.eval.max_samples, d.max_eval_samples) or 'all'} records"
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
        ("checkpoint", m.get("final_dir")),
    ]
    recipe_yaml = _e(_yaml(recipe_to_dict(r)))
    return (
        f"<h2>Run</h2>{_kv_table(pairs)}"
        f"<details><summary>resolved recipe</summary><pre>{recipe_yaml}</pre></details>"
    )


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _metrics_table(run: Run) -> str:
    m = run.metrics or {}
    before, after = m.get("before") or {}, m.get("after") or {}
    if not after and not before:
        return (
            "<h2>Metrics</h2><p>No before / after metrics (eval.before_and_after off or no eval split).</p>"
        )
    rows = []
    for key in list(after) + [k for k in before if k not in after]:
        b, a = before.get(key), after.get(key)
        change = ""
        if isinstance(b, (int, float)) and isinstance(a, (int, float)):
            sign = -1 if key in LOWER_IS_BETTER else 1
            kind = "better" if sign * (a - b) > 0 else "worse" if sign * (a - b) < 0 else "same"
            change = f'<td class="num {kind}">{a - b:+.4f}</td>'
        else:
            change = "<td></td>"
        rows.append(
            f'<tr><th>{_e(run.recipe.task.name)}/{_e(key)}</th><td class="num">{_number(b)}</td>'
            f'<td class="num">{_number(a)}</td>{change}</tr>'
        )
    hint = (
        '<p class="raw">invalid_rate: lower is better; every other metric: higher is better.</p>'
        if run.recipe.task.name == "detect"
        else ""
    )
    header = "<tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>"
    return (
        "<h2>Metrics (held-out, before vs after training)</h2>"
        f'<table class="metrics">{header}{"".join(rows)}</table>{hint}'
    )


def _text_block(text: str, css: str) -> str:
    return (
        f'<span class="{css}">{_e(text)}</span>'
        if text.strip()
        else f'<span class="{css} empty">(empty)</span>'
    )


def _detection_note(row: dict, reference: str) -> str:
    """`2 boxes, 1 malformed`: what the detection parser made of a model's output."""
    from pg_finetune.loc import parse_detections

    ref = json.loads(reference)
    parsed = parse_detections(
        row["prediction"], ref["width"], ref["height"], ref.get("classes", ref["labels"])
    )
    found = len(parsed.detections)
    text = f"{found} box{'es' if found != 1 else ''}"
    return text + (f", {parsed.malformed} malformed" if parsed.malformed else "")


def _output_cell(
    which: str, row: dict | None, score: float | None, spec: ExampleScore, image_src: str | None, task: Task
) -> str:
    if row is None:
        return f'<td class="{which}"><span class="empty">no prediction</span></td>'
    parts = []
    if image_src:
        parts.append(f'<img class="example" src="{_e(image_src)}" alt="{_e(which)}">')
    parts.append(_text_block(row["prediction"], "prediction"))
    if row.get("raw") is not None and row["raw"].strip() != row["prediction"]:
        parts.append(f'<div class="raw">raw: {_e(repr(row["raw"]))}</div>')
    if task.name == "detect":
        try:
            parts.append(f'<div class="raw">{_e(_detection_note(row, row["references"][0]))}</div>')
        except (ValueError, KeyError, TypeError, IndexError):
            pass
    if score is not None:
        if spec.binary:
            ok = score >= 1.0
            parts.append(
                f'<div class="score {"correct" if ok else "wrong"}">{"correct" if ok else "wrong"}</div>'
            )
        else:
            parts.append(f'<div class="score">{_e(spec.name)} {score:.3f}</div>')
    return f'<td class="{which}">{"".join(parts)}</td>'


def _references_html(task: Task, references: Sequence[str]) -> str:
    if task.name == "detect" and len(references) == 1:  # one JSON string with boxes and image size
        try:
            ref = json.loads(references[0])
            lines = [
                f"{lab}: ({', '.join(f'{v:g}' for v in box)})"
                for box, lab in zip(ref["boxes"], ref["labels"], strict=True)
            ]
            return _text_block("\n".join(lines) or "(no objects)", "reference") + (
                f'<div class="raw">{_e(ref["width"])} x {_e(ref["height"])} px</div>'
            )
        except (ValueError, KeyError, TypeError):
            pass
    return (
        "".join(f"<div>{_text_block(r, 'reference')}</div>" for r in references)
        or '<span class="empty">none</span>'
    )


def _example_images(
    k: int, image: Image.Image, row: dict, row_b: dict | None, row_a: dict | None, task: Task, files_dir: Path
) -> tuple[str, str | None, str | None]:
    """Write example k's images; return (image cell html, before image src, after image src).

    Detection: the image with the true boxes, and one per model with its predicted boxes drawn too.
    """
    if task.name != "detect":
        name = f"{k:03d}_image.png"
        _thumbnail(image)[0].save(files_dir / name)
        return f'<img class="example" src="{FILES_DIR}/{name}" alt="example {k}">', None, None
    reference = json.loads(row["references"][0])
    name = f"{k:03d}_truth.png"
    draw_boxes(image, reference, None).save(files_dir / name)
    sources = []
    for which, model_row in (("before", row_b), ("after", row_a)):
        if model_row is None:
            sources.append(None)
            continue
        draw_boxes(image, reference, model_row["prediction"]).save(files_dir / f"{k:03d}_{which}.png")
        sources.append(f"{FILES_DIR}/{k:03d}_{which}.png")
    return f'<img class="example" src="{FILES_DIR}/{name}" alt="example {k}">', sources[0], sources[1]


def _examples(run: Run, files_dir: Path, sample_size: int, seed: int) -> str:
    task = get_task(run.recipe.task.name)
    spec = EXAMPLE_SCORES.get(task.name, ExampleScore(task.name, False, _headline_each))
    base = run.before if run.before is not None else run.after
    if not base:
        return "<h2>Examples</h2><p>No prediction files: nothing to compare.</p>"
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
    scores = {
        which: example_scores(task, rows) if rows is not None else None
        for which, rows in (("before", run.before), ("after", run.after))
    }
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

    detect = task.name == "detect"
    trs = []
    for k, i in enumerate(picked):
        row_b, row_a = before[i], after[i]
        record = dataset[matched[i]] if dataset is not None and matched[i] is not None else None
        image_cell, src_b, src_a = '<span class="empty">no image</span>', None, None
        if record is not None:
            image_cell, src_b, src_a = _example_images(
                k, record["image"], base[i], row_b, row_a, task, files_dir
            )
        score_b = scores["before"][i] if scores["before"] is not None else None
        score_a = scores["after"][i] if scores["after"] is not None else None
        prompt = _text_block(base[i]["prefix"], "prompt")
        trs.append(
            f'<tr data-id="{_e(base[i].get("id"))}"><td class="num">{i}</td><td>{image_cell}'
            f'<div class="raw">{_e(base[i].get("id"))}</div></td>'
            f"<td>{prompt}</td><td>{_references_html(task, base[i]['references'])}</td>"
            f"{_output_cell('before', row_b, score_b, spec, src_b, task)}"
            f"{_output_cell('after', row_a, score_a, spec, src_a, task)}</tr>"
        )
    legend = (
        '<p>Boxes: <span class="legend-truth">lime = ground truth</span>, '
        '<span class="legend-pred">magenta = the model\'s prediction</span>.</p>'
        if detect
        else ""
    )
    note_html = "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    header = (
        "<tr><th>#</th><th>image</th><th>prompt</th><th>reference(s)</th>"
        f"<th>base model ({_e(spec.name)})</th><th>fine-tuned ({_e(spec.name)})</th></tr>"
    )
    return (
        f"<h2>Examples: base vs fine-tuned</h2><p>{len(picked)} of {len(base)} held-out examples, "
        f"sampled with seed {seed} (the same rows for both models).</p>{note_html}{legend}"
        f'<table class="examples">{header}{"".join(trs)}</table>'
    )


def _confusions(run: Run) -> str:
    if run.recipe.task.name != "count_intersections":
        return ""
    parts = [
        _confusion_html(which, rows) for which, rows in (("before", run.before), ("after", run.after)) if rows
    ]
    if not parts:
        return ""
    return '<h2>Confusion matrices</h2><div class="confusions">' + "".join(parts) + "</div>"


def write_report(run_dir: str | Path, *, sample_size: int = 12, seed: int = 0) -> Path:
    """Write curves.png, report.html and report_files/ into `run_dir`; return the report's path."""
    run = load_run(run_dir)
    out = run.run_dir
    files_dir = out / FILES_DIR
    if files_dir.is_dir():  # ours: drop images of an earlier report (another sample may be smaller)
        shutil.rmtree(files_dir)
    files_dir.mkdir(parents=True)
    plot_curves(run, out / CURVES_NAME)
    examples = _examples(run, files_dir, sample_size, seed)
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in run.notes)
    r = run.recipe
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(r.name)}: pg-finetune report</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(r.name)}</h1><p>{_e(r.description)}</p>{notes}"
        f"{_summary(run)}{_metrics_table(run)}"
        f'<h2>Curves</h2><img src="{CURVES_NAME}" alt="training curves" style="max-width: 100%">'
        f"{_confusions(run)}{examples}"
        f'<p class="raw">run directory: {_e(out.resolve())}</p></body></html>\n'
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
