"""Image captioning: prefix `caption en`, suffix the caption.

Records may carry several reference captions in `captions`; the headline metric is CIDEr-D
through pycocoevalcap's scorer, with BLEU-4 and ROUGE-L beside it (`pg_finetune.metrics.captions`).
Captions are tokenized as the COCO evaluation does, with the Stanford PTB tokenizer, when `java`
is on the PATH; otherwise with `simple_tokenize` (lower case, punctuation dropped), a documented
fallback whose scores are close to but not equal to the official ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from pg_finetune.metrics.captions import caption_scores as _caption_scores
from pg_finetune.metrics.captions import simple_tokenize
from pg_finetune.tasks.base import Task

__all__ = ["CAPTION", "caption_scores", "simple_tokenize"]


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"cider", "bleu4", "rouge_l"}, tokenized with PTB when java is present (see the module docstring)."""
    return _caption_scores(predictions, references, tokenizer="auto")


CAPTION = Task(
    name="caption",
    default_prefix="caption en",
    reference_field="captions",
    parse=str.strip,
    score=caption_scores,
    max_new_tokens=64,
)
