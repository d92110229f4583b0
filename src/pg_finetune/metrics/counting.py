"""Counting accuracy, overall and per class (the true count), for `count_intersections`.

The parser keeps the first integer in the output, written as digits or as a word zero..ten
(`"there are two"` -> `"2"`); text without one is kept stripped and scores as wrong.
Per-class accuracy (`accuracy/<count>`) keeps "always answer the majority count" from passing
for counting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBER_RE = re.compile(r"\b(\d+|" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


def parse_count(text: str) -> str:
    """The first integer in `text` as digits (`"there are Two."` -> `"2"`), else the stripped text."""
    match = _NUMBER_RE.search(text)
    if match is None:
        return text.strip()
    word = match.group(1).lower()
    return str(NUMBER_WORDS.index(word)) if word in NUMBER_WORDS else str(int(word))


def _class_key(label: str) -> tuple[int, int | str]:
    return (0, int(label)) if label.isdigit() else (1, label)


def count_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"accuracy", "accuracy/<count>" for every count present in the references}."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"accuracy": 0.0}
    labels = [parse_count(str(refs[0])) if refs else "" for refs in references]
    correct = [label != "" and parse_count(p) == label for p, label in zip(predictions, labels, strict=True)]
    scores = {"accuracy": sum(correct) / len(correct)}
    for label in sorted(set(labels) - {""}, key=_class_key):
        picked = [c for c, lab in zip(correct, labels, strict=True) if lab == label]
        scores[f"accuracy/{label}"] = sum(picked) / len(picked)
    return scores
