"""Task registry: one small module per task (prefix format, output parser, metric).

A task turns a model's decoded output into a prediction and scores predictions
against references. Look tasks up with `get_task(name)`; a typo lists the valid names.
"""

from __future__ import annotations

from pg_finetune.tasks.base import Task
from pg_finetune.tasks.caption import CAPTION
from pg_finetune.tasks.count import COUNT
from pg_finetune.tasks.detect import DETECT
from pg_finetune.tasks.vqa import VQA

TASKS: dict[str, Task] = {task.name: task for task in (CAPTION, VQA, DETECT, COUNT)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Task", "get_task"]
