"""Visual question answering: prefix `answer en <question>`, suffix the answer.

Scoring here is exact match after light normalisation (lower case, strip,
trailing period dropped), which is the easy-vqa metric; the official VQAv2
accuracy (min(#humans/3, 1) over leave-one-out subsets) is `pg_finetune.metrics.vqa`,
used by the eval suite's `vqav2` benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

from pg_finetune.tasks.base import Task


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"exact_match": 0.0}
    correct = [
        normalize_answer(p) in {normalize_answer(r) for r in refs} for p, refs in zip(predictions, references, strict=True)
    ]
    scores = {"exact_match": sum(correct) / len(correct)}
    # Split by answer type, so that learning the yes/no format is not mistaken for seeing the image.
    yes_no = [normalize_answer(refs[0]) in ("yes", "no") if refs else False for refs in references]
    for name, keep in (("yes_no", True), ("other", False)):
        picked = [c for c, yn in zip(correct, yes_no, strict=True) if yn is keep]
        if picked:
            scores[f"exact_match_{name}"] = sum(picked) / len(picked)
    return scores


VQA = Task(
    name="vqa",
    default_prefix="answer en",
    reference_field="answers",
    parse=str.strip,
    score=exact_match,
    max_new_tokens=8,
)
