"""Image captioning: prefix `caption en`, suffix the caption.

Records may carry several reference captions in `captions` (else the `suffix` is the one
reference); the headline metric is CIDEr-D through pycocoevalcap's scorer, with BLEU-4 and
ROUGE-L beside it (`pg_finetune.metrics.captions`). Captions are tokenized as the COCO evaluation
does, with the Stanford PTB tokenizer, when `java` is on the PATH; otherwise with
`simple_tokenize` (lower case, punctuation dropped), a documented fallback whose scores are close
to but not equal to the official ones (`ScoreOptions.caption_tokenizer` picks).
"""

from __future__ import annotations

from collections.abc import Sequence

from pg_finetune.metrics.captions import caption_scores, cider_each, resolve_tokenizer
from pg_finetune.tasks.base import Metric, Scored, ScoreOptions, Task, text_references

__all__ = ["CAPTION", "CIDER"]


def _reference(record: dict) -> list[str]:
    return text_references(record, "captions")


def _score(predictions: Sequence[str], references: Sequence[list[str]], options: ScoreOptions) -> Scored:
    return Scored(caption_scores(predictions, references, tokenizer=options.caption_tokenizer))


def _cider_each(predictions: Sequence[str], references: Sequence[list[str]], options: ScoreOptions) -> list[float]:
    """Per-example CIDEr-D from the corpus computation: its mean is the corpus `cider`."""
    return cider_each(predictions, references, tokenizer=options.caption_tokenizer)


CIDER = Metric(
    name="captions",
    reference=_reference,
    score=_score,
    each=_cider_each,
    settings=lambda options: {"caption_tokenizer": resolve_tokenizer(options.caption_tokenizer)},  # ptb or simple
    example_label="CIDEr",
    references_help='{"id": ..., "captions": ["...", ...]} (or "suffix")',
)

CAPTION = Task(name="caption", default_prefix="caption en", metric=CIDER, max_new_tokens=64)
