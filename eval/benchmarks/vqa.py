"""`vqa`: any VQA data, exact match after light normalisation (lower case, strip, final period dropped).

    python -m eval.run --benchmark vqa --data data/val.jsonl --model runs/x/final
    python -m eval.run --benchmark vqa --predictions preds.jsonl --references refs.jsonl

References: `{"id": ..., "answers": ["red", ...]}` (strings or `{"answer": ...}` dicts), or `suffix`.
Metrics: exact_match, exact_match_yes_no, exact_match_other (the task's, `pg_finetune.tasks.vqa`).
"""

from __future__ import annotations

from collections.abc import Sequence

from eval.benchmarks.base import Benchmark, Scored, ScoreOptions, text_references
from pg_finetune.tasks.vqa import exact_match


def reference(record: dict) -> list[str]:
    return text_references(record, "answers")


def score(predictions: Sequence[str], references: Sequence[list[str]], options: ScoreOptions) -> Scored:
    return Scored(exact_match(predictions, references))


BENCHMARK = Benchmark(
    name="vqa",
    description="generic VQA (--data), exact match",
    task="vqa",
    source=None,
    split="validation",
    references_help='{"id": ..., "answers": ["..."]} (or "suffix")',
    reference=reference,
    score=score,
)
