"""`caption`: any captioning data with one or more references per image: CIDEr-D, BLEU-4, ROUGE-L.

    python -m eval.run --benchmark caption --data data/val.jsonl --model runs/x/final

References: `{"id": ..., "captions": ["...", ...]}` (or `suffix`). Tokenized with the PTB tokenizer
when java is present (`--caption-tokenizer auto|ptb|simple`, see `pg_finetune.metrics.captions`).
"""

from __future__ import annotations

from collections.abc import Sequence

from eval.benchmarks.base import Benchmark, Scored, ScoreOptions, text_references
from pg_finetune.metrics.captions import caption_scores


def reference(record: dict) -> list[str]:
    return text_references(record, "captions")


def score(predictions: Sequence[str], references: Sequence[list[str]], options: ScoreOptions) -> Scored:
    return Scored(caption_scores(predictions, references, tokenizer=options.caption_tokenizer))


BENCHMARK = Benchmark(
    name="caption",
    description="any caption data (--data), CIDEr/BLEU-4/ROUGE-L",
    task="caption",
    source=None,
    split="validation",
    references_help='{"id": ..., "captions": ["...", ...]} (or "suffix")',
    reference=reference,
    score=score,
)
