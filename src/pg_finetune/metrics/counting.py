"""Counting accuracy, overall and per class (the true count), for `count_intersections`.

An answer counts only when the whole of it is one non-negative integer: ASCII digits (`"3"`,
`"03"`) or a number word `zero`..`ten` or `none` (= 0), in any case, with surrounding spaces and
punctuation ignored (`" Two."`, `"(3)"`, `"'none'"`). Anything else is malformed and scores as
wrong: a sign or a decimal point belongs to the number (`"-1"`, `"+2"`, `"1.5"`, `".5"`), and
more than one word is not one count (`"3 or 4"`, `"there are two"`).
Per-class accuracy (`accuracy/<count>`) keeps "always answer the majority count" from passing
for counting; `invalid_rate` is the share of answers that are not a count (malformed).
"""

from __future__ import annotations

import string
from collections.abc import Sequence

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_WORD_VALUES = {**{w: k for k, w in enumerate(NUMBER_WORDS)}, "none": 0}
_DIGITS = frozenset("0123456789")
# Punctuation that may surround an answer; on the left not a sign or a decimal point, which would
# change the number ("-1", ".5"), on the right anything ("2.", "3)").
_RIGHT_STRIP = string.whitespace + string.punctuation
_LEFT_STRIP = "".join(c for c in _RIGHT_STRIP if c not in "+-.")


def read_count(text: str) -> int | None:
    """The count `text` states as a whole (see the module docstring), or None when it is malformed."""
    core = text.rstrip(_RIGHT_STRIP).lstrip(_LEFT_STRIP)
    if core and set(core) <= _DIGITS:
        return int(core)
    return _WORD_VALUES.get(core.lower())


def parse_count(text: str) -> str:
    """The count as digits (`" Two."` -> `"2"`), else the stripped text (malformed: scores as wrong)."""
    count = read_count(text)
    return str(count) if count is not None else text.strip()


def count_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"accuracy", "accuracy/<count>" for every count present in the references, "invalid_rate"}.

    A reference that is not a count raises ValueError (it is a data error, not a wrong answer);
    an example without any reference scores as wrong and has no class."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"accuracy": 0.0}
    labels: list[int | None] = []
    for refs in references:
        label = read_count(str(refs[0])) if refs else None
        if refs and label is None:
            raise ValueError(f"reference {refs[0]!r} is not a count (a non-negative integer)")
        labels.append(label)
    answers = [read_count(p) for p in predictions]
    correct = [label is not None and answer == label for answer, label in zip(answers, labels, strict=True)]
    scores = {"accuracy": sum(correct) / len(correct)}
    for label in sorted({lab for lab in labels if lab is not None}):
        picked = [c for c, lab in zip(correct, labels, strict=True) if lab == label]
        scores[f"accuracy/{label}"] = sum(picked) / len(picked)
    scores["invalid_rate"] = sum(a is None for a in answers) / len(answers)
    return scores
