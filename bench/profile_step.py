"""Where a training step's time goes beyond the model: cProfile over a short tiny run.

    python bench/profile_step.py [--recipe recipes/tiny/easyvqa_lora.yaml] [--steps 40] [--data distinct]

Runs `pg_finetune.train.main` (the recipe as shipped, no eval, one image per record by default) under
cProfile and prints, for the time inside `Trainer.train`: the model's forward/backward and the
optimizer against the data side (dataset reads, collator, image caches), the per-step callbacks and
our training_step's checks, then the top functions by own time. Writes the full listing to
bench/results/profile_step.txt. cProfile slows Python-heavy code more than torch ops, so the data-side
shares are upper bounds.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_easyvqa_jsonl  # noqa: E402

# (label, substring of "file:line(function)") of the parts worth separating out
PARTS = (
    ("Trainer.train (whole loop)", "trainer.py", "_inner_training_loop"),
    ("training_step (ours + Trainer)", "pg_finetune/trainer.py", "training_step"),
    ("compute_loss (forward)", "trainer.py", "compute_loss"),
    ("backward", "accelerator.py", "backward"),
    ("optimizer.step", "optimizer.py", "wrapper"),
    ("DataLoader next batch", "dataloader.py", "__next__"),
    ("collator", "pg_finetune/collator.py", "__call__"),
    ("dataset reads", "pg_finetune/data/records.py", "__getitem__"),
    ("decoded-image cache", "pg_finetune/data/image_cache.py", "get"),
    ("pixel cache key (hash)", "pg_finetune/collator.py", "_pixel_key"),
    ("image-feature cache", "pg_finetune/speed.py", "__call__"),
    ("callbacks", "trainer_callback.py", "call_event"),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/tiny/easyvqa_lora.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--data", choices=("distinct", "repeated"), default="distinct")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    from pg_finetune.train import main as train_main

    work = Path(tempfile.mkdtemp(prefix="profile_step_"))
    data = write_easyvqa_jsonl(work / f"{args.data}.jsonl", args.data)
    argv_ = ["--recipe", args.recipe, f"data.train={data}", "data.train_split=train", "data.eval_split=null",
             "eval.before_and_after=false", "data.check_images=false", f"training.max_steps={args.steps}",
             f"training.output_dir={work / 'run'}", "logging.html_report=false"]  # fmt: skip
    profile = cProfile.Profile()
    profile.enable()
    code = train_main(argv_)
    profile.disable()
    if code != 0:
        sys.exit(f"the run failed ({code})")
    stats = pstats.Stats(profile)
    cumulative = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        for label, file_part, func_name in PARTS:
            if file.endswith(file_part) or file_part in file:
                if func == func_name:
                    cumulative[label] = max(cumulative.get(label, 0.0), ct)
    loop = cumulative.get("Trainer.train (whole loop)") or 1.0
    print(f"\n{args.recipe}, {args.steps} steps, {args.data} images; cumulative seconds inside the training loop")
    for label, *_ in PARTS:
        if label in cumulative:
            print(f"  {label:<34}{cumulative[label]:>8.2f} s {100 * cumulative[label] / loop:>6.1f}%")
    listing = io.StringIO()
    pstats.Stats(profile, stream=listing).sort_stats("tottime").print_stats(40)
    print("\n".join(listing.getvalue().splitlines()[:60]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    full = io.StringIO()
    pstats.Stats(profile, stream=full).sort_stats("cumulative").print_stats(150)
    (out / "profile_step.txt").write_text(full.getvalue())
    print(f"wrote {out / 'profile_step.txt'}")


if __name__ == "__main__":
    main()
