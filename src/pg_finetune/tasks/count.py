"""Line-intersection counting ("Vision language models are blind", Rahmanzadehgervi et al. 2024).

Prefix `count the intersections`, suffix the count as digits (`"2"`); records made by
`data_prep/make_count_intersections.py` also carry the count as an int in `count`, the reference
field (else the `suffix`). The parser reads an output that is, as a whole, one non-negative
integer (digits, or a word zero..ten / none, surrounding spaces and punctuation ignored:
`" Two."` -> `"2"`); anything else (`"-1"`, `"1.5"`, `"3 or 4"`, `"there are two"`) is kept
stripped and scores as wrong (`pg_finetune.metrics.counting`).
Metrics: `accuracy`, then `accuracy/<count>` for every count present in the references, so that
always answering the majority count is not mistaken for counting, and `invalid_rate` (malformed
answers). Reports draw a confusion matrix (true count x answered count).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pg_finetune.metrics.counting import NUMBER_WORDS, count_accuracy, parse_count, read_count
from pg_finetune.tasks.base import Metric, Scored, ScoreOptions, Task

__all__ = ["COUNT", "NUMBER_WORDS", "confusion_matrix", "count_accuracy", "parse_count"]


def _reference(record: dict) -> list[str]:
    """`[count as digits]` from `count` (an int or a string) or the `suffix`; ValueError if it is not a count."""
    count = record.get("count", record.get("suffix"))
    if count is None:
        raise KeyError("no 'count' (or 'suffix') field")
    if isinstance(count, list) and len(count) == 1:
        count = count[0]
    if isinstance(count, bool) or not isinstance(count, int | str):
        raise ValueError(f"'count' must be a non-negative integer, got {count!r}")
    label = read_count(str(count))
    if label is None:
        raise ValueError(f"'count' must be a non-negative integer, got {count!r}")
    return [str(label)]


def _score(predictions: Sequence[str], references: Sequence[list[str]], options: ScoreOptions) -> Scored:
    return Scored(count_accuracy(predictions, references))


def confusion_matrix(rows: Sequence[dict]) -> tuple[list[str], list[str], Counter]:
    """(true labels, predicted labels, Counter[(true, predicted)]) of prediction rows
    (`{"prediction", "references"}`). Labels are counts as digits, read as the metric reads them;
    an answer that is not a count is counted under "other"."""

    def label(text: str) -> str:
        count = read_count(text)
        return "other" if count is None else str(count)

    cells: Counter = Counter()
    for row in rows:
        truth = label(str(row["references"][0])) if row["references"] else "other"
        cells[(truth, label(row["prediction"]))] += 1

    def order(label: str) -> tuple[int, int | str]:
        return (0, int(label)) if label.isdigit() else (1, label)

    truths = sorted({t for t, _ in cells}, key=order)
    predicted = sorted({p for _, p in cells} | set(truths), key=order)
    return truths, predicted, cells


COUNT_ACCURACY = Metric(
    name="count_accuracy",
    reference=_reference,
    score=_score,
    example_label="correct",
    binary=True,
    references_help='{"id": ..., "count": 2} (or "suffix")',
)

COUNT = Task(
    name="count_intersections",
    default_prefix="count the intersections",
    metric=COUNT_ACCURACY,
    parse=parse_count,
    max_new_tokens=4,
    confusion=confusion_matrix,
)
