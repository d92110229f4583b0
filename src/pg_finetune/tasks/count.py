"""Line-intersection counting ("Vision language models are blind", Rahmanzadehgervi et al. 2024).

Prefix `count the intersections`, suffix the count as digits (`"2"`); records made by
`data_prep/make_count_intersections.py` also carry the count as an int in `count`, the reference field.
The parser keeps the first integer in the output, written as digits or as a word zero..ten
(`"there are two"` -> `"2"`); text without one is kept stripped and scores as wrong.
Metrics: `accuracy`, then `accuracy/<count>` for every count present in the references, so that
always answering the majority count is not mistaken for counting.
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
