"""Benchmark registry: one small module per benchmark (load, prompt, parse, score), a plain dict.

Look up with `get_benchmark(name)`; an unknown name lists the valid ones.
"""

from __future__ import annotations

from eval.benchmarks import (
    caption,
    cococap,
    count_intersections,
    detection,
    easyvqa,
    refexp,
    vqa,
    vqav2,
)
from eval.benchmarks.base import Benchmark, Scored, ScoreOptions

BENCHMARKS: dict[str, Benchmark] = {
    m.BENCHMARK.name: m.BENCHMARK
    for m in (cococap, caption, detection, refexp, vqav2, count_intersections, easyvqa, vqa)
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise SystemExit(f"error: unknown benchmark {name!r}; valid: {', '.join(sorted(BENCHMARKS))}") from None


__all__ = ["BENCHMARKS", "Benchmark", "ScoreOptions", "Scored", "get_benchmark"]
