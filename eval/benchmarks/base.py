"""What every benchmark provides, and the helpers most of them share.

A benchmark is data: where its records come from (`load`), the prompt (`prefix`, else the
task's), how a decoded output becomes a prediction (`parse`), what a record's reference is
(`reference`, which raises KeyError/ValueError/TypeError naming the key when a record cannot be
scored), and the metric (`score`). The same `reference` reads a dataset record in model mode and
a line of a `--references` file, so both modes score the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pg_finetune.data import RecordDataset, load_records
from pg_finetune.jsonl import jsonl_objects


@dataclass(frozen=True)
class ScoreOptions:
    """Benchmark-specific switches from the command line."""

    caption_tokenizer: str = "auto"  # auto | ptb | simple
    detection_scores: str = "order"  # order: k-th box of an output scores 1/(k+1); constant: all 1.0


@dataclass
class Drawn:
    """Boxes of one example, for the HTML page: [(pixel x1y1x2y2, label, note)]."""

    truth: list[tuple[Sequence[float], str, str]]
    predicted: list[tuple[Sequence[float], str, str]]


@dataclass
class Scored:
    """metrics: {name: value}, first key the headline; problems: example index -> notes to report;
    drawn: example index -> boxes to draw (detection-like benchmarks)."""

    metrics: dict[str, float]
    problems: dict[int, list[str]] = field(default_factory=dict)
    drawn: dict[int, Drawn] = field(default_factory=dict)


def load_jsonl_records(
    source: str, split: str, *, limit: int | None = None, prefix: str | None = None, image_root: str | None = None
) -> RecordDataset:
    """Any source `pg_finetune.data.load_records` reads; bad records are skipped and counted.

    (`image_root` is for sources whose image paths are not relative to the file: cococap's JSON.)"""
    return load_records(
        source, split, default_prefix=prefix, require_suffix=False, limit=limit, skip_bad_records=True
    )


def read_jsonl_references(path: str, split: str, image_root: str | None = None) -> list[dict]:
    """Rows of a references JSONL; a line that is not a JSON object becomes `{"_line": N, "_bad": why}`."""
    return [
        {**row, "_line": number} if row is not None else {"_line": number, "_bad": problem}
        for number, row, problem in jsonl_objects(path)
    ]


@dataclass(frozen=True)
class Benchmark:
    """name: registry key and first part of metric names (`name/split/metric`).
    task: the `pg_finetune.tasks` task whose prompt, parser and generation budget apply by default.
    source, split: default data (source None: `--data` is required).
    references_help: what a `--references` line holds, shown in docs and errors.
    """

    name: str
    description: str
    task: str
    source: str | None
    split: str
    references_help: str
    reference: Callable[[dict], Any]
    score: Callable[[Sequence[str], Sequence[Any], ScoreOptions], Scored]
    prefix: str | None = None
    prompt: Callable[[dict], str] | None = None  # record -> prompt; None: the record's prefix
    parse: Callable[[str], str] | None = None
    max_new_tokens: int | None = None
    load: Callable[..., RecordDataset] = load_jsonl_records  # (source, split, *, limit, prefix, image_root)
    read_references: Callable[..., list[dict]] = read_jsonl_references  # (path, split, image_root)
    draw: bool = False  # write detections.html


def text_references(record: dict, field_name: str) -> list[str]:
    """A list of reference strings from `field_name` (strings, or dicts with `answer`/`raw`/`caption`),
    else `[suffix]`; ValueError when there is none."""
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
        if isinstance(ref, dict):
            ref = next((ref[k] for k in ("answer", "raw", "caption") if k in ref), None)
        if not isinstance(ref, str):
            raise ValueError(f"{field_name!r} holds {ref!r}, not a string")
        out.append(ref)
    if not out:
        raise ValueError(f"{field_name!r} is empty")
    return out
