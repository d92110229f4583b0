"""Line-intersection counting ("Vision language models are blind", Rahmanzadehgervi et al. 2024).

Prefix `count the intersections`, suffix the count as digits (`"2"`); records made by
`data_prep/make_count_intersections.py` also carry the count as an int in `count`, the reference field.
The parser reads an output that is, as a whole, one non-negative integer (digits, or a word
zero..ten / none, surrounding spaces and punctuation ignored: `" Two."` -> `"2"`); anything else
(`"-1"`, `"1.5"`, `"3 or 4"`, `"there are two"`) is kept stripped and scores as wrong
(`pg_finetune.metrics.counting`).
Metrics: `accuracy`, then `accuracy/<count>` for every count present in the references, so that
always answering the majority count is not mistaken for counting, and `invalid_rate` (malformed answers).
"""

from __future__ import annotations

from dataclasses import dataclass

from pg_finetune.metrics.counting import NUMBER_WORDS, count_accuracy, parse_count
from pg_finetune.tasks.base import Task

__all__ = ["COUNT", "NUMBER_WORDS", "CountTask", "count_accuracy", "parse_count"]


@dataclass(frozen=True)
class CountTask(Task):
    """A Task whose reference field may hold a bare int (`{"count": 2}`), scored as `["2"]`."""

    def references(self, record: dict) -> list[str]:
        refs = record.get(self.reference_field)
        if isinstance(refs, int) and not isinstance(refs, bool):
            return [str(refs)]
        return [str(ref) for ref in super().references(record)]


COUNT = CountTask(
    name="count_intersections",
    default_prefix="count the intersections",
    reference_field="count",
    parse=parse_count,
    score=count_accuracy,
    max_new_tokens=4,
)
