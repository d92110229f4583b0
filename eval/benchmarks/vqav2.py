"""`vqav2`: VQAv2 with the official VQA accuracy (`pg_finetune.metrics.vqa`).

    python -m eval.run --benchmark vqav2 --model google/paligemma2-3b-pt-224 --adapter runs/x/final \
        --data path/to/VQAv2 --split "validation[:2000]"

Data: HuggingFaceM4/VQAv2 columns (or a local copy of it): `image`, `question`, `answers` (the 10
human answers, strings or `{"answer": ...}` dicts), optionally `answer_type`. Prompt
`answer en {question}` unless the record has a `prefix`.
Metrics: accuracy (official: answer normalisation, then the mean over the 10 leave-one-out subsets
of min(#matching humans / 3, 1)), and accuracy/<answer type> (yes_no, number, other) when records
carry `answer_type`. A record with fewer than 3 answers is refused (listed in report.json's
`bad_references` with the reason): the formula would score a correct answer against one reference
0. Score such data with `--benchmark vqa` (exact match).
"""

from __future__ import annotations

from collections.abc import Sequence

from eval.benchmarks.base import Benchmark, Scored, ScoreOptions, text_references
from pg_finetune.metrics.vqa import too_few_answers, vqa_scores


def reference(record: dict) -> dict:
    answer_type = record.get("answer_type")
    if answer_type is not None and not isinstance(answer_type, str):
        raise ValueError(f"'answer_type' must be a string, got {answer_type!r}")
    answers = text_references(record, "answers")
    problem = too_few_answers(len(answers))
    if problem:  # refused by record, listed in report.json's bad_references: never a silent 0
        raise ValueError(problem)
    return {"answers": answers, "answer_type": answer_type}


def score(predictions: Sequence[str], references: Sequence[dict], options: ScoreOptions) -> Scored:
    types = [r["answer_type"] for r in references]
    answers = [r["answers"] for r in references]
    return Scored(vqa_scores(predictions, answers, types if any(types) else None))


BENCHMARK = Benchmark(
    name="vqav2",
    description="VQAv2, official VQA accuracy",
    task="vqa",
    source="HuggingFaceM4/VQAv2",
    split="validation",
    references_help='{"id": ..., "answers": [10 strings or {"answer": ...}], "answer_type": "yes/no" (optional)}',
    reference=reference,
    score=score,
    prefix="answer en {question}",
)
