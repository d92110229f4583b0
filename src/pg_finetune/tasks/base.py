"""What a task is: everything about one kind of PaliGemma output, in one record.

A `Task` owns its prompt format (`default_prefix`, `prompt`), its output parser (`parse`), its
references and scores (a `Metric`: `reference(record)` -> a JSON-able reference, `score(...)` ->
corpus metrics plus per-example notes and boxes, `each(...)` -> one score per example for reports),
how an example shows in reports (`describe_reference`, `confusion`), and its training augmentation
(`augment`). Training-time eval, `eval.run` and the run report all go through these, so a task
cannot be scored one way in training and another in evaluation.

A task may offer other metrics besides its own (`Task.metrics`): the VQA task scores by exact
match, or by VQAv2's official accuracy over the same parser. A benchmark (`pg_finetune.benchmarks`)
or a recipe (`task.metric`) picks one by name.

Adding a task: a module under `pg_finetune/tasks/` that builds a `Task`, and one line in the
registry of `pg_finetune/tasks/__init__.py`. Nothing here may import torch: recipes are checked
against the task names before torch is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Box = Sequence[float]


@dataclass(frozen=True)
class ScoreOptions:
    """Metric switches a user may set (eval.run's command line)."""

    caption_tokenizer: str = "auto"  # auto | ptb | simple
    detection_scores: str = "order"  # order: k-th box of an output scores 1/(k+1); constant: all 1.0


@dataclass
class Drawn:
    """Boxes of one example, for pages: [(pixel x1y1x2y2, label, note)]."""

    truth: list[tuple[Box, str, str]]
    predicted: list[tuple[Box, str, str]]


@dataclass
class Scored:
    """metrics: {name: value}, first key the headline; problems: example index -> notes to report;
    drawn: example index -> boxes to draw (tasks with boxes)."""

    metrics: dict[str, float]
    problems: dict[int, list[str]] = field(default_factory=dict)
    drawn: dict[int, Drawn] = field(default_factory=dict)


ScoreFn = Callable[[Sequence[str], Sequence[Any], ScoreOptions], Scored]


@dataclass(frozen=True)
class Metric:
    """How parsed predictions are scored against references.

    reference: record -> the reference the score needs (JSON-able); raises KeyError naming a missing
        key, ValueError/TypeError naming a bad value, so a record that cannot be scored is reported.
    score: (predictions, references, options) -> Scored.
    example_label, binary: what a per-example score is called in reports, and whether it is 0/1.
    each: per-example scores whose mean is the headline metric; default: the headline on each alone.
    references_help: what a line of a references file holds.
    lower_is_better: metric names where smaller is better (every other one: higher is better).
    settings: options -> what the scores depend on beyond the data, for report.json (e.g. which
        caption tokenizer ran); None when nothing.
    """

    name: str
    reference: Callable[[dict], Any]
    score: ScoreFn
    example_label: str
    references_help: str
    binary: bool = False
    lower_is_better: tuple[str, ...] = ("invalid_rate",)
    each: Callable[[Sequence[str], Sequence[Any], ScoreOptions], list[float]] | None = None
    settings: Callable[[ScoreOptions], dict[str, Any]] | None = None

    def scores_each(self, predictions: Sequence[str], references: Sequence[Any], options: ScoreOptions) -> list[float]:
        if self.each is not None:
            return self.each(predictions, references, options)
        return [
            next(iter(self.score([p], [ref], options).metrics.values()))
            for p, ref in zip(predictions, references, strict=True)
        ]


def _record_prefix(record: dict) -> str:
    return record["prefix"]


def _describe_texts(reference: Any) -> str:
    return "\n".join(reference) if isinstance(reference, list) else str(reference)


@dataclass(frozen=True)
class Task:
    """A PaliGemma task.

    name: registry key, used in recipes (`task.name`) and benchmarks.
    default_prefix: the prompt used when a record carries none (e.g. `caption en`).
    metric: the task's own metric (training-time eval and its benchmarks); `metrics` holds it and
        any alternatives by name.
    parse: decoded model output -> prediction (e.g. strip).
    max_new_tokens: a sensible generation budget for this task.
    prompt: record (with its `prefix` filled in) -> the prompt to generate from.
    describe_reference: reference -> readable text for report pages.
    confusion: prediction rows -> (true labels, predicted labels, Counter[(true, predicted)]) for
        tasks whose outputs are classes (counts); None for the others.
    augment: (dataset, task config, seed) -> (dataset, trainer callbacks) for training; None = none.
    check_target: suffix -> None when it is a well-formed target, else what is wrong with it, for tasks
        whose targets have a grammar (detection's location tokens); `data.load_records` calls it on
        every record with a non-empty suffix, so a bad target is refused (or skipped) by file:line
        before training. None = any text is a target.
    """

    name: str
    default_prefix: str
    metric: Metric
    alternatives: tuple[Metric, ...] = ()
    parse: Callable[[str], str] = str.strip
    max_new_tokens: int = 32
    prompt: Callable[[dict], str] = _record_prefix
    describe_reference: Callable[[Any], str] = _describe_texts
    confusion: Callable[[Sequence[dict]], Any] | None = None
    augment: Callable[[Any, Any, int], tuple[Any, list]] | None = None
    check_target: Callable[[str], str | None] | None = None

    @property
    def metrics(self) -> dict[str, Metric]:
        return {m.name: m for m in (self.metric, *self.alternatives)}

    def get_metric(self, name: str | None) -> Metric:
        """The metric called `name` (None: the task's own); an unknown name lists the valid ones."""
        if name is None:
            return self.metric
        try:
            return self.metrics[name]
        except KeyError:
            raise KeyError(f"task {self.name!r} has no metric {name!r}; valid: {', '.join(self.metrics)}") from None

    def reference(self, record: dict) -> Any:
        return self.metric.reference(record)

    def score(self, predictions: Sequence[str], references: Sequence[Any], options: ScoreOptions | None = None) -> Scored:
        return self.metric.score(predictions, references, options or ScoreOptions())


def text_references(record: dict, field_name: str) -> list[str]:
    """A list of reference strings from `field_name` (strings, or dicts with `answer`/`raw`/`caption`),
    else `[suffix]`; KeyError when there is neither, ValueError when they are not strings."""
    refs = record.get(field_name)
    if refs is None and record.get("suffix") is not None:
        refs = [record["suffix"]]
    if refs is None:
        raise KeyError(f"no {field_name!r} (or 'suffix') field")
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list):
        raise ValueError(f"{field_name!r} must be a list of strings, got {type(refs).__name__}")
    out = []
    for ref in refs:
        if isinstance(ref, dict):  # VQAv2 answers: {"answer": ..., "answer_confidence": ..., "answer_id": ...}
            ref = next((ref[k] for k in ("answer", "raw", "caption") if k in ref), None)
        if not isinstance(ref, str):
            raise ValueError(f"{field_name!r} holds {ref!r}, not a string")
        out.append(ref)
    if not out:
        raise ValueError(f"{field_name!r} is empty")
    return out


def check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
