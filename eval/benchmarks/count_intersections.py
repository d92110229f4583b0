"""`count_intersections`: count line intersections ("VLMs are blind"), accuracy overall and per class.

    python data_prep/make_count_intersections.py --out data/count_intersections --split test --seed 1 --num 200
    python -m eval.run --benchmark count_intersections --model runs/x/final

Data: `data/count_intersections` split `test` by default (`{split}.jsonl`), or --data.
References: `{"id": ..., "count": 2}` (or `suffix`). Metrics: accuracy, accuracy/<count>.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from eval.benchmarks.base import Benchmark, Scored, ScoreOptions, load_jsonl_records
from pg_finetune.data import RecordDataset
from pg_finetune.metrics.counting import count_accuracy, read_count

DEFAULT_SOURCE = "data/count_intersections"


def load(source: str, split: str, **kwargs) -> RecordDataset:
    if source == DEFAULT_SOURCE and not Path(source).exists():
        raise ValueError(
            f"{source} does not exist; make it with `python data_prep/make_count_intersections.py --out {source} "
            "--split test --seed 1 --num 200`, or pass --data"
        )
    return load_jsonl_records(source, split, **kwargs)


def reference(record: dict) -> str:
    count = record.get("count", record.get("suffix"))
    if count is None:
        raise KeyError("no 'count' (or 'suffix') field")
    if isinstance(count, bool) or not isinstance(count, int | str):
        raise ValueError(f"'count' must be an integer, got {count!r}")
    label = read_count(str(count))
    if label is None:
        raise ValueError(f"'count' must be a non-negative integer, got {count!r}")
    return str(label)


def score(predictions: Sequence[str], references: Sequence[str], options: ScoreOptions) -> Scored:
    return Scored(count_accuracy(predictions, [[r] for r in references]))


BENCHMARK = Benchmark(
    name="count_intersections",
    description="line-intersection counting, accuracy and per-class accuracy",
    task="count_intersections",
    source=DEFAULT_SOURCE,
    split="test",
    references_help='{"id": ..., "count": 2} (or "suffix")',
    reference=reference,
    score=score,
    load=load,
)
