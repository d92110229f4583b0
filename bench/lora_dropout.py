"""Does `tuning.lora_dropout` help the tiny LoRA/QLoRA recipes? Held-out score, dropout 0.05 vs 0, three seeds.

    python bench/lora_dropout.py                                   # full recipes, ~12 runs
    python bench/lora_dropout.py --seeds 1,2 --overrides training.max_steps=100   # shorter

Each run is `python -m pg_finetune.train --recipe R tuning.lora_dropout=D training.seed=S` (plus any
`--overrides`) in its own process and output directory under --work; the figure is the task
metric after training on eval.max_samples held-out records (the recipe's data.eval_split) and the
held-out loss. Runs alternate dropout values within each seed, so load on a shared machine hits
both alike. Prints a table (mean and each seed) and writes bench/results/lora_dropout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ("recipes/tiny/easyvqa_lora.yaml", "recipes/tiny/easyvqa_qlora.yaml")


def headline(after: dict | None) -> tuple[str, float] | None:
    """The metric's main number: the first numeric entry of the 'after' scores."""
    if not after:
        return None
    for key, value in after.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            return key, float(value)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--dropouts", default="0.05,0.0")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--eval-samples", type=int, default=1000, help="eval.max_samples (the recipes use 200)")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra recipe overrides, e.g. training.max_steps=100")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the runs (scores do not depend on it; 1 keeps a shared machine usable)")
    parser.add_argument("--work", default=None, help="output directories (default: a temporary directory)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="lora_dropout_"))
    dropouts = [float(d) for d in args.dropouts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    rows = []
    for recipe in args.recipes.split(","):
        for seed in seeds:
            for dropout in dropouts:
                out_dir = work / f"{Path(recipe).stem}_d{dropout}_s{seed}"
                cmd = [sys.executable, "-m", "pg_finetune.train", "--recipe", recipe,
                       f"tuning.lora_dropout={dropout}", f"training.seed={seed}", f"training.output_dir={out_dir}",
                       f"eval.max_samples={args.eval_samples}", "logging.html_report=false", *args.overrides]
                start = time.perf_counter()
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                log = out_dir.parent / f"{out_dir.name}.log"  # the run's own output, to follow or debug
                with log.open("w") as stream:
                    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
                    done = subprocess.run(cmd, stdout=stream, stderr=subprocess.STDOUT, env=env)
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{log.read_text()[-3000:]}")
                metrics = json.loads((out_dir / "metrics.json").read_text())
                key, score = headline(metrics["after"])
                row = dict(recipe=recipe, dropout=dropout, seed=seed, metric=key, score=score,
                           eval_loss=metrics["eval_loss_after"], train_loss=metrics["train_loss"],
                           steps=metrics["steps"], samples_per_s=metrics["train_samples_per_second"],
                           wall_s=round(wall, 1))
                rows.append(row)
                print(f"{Path(recipe).stem:<16} dropout {dropout:<5} seed {seed}: {key} {score:.4f}  "
                      f"eval loss {row['eval_loss']:.4f}  {row['samples_per_s']} samples/s  ({wall:.0f} s)",
                      flush=True)

    print(f"\n{'recipe':<18}{'dropout':>8}{'score mean':>12}{'eval loss':>11}{'samples/s':>11}  scores by seed")
    summary = []
    for recipe in args.recipes.split(","):
        for dropout in dropouts:
            mine = [r for r in rows if r["recipe"] == recipe and r["dropout"] == dropout]
            entry = dict(recipe=recipe, dropout=dropout, metric=mine[0]["metric"],
                         score_mean=statistics.mean(r["score"] for r in mine),
                         eval_loss_mean=statistics.mean(r["eval_loss"] for r in mine),
                         samples_per_s_median=statistics.median(r["samples_per_s"] for r in mine),
                         scores=[r["score"] for r in mine])
            summary.append(entry)
            print(f"{Path(recipe).stem:<18}{dropout:>8}{entry['score_mean']:>12.4f}{entry['eval_loss_mean']:>11.4f}"
                  f"{entry['samples_per_s_median']:>11.1f}  " + ", ".join(f"{s:.4f}" for s in entry["scores"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), seeds=seeds, eval_samples=args.eval_samples,
                overrides=args.overrides)
    path = out / "lora_dropout.json"
    path.write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
