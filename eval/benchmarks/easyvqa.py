"""`easyvqa`: the easy-VQA questions that ship with the `easy-vqa` package (offline), exact match.

    python -m eval.run --benchmark easyvqa --model runs/tiny_easyvqa_full/final --limit 500

Data: `builtin:easyvqa`, split `test` (`pg_finetune.data`). Scored as the `vqa` benchmark.
"""

from __future__ import annotations

from dataclasses import replace

from eval.benchmarks.vqa import BENCHMARK as VQA

BENCHMARK = replace(
    VQA, name="easyvqa", description="easy-VQA shapes (offline), exact match", source="builtin:easyvqa", split="test"
)
