"""Visual question answering: prefix `answer en <question>`, suffix the answer.

References are `answers` (strings, or VQAv2's `{"answer": ...}` dicts), else the `suffix`.
Two metrics over the same parser:
- `exact_match` (the task's own): exact match after light normalisation (lower case, strip,
  final period dropped), the easy-vqa metric, with `exact_match_yes_no` / `exact_match_other`
  so that learning the yes/no format is not mistaken for seeing the image;
- `vqav2_accuracy`: the official VQA accuracy (`pg_finetune.metrics.vqa`: min(#humans / 3, 1)
  over leave-one-out subsets, with `accuracy/<answer type>`); a record with fewer than 3 answers
  is refused with the reason, never silently scored 0.
Document, chart and multiple-choice benchmarks use the metrics of `pg_finetune.metrics.vqa_variants`:
`anls` (DocVQA, InfoVQA), `relaxed_accuracy` (ChartQA), `multiple_choice_accuracy` (AI2D, ScienceQA).
"""

from __future__ import annotations

from collections.abc import Sequence

from pg_finetune.metrics.vqa import too_few_answers
from pg_finetune.tasks.base import Metric, Scored, ScoreOptions, Task, check_lengths, text_references


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    check_lengths(predictions, references)
    if not predictions:
        return {"exact_match": 0.0}
    correct = [
        normalize_answer(p) in {normalize_answer(r) for r in refs} for p, refs in zip(predictions, references, strict=True)
    ]
    scores = {"exact_match": sum(correct) / len(correct)}
    yes_no = [normalize_answer(refs[0]) in ("yes", "no") if refs else False for refs in references]
    for name, keep in (("yes_no", True), ("other", False)):
        picked = [c for c, yn in zip(correct, yes_no, strict=True) if yn is keep]
        if picked:
            scores[f"exact_match_{name}"] = sum(picked) / len(picked)
    return scores


def _answers(record: dict) -> list[str]:
    return text_references(record, "answers")


EXACT_MATCH = Metric(
    name="exact_match",
    reference=_answers,
    score=lambda predictions, references, options: Scored(exact_match(predictions, references)),
    example_label="exact match",
    binary=True,
    references_help='{"id": ..., "answers": ["..."]} (or "suffix")',
)


def _typed_answers(record: dict, type_field: str) -> dict:
    """`{"answers", type_field}`: the answers and the record's question/answer type (None when absent),
    for metrics that also report per type."""
    kind = record.get(type_field)
    if kind is not None and not isinstance(kind, str):
        raise ValueError(f"{type_field!r} must be a string, got {kind!r}")
    return {"answers": _answers(record), type_field: kind}


def _answers_and_types(references: Sequence[dict], type_field: str) -> tuple[list, list | None]:
    types = [r[type_field] for r in references]
    return [r["answers"] for r in references], types if any(types) else None


def _vqav2_reference(record: dict) -> dict:
    reference = _typed_answers(record, "answer_type")
    problem = too_few_answers(len(reference["answers"]))
    if problem:  # refused by record and reported: never a silent 0
        raise ValueError(problem)
    return reference


def _vqav2_score(predictions: Sequence[str], references: Sequence[dict], options: ScoreOptions) -> Scored:
    from pg_finetune.metrics.vqa import vqa_scores

    return Scored(vqa_scores(predictions, *_answers_and_types(references, "answer_type")))


VQAV2_ACCURACY = Metric(
    name="vqav2_accuracy",
    reference=_vqav2_reference,
    score=_vqav2_score,
    example_label="VQA accuracy",
    references_help='{"id": ..., "answers": [10 strings or {"answer": ...}], "answer_type": "yes/no" (optional)}',
)


def _describe(reference) -> str:
    answers = reference["answers"] if isinstance(reference, dict) else reference
    return "\n".join(answers)


def _anls_score(
    predictions: Sequence[str], references: Sequence[list[str]], options: ScoreOptions
) -> Scored:
    from pg_finetune.metrics.vqa_variants import anls_scores

    return Scored(anls_scores(predictions, references))


def _anls_each(
    predictions: Sequence[str], references: Sequence[list[str]], options: ScoreOptions
) -> list[float]:
    from pg_finetune.metrics.text import anls_each

    check_lengths(predictions, references)
    return anls_each(predictions, references)


ANLS = Metric(
    name="anls",
    reference=_answers,
    score=_anls_score,
    each=_anls_each,
    example_label="ANLS",
    references_help='{"id": ..., "answers": ["...", ...]} (or "suffix"): every accepted answer '
    "(DocVQA, InfoVQA)",
)


def _relaxed_score(
    predictions: Sequence[str], references: Sequence[list[str]], options: ScoreOptions
) -> Scored:
    from pg_finetune.metrics.vqa_variants import relaxed_scores

    check_lengths(predictions, references)
    return Scored(relaxed_scores(predictions, references))


RELAXED_ACCURACY = Metric(
    name="relaxed_accuracy",
    reference=_answers,
    score=_relaxed_score,
    example_label="relaxed match",
    binary=True,
    references_help='{"id": ..., "answers": ["..."]} (or "suffix"): the ChartQA label; numbers within 5% '
    "match",
)


def _multiple_choice_reference(record: dict) -> dict:
    return _typed_answers(record, "question_type")


def _multiple_choice_score(
    predictions: Sequence[str], references: Sequence[dict], options: ScoreOptions
) -> Scored:
    from pg_finetune.metrics.vqa_variants import multiple_choice_scores

    check_lengths(predictions, references)
    return Scored(multiple_choice_scores(predictions, *_answers_and_types(references, "question_type")))


MULTIPLE_CHOICE_ACCURACY = Metric(
    name="multiple_choice_accuracy",
    reference=_multiple_choice_reference,
    score=_multiple_choice_score,
    example_label="correct option",
    binary=True,
    references_help='{"id": ..., "answers": ["<the correct option>"] (or "suffix"; ScienceQA\'s '
    '"The answer is B." '
    'is read as the letter), "question_type": "..." (optional: adds accuracy/<type>)}',
)


VQA = Task(
    name="vqa",
    default_prefix="answer en",
    metric=EXACT_MATCH,
    alternatives=(VQAV2_ACCURACY, ANLS, RELAXED_ACCURACY, MULTIPLE_CHOICE_ACCURACY),
    max_new_tokens=8,
    describe_reference=_describe,
)
