"""Task registry: one module (or small package) per task, a plain dict.

A task owns its prompt format, output parser, references, metrics, report drawing and training
augmentation (`pg_finetune.tasks.base.Task`). Look tasks up with `get_task(name)`; a typo lists
the valid names. Adding a task: one module that builds a `Task`, one line here.
"""

from __future__ import annotations

from pg_finetune.tasks.base import Drawn, Metric, Scored, ScoreOptions, Task
from pg_finetune.tasks.caption import CAPTION
from pg_finetune.tasks.count import COUNT
from pg_finetune.tasks.detect import DETECT
from pg_finetune.tasks.ocr import OCR
from pg_finetune.tasks.segment import SEGMENT
from pg_finetune.tasks.vqa import VQA

TASKS: dict[str, Task] = {task.name: task for task in (CAPTION, VQA, DETECT, COUNT, OCR, SEGMENT)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Drawn", "Metric", "ScoreOptions", "Scored", "Task", "get_task"]
