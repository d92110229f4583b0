"""Test hooks for the training entry, passed through `pg_finetune.train.main`'s injection points.

In process:

    main(args, callbacks=[KillAtStepCallback(3)], wrap_collator=lambda c: TracingCollator(c, "t.jsonl"))

In a subprocess (a real SIGKILL must not take pytest down with it), this file is the runner:

    python tests/hooks.py --kill-at-step 3 --trace-batches t.jsonl -- --recipe r.yaml training.max_steps=7
    python tests/hooks.py --kill-in-final-save -- --recipe r.yaml   # dies with final/'s weights half saved
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

import pg_finetune.train
from pg_finetune.train import main


class KillAtStepCallback(TrainerCallback):
    """The process really dies by SIGKILL after optimizer step `step` (before any save of that step)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class TracingCollator:
    """Collate, then append `{"ids", "texts"}` of the batch to a JSONL file (flushed per batch).

    The Trainer's dataloader collates one batch ahead of the step that consumes it, so a trace
    holds every consumed batch in order plus at most one prefetched batch at its end.
    """

    def __init__(self, collator, path: str):
        self.collator, self.path = collator, path

    def __getattr__(self, name: str):
        return getattr(self.collator, name)

    def __call__(self, records: list[dict | None]) -> dict:
        batch = self.collator(records)
        kept = [r for r in records if r is not None]
        line = {"ids": [r.get("id") for r in kept], "texts": [f"{r['prefix']}\n{r['suffix']}" for r in kept]}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return batch


def run_with_hooks(argv: list[str]) -> int:
    """`[hook options] -- [train arguments]`: run `main` with the hooks the options ask for."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python tests/hooks.py", allow_abbrev=False)
    parser.add_argument("--kill-at-step", type=int, help="SIGKILL the process at the end of this step")
    parser.add_argument("--trace-batches", help="append each collated batch's records to this JSONL file")
    parser.add_argument("--kill-in-final-save", action="store_true",
                        help="SIGKILL the process while it writes final/ (weights written, recipe not yet)")
    hooks = parser.parse_args(argv[:split])
    if hooks.kill_in_final_save:
        save_recipe = pg_finetune.train.save_recipe

        def kill_while_writing_final(recipe, path):
            if Path(path).name == "tmp-final":
                os.kill(os.getpid(), signal.SIGKILL)
            return save_recipe(recipe, path)

        pg_finetune.train.save_recipe = kill_while_writing_final
    callbacks = [KillAtStepCallback(hooks.kill_at_step)] if hooks.kill_at_step is not None else []
    trace = hooks.trace_batches
    wrap_collator = (lambda collator: TracingCollator(collator, trace)) if trace else None
    return main(argv[split + 1 :], callbacks=callbacks, wrap_collator=wrap_collator)


if __name__ == "__main__":
    sys.exit(run_with_hooks(sys.argv[1:]))
