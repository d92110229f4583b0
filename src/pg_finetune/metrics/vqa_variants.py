"""VQA metrics of document, chart and multiple-choice benchmarks, as big_vision's PaliGemma
evaluators compute them (`big_vision/evaluators/proj/paligemma/transfers/`).

- `anls` (DocVQA, InfoVQA): `metrics.text.anls_each`, per question the best over references of
  1 - NL if NL < 0.5 else 0, both strings lower-cased and stripped (big_vision's `vqa.anls_metric`
  with `to_lower=True`).
- `relaxed_accuracy` (ChartQA, `chartqa._relaxed_match`): both texts lower-cased (the ChartQA
  config sets `to_lower=True`) and stripped; a text is a number when Python's `float` reads it,
  after a trailing "%" is dropped and the value divided by 100 ("50%" reads 0.5). When the
  prediction is a number and the reference a non-zero number, a relative error <= 5% is correct;
  otherwise the texts must be equal. As there, "1,000" is no number (`float` refuses the comma), so
  it must match exactly, and a reference of 0 needs an exact match ("0.0" is wrong for "0").
  With several references the best one counts (big_vision has one).
- `multiple_choice_accuracy` (AI2D, ScienceQA, `science_qa.Evaluator.postproc`): texts lower-cased
  and stripped; a reference written "The answer is B." (ScienceQA's answer format, possibly with
  "BECAUSE: ..." after it) is the letter b, and the prediction must be written the same way to
  match it; any other reference (AI2D's option text) must equal the prediction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pg_finetune.metrics.text import anls_each

RELAXED_TOLERANCE = 0.05  # ChartQA (Masry et al. 2022, section 5.1): within 5% of the gold number
_LETTER_ANSWER = re.compile(r"the answer is ([a-z])\.")  # ScienceQA's "The answer is B." (matched at start)


def _check(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def anls_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"anls": mean per-question ANLS}."""
    _check(predictions, references)
    return {"anls": _mean(anls_each(predictions, references))}


def to_float(text: str) -> float | None:
    """The number `text` writes, as big_vision's ChartQA `_to_float` reads it; None when none."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, reference: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed correctness of one prediction against one reference (module docstring)."""
    prediction, reference = prediction.strip().lower(), reference.strip().lower()
    predicted, target = to_float(prediction), to_float(reference)
    if predicted is not None and target:  # a target of 0 always needs an exact match
        return abs(predicted - target) / abs(target) <= tolerance
    return prediction == reference


def relaxed_accuracy_each(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    _check(predictions, references)
    return [
        float(any(relaxed_match(p, r) for r in refs)) for p, refs in zip(predictions, references, strict=True)
    ]


def relaxed_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"relaxed_accuracy", "exact_match"}: big_vision's ChartQA `relaxed_acc` and `acc`."""
    _check(predictions, references)
    exact = [
        float(p.strip().lower() in {r.strip().lower() for r in refs})
        for p, refs in zip(predictions, references, strict=True)
    ]
    return {
        "relaxed_accuracy": _mean(relaxed_accuracy_each(predictions, references)),
        "exact_match": _mean(exact),
    }


def choice(text: str) -> tuple[str, bool]:
    """(normalised option, whether it is a letter read from "The answer is X.")."""
    text = text.strip().lower()
    match = _LETTER_ANSWER.match(text)
    return (match.group(1), True) if match else (text, False)


def choice_correct(prediction: str, references: Sequence[str]) -> bool:
    predicted = choice(prediction)
    return any(predicted == choice(r) for r in references)


def multiple_choice_each(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    _check(predictions, references)
    return [float(choice_correct(p, refs)) for p, refs in zip(predictions, references, strict=True)]


def multiple_choice_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    question_types: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """{"accuracy", "accuracy/<question type>"...}; the per-type means only for examples with a type
    (types such as `yes/no` are written `yes_no`, as VQAv2's answer types)."""
    _check(predictions, references)
    correct = multiple_choice_each(predictions, references)
    scores = {"accuracy": _mean(correct)}
    if question_types is not None:
        _check(correct, question_types)
        by_type: dict[str, list[float]] = {}
        for value, kind in zip(correct, question_types, strict=True):
            if kind:
                by_type.setdefault(kind.replace("/", "_").replace(" ", "_"), []).append(value)
        for kind in sorted(by_type):
            scores[f"accuracy/{kind}"] = _mean(by_type[kind])
    return scores
