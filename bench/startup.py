"""Start-up and whole-process times: pg-finetune against the plain notebook-style scripts.

    python bench/startup.py                 # 3 interleaved rounds, ~10 min on 2 quiet cores
    python bench/startup.py --rounds 1      # a smoke run

Every figure is a fresh process, timed from just before it is spawned (cold imports included, warm
file cache after the first round):

- "to first step": `bench/ours_train.py --recipe recipes/tiny/easyvqa_{lora,full}.yaml` (that is
  `python -m pg_finetune.train`) and `bench/notebook_train.py --method {lora,full}` (the HF notebook
  recipe), both on the same JSONL records, until the first optimiser step has ended;
- "to first answer": `python -m eval.run --benchmark easyvqa --model tiny --limit 1` and
  `bench/notebook_generate.py --limit 1` (load, one prompt, exit);
- "eval N prompts": the same two with `--limit N` (default 200), whole process; eval.run batches 16
  prompts per `generate` call, the plain script generates one at a time.

Rounds alternate ours / notebook so that load from other processes hits both alike; the table shows
the median of each side and the median over rounds of notebook / ours (above 1: ours is faster).
Writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fresh_dirs, parse_report, write_easyvqa_jsonl, write_results  # noqa: E402

BENCH = Path(__file__).resolve().parent
RECIPES = {"lora": "recipes/tiny/easyvqa_lora.yaml", "full": "recipes/tiny/easyvqa_full.yaml"}


def timed(cmd: list[str], key: str | None) -> tuple[float, dict]:
    """Seconds from spawn to the child's reported `key` time (None: to its exit), and its report."""
    cmd = fresh_dirs(cmd)
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    end = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = parse_report(done.stdout) if key else {}
    return (result[key] if key else end) - start, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--prompts", type=int, default=200, help="prompts of the whole-process eval")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    from pg_finetune.model import tiny_model_dir

    model_dir = str(tiny_model_dir("tiny"))
    work = Path(tempfile.mkdtemp(prefix="startup_"))
    data = write_easyvqa_jsonl(work / "distinct.jsonl", "distinct")
    py = sys.executable
    pairs: dict[str, tuple[tuple[list[str], str | None], tuple[list[str], str | None]]] = {}
    for method in args.methods.split(","):
        ours = [py, str(BENCH / "ours_train.py"), "--recipe", RECIPES[method], f"data.train={data}",
                "data.train_split=train", "data.eval_split=null", "eval.before_and_after=false",
                "data.check_images=false", "training.max_steps=2", f"training.output_dir={work / 'ours-RUN'}",
                "logging.html_report=false"]  # fmt: skip
        notebook = [py, str(BENCH / "notebook_train.py"), "--data", str(data), "--model", model_dir, "--method", method,
                    "--max-steps", "2", "--output-dir", str(work / "notebook-RUN")]  # fmt: skip
        pairs[f"{method}: to first step"] = ((ours, "first_step_end"), (notebook, "first_step_end"))
    for limit, label in ((1, "to first answer"), (args.prompts, f"eval {args.prompts} prompts")):
        ours = [py, "-m", "eval.run", "--benchmark", "easyvqa", "--model", "tiny", "--limit", str(limit), "--quiet",
                "--out", str(work / "eval-RUN")]  # fmt: skip
        notebook = [py, str(BENCH / "notebook_generate.py"), "--model", model_dir, "--limit", str(limit)]
        pairs[label] = ((ours, None), (notebook, None))

    times: dict[str, dict[str, list[float]]] = {label: {"ours": [], "notebook": []} for label in pairs}
    bnb: dict[str, bool] = {}
    for round_ in range(args.rounds):
        for label, sides in pairs.items():
            for side, (cmd, key) in zip(("ours", "notebook"), sides, strict=True):
                seconds, result = timed(cmd, key)
                times[label][side].append(seconds)
                if "imported_bitsandbytes" in result:
                    bnb[f"{label} / {side}"] = result["imported_bitsandbytes"]
                print(f"round {round_ + 1}: {label:<22}{side:<9}{seconds:>7.2f} s", flush=True)

    rows = []
    print(f"\n{'measure':<24}{'ours s':>8}{'notebook s':>12}{'notebook/ours':>15}  per round")
    for label, t in times.items():
        ratios = [n / o for o, n in zip(t["ours"], t["notebook"], strict=True)]
        row = dict(measure=label, ours_s=t["ours"], notebook_s=t["notebook"], ratios=ratios,
                   median_ratio=statistics.median(ratios))
        rows.append(row)
        print(f"{label:<24}{statistics.median(t['ours']):>8.2f}{statistics.median(t['notebook']):>12.2f}"
              f"{row['median_ratio']:>14.2f}x  " + ", ".join(f"{r:.2f}" for r in ratios))
    print("bitsandbytes imported: " + ", ".join(f"{k}: {v}" for k, v in bnb.items()))
    meta = dict(rounds=args.rounds, prompts=args.prompts, statistic="median over rounds of notebook/ours seconds within a round")
    write_results(args.out, "startup", meta, rows=rows, bitsandbytes_imported=bnb)


if __name__ == "__main__":
    main()
