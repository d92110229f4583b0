"""Shared pieces of the process-level benchmarks (startup.py, train_throughput.py): data files, a step
clock that needs no transformers import, and the `BENCH {json}` line a child process reports with."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

BENCH_PREFIX = "BENCH "


def _noop(*args, **kwargs):
    return None


class StepClock:
    """A duck-typed TrainerCallback (the Trainer only calls its `on_*` methods): wall-clock time of
    the first optimiser step's end. Duck-typed so that the clock imports nothing itself: importing
    `transformers.TrainerCallback` would load the Trainer stack early and distort a start-up figure."""

    def __init__(self) -> None:
        self.first_step_end: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_end is None:
            self.first_step_end = time.time()

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return _noop
        raise AttributeError(name)


_runs = 0


def fresh_dirs(cmd: list[str]) -> list[str]:
    """`cmd` with "RUN" in its output paths replaced by a new number: every run writes a new directory
    (pg_finetune.train does not train again a run that its output_dir shows as complete)."""
    global _runs
    _runs += 1
    return [arg.replace("-RUN", f"-{_runs}") for arg in cmd]


def report(**fields) -> None:
    print(BENCH_PREFIX + json.dumps(fields), flush=True)


def parse_report(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(BENCH_PREFIX)]
    if not lines:
        raise RuntimeError(f"no {BENCH_PREFIX.strip()} line in the output:\n{stdout[-2000:]}")
    return json.loads(lines[-1][len(BENCH_PREFIX):])


def write_easyvqa_jsonl(path: Path, kind: str, limit: int = 4000) -> Path:
    """easy-VQA training questions as JSONL (`image` absolute, `prefix`, `suffix`).

    kind "repeated": the first `limit` questions, several per image (about 9.6 per image in easy-VQA,
    what `builtin:easyvqa` with `train[:4000]` gives); kind "distinct": one question per image, so
    every record has its own image and no image cache can hit within an epoch.
    """
    from easy_vqa import get_train_image_paths, get_train_questions

    questions, answers, image_ids = get_train_questions()
    paths = get_train_image_paths()
    rows, seen = [], set()
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        if kind == "distinct":
            if image_id in seen:
                continue
            seen.add(image_id)
        elif kind != "repeated":
            raise ValueError(f"kind must be 'repeated' or 'distinct', got {kind!r}")
        rows.append({"image": str(Path(paths[image_id]).resolve()), "prefix": f"answer en {question}", "suffix": answer})
        if len(rows) == limit:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_results(out: str | Path, name: str, meta: dict, **payload) -> Path:
    """`{"meta": {date, machine, cpu_count, **meta}, **payload}` as `out/name.json`; prints where."""
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "cpu_count": os.cpu_count(), **meta}
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **payload}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
