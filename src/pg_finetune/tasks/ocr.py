"""Reading the text in an image: prefix `ocr` (PaliGemma's OCR prompt), suffix the text.

References are `texts` (one or more strings), else the `suffix`. Metrics
(`pg_finetune.metrics.text`): `exact_match` (headline; whitespace runs collapsed), corpus
`cer` and `wer` (edits / reference length, lower is better; against the closest reference),
and `anls` (DocVQA's normalized Levenshtein similarity, threshold 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

from pg_finetune.metrics.text import text_scores
from pg_finetune.tasks.base import Metric, Scored, ScoreOptions, Task, text_references


def _reference(record: dict) -> list[str]:
    return text_references(record, "texts")


def _score(predictions: Sequence[str], references: Sequence[list[str]], options: ScoreOptions) -> Scored:
    return Scored(text_scores(predictions, references))


TEXT = Metric(
    name="text",
    reference=_reference,
    score=_score,
    example_label="exact match",
    binary=True,
    lower_is_better=("cer", "wer"),
    references_help='{"id": ..., "texts": ["..."]} (or "suffix")',
)

OCR = Task(name="ocr", default_prefix="ocr", metric=TEXT, max_new_tokens=64)
