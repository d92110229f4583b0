"""What every task provides."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """A PaliGemma task.

    name: registry key, used in recipes (`task.name`).
    default_prefix: the prompt used when a record carries none (e.g. `caption en`).
    reference_field: the record field holding the list of references for scoring
        (`captions`, `answers`, ...); records without it are scored against `[suffix]`.
    parse: decoded model output -> prediction (e.g. strip, normalise).
    score: (predictions, references per example) -> {metric name: value}; the first
        key is the headline metric.
    max_new_tokens: a sensible generation budget for this task.
    """

    name: str
    default_prefix: str
    reference_field: str
    parse: Callable[[str], str]
    score: Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, float]]
    max_new_tokens: int = 32

    def references(self, record: dict) -> list[str]:
        refs = record.get(self.reference_field)
        if refs is None:
            refs = [record["suffix"]] if record.get("suffix") is not None else []
        if isinstance(refs, str):
            return [refs]
        # VQAv2-style answer lists hold dicts: {"answer": ..., "answer_confidence": ..., "answer_id": ...}
        return [r["answer"] if isinstance(r, dict) and "answer" in r else r for r in refs]
