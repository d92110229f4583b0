"""How fast the issue #18 targets allow us to be: the work every side shares, measured.

    python bench/ceiling.py                  # 3 interleaved rounds, ~6 min on 2 quiet cores
    python bench/ceiling.py --rounds 1 --steps 40 --prompts 20   # a smoke run

A ratio "ours / notebook" cannot exceed "notebook / what ours cannot avoid". This measures that floor
beside the notebook baseline and pg-finetune as shipped, in the same rounds:

- **eval**: the floor of a whole-process eval with transformers is a process that only imports
  `torch` and transformers' PaliGemma classes (what bench/notebook_generate.py and `eval.run` both
  import; transformers itself imports torch.distributed, torch._dynamo and scipy on the way).
  Ceiling = notebook seconds / floor seconds, for `--prompts` prompts.
- **training**, per tiny recipe as shipped: the model's own work per step, nothing else. In this
  process: the recipe's model and tuning (`load_model` + `apply_tuning`), batches collated beforehand
  from the same one-image-per-record JSONL, then per step only `suffix_loss` forward, backward,
  `clip_grad_norm_`, the fused AdamW step and `zero_grad`: no data loading, no collation, no Trainer.
  Ceiling = those samples/s / the notebook process's Trainer-reported samples/s (bench/notebook_train.py,
  its own defaults, the same data and steps).

Rounds alternate the sides so that load from other processes hits them alike; every ratio is the
median over rounds of the ratio within a round. Writes bench/results/ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_easyvqa_jsonl, write_results  # noqa: E402
from startup import timed  # noqa: E402
from train_throughput import RECIPES, process_commands, run_child  # noqa: E402

BENCH = Path(__file__).resolve().parent
FLOOR = "import torch; from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor"


def model_only(method: str, data: Path, steps: int) -> float:
    """Samples/s of the recipe's model doing only forward, backward, clipping and the optimizer step."""
    from pg_finetune.collator import PaliGemmaCollator
    from pg_finetune.images import open_image
    from pg_finetune.model import load_model, load_processor
    from pg_finetune.recipe import load_recipe
    from pg_finetune.speed import suffix_loss
    from pg_finetune.tuning import apply_tuning

    recipe = load_recipe(RECIPES[method])
    torch.manual_seed(recipe.training.seed)
    model = apply_tuning(load_model(recipe.model, recipe.tuning), recipe.tuning).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.training.learning_rate,
                                  weight_decay=recipe.training.weight_decay, fused=True)  # fmt: skip
    collate = PaliGemmaCollator(load_processor(recipe.model.name_or_path), max_length=recipe.data.max_length,
                                pixel_cache_mb=0)  # fmt: skip
    batch_size = recipe.training.per_device_train_batch_size
    rows = [json.loads(line) for line in data.read_text().splitlines()][: (steps + 2) * batch_size]
    records = [{"image": open_image(r["image"]), "prefix": r["prefix"], "suffix": r["suffix"]} for r in rows]
    batches = [collate(records[i : i + batch_size]) for i in range(0, len(records), batch_size)]
    times = []
    for batch in batches:
        start = time.perf_counter()
        loss = suffix_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch_size * len(times[2:]) / sum(times[2:])  # as the Trainer reports: samples / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="training steps per run, every side")
    parser.add_argument("--prompts", type=int, default=200, help="prompts of the whole-process eval")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    from pg_finetune.model import tiny_model_dir

    work = Path(tempfile.mkdtemp(prefix="ceiling_"))
    data = write_easyvqa_jsonl(work / "distinct.jsonl", "distinct")
    py = sys.executable
    evals = {
        "notebook": [py, str(BENCH / "notebook_generate.py"), "--model", str(tiny_model_dir("tiny")),
                     "--limit", str(args.prompts)],
        "ours": [py, "-m", "eval.run", "--benchmark", "easyvqa", "--model", "tiny", "--limit", str(args.prompts),
                 "--quiet", "--out", str(work / "eval-RUN")],
        "floor": [py, "-c", FLOOR],
    }  # fmt: skip
    methods = args.methods.split(",")
    seconds: dict[str, list[float]] = {name: [] for name in evals}
    sps: dict[str, dict[str, list[float]]] = {m: {"notebook": [], "ours": [], "model only": []} for m in methods}
    for round_ in range(args.rounds):
        for name, cmd in evals.items():
            seconds[name].append(timed(cmd, None)[0])
            print(f"round {round_ + 1}: eval {args.prompts} prompts {name:<10}{seconds[name][-1]:>8.2f} s", flush=True)
        for method in methods:
            commands = process_commands(method, data, work, args.steps)
            for name in ("notebook", "ours", "model only"):
                value = (model_only(method, data, args.steps) if name == "model only"
                         else run_child(commands[name])["samples_per_s"])  # fmt: skip
                sps[method][name].append(value)
                print(f"round {round_ + 1}: {method:<5}{name:<12}{value:>8.1f} samples/s", flush=True)

    def ratios(top: list[float], bottom: list[float]) -> dict:
        each = [t / b for t, b in zip(top, bottom, strict=True)]
        return {"per_round": each, "median": statistics.median(each)}

    eval_row = {"seconds": seconds, "ours_vs_notebook": ratios(seconds["notebook"], seconds["ours"]),
                "ceiling": ratios(seconds["notebook"], seconds["floor"])}  # fmt: skip
    train_rows = {m: {"samples_per_s": s, "ours_vs_notebook": ratios(s["ours"], s["notebook"]),
                      "ceiling": ratios(s["model only"], s["notebook"])} for m, s in sps.items()}  # fmt: skip

    print(f"\n{'measure':<28}{'notebook':>10}{'ours':>10}{'floor':>10}{'ours/nb':>9}{'ceiling':>9}")
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"{f'eval {args.prompts} prompts (s)':<28}{med['notebook']:>10.2f}{med['ours']:>10.2f}{med['floor']:>10.2f}"
          f"{eval_row['ours_vs_notebook']['median']:>8.2f}x{eval_row['ceiling']['median']:>8.2f}x")
    for method, row in train_rows.items():
        med = {k: statistics.median(v) for k, v in row["samples_per_s"].items()}
        print(f"{f'train {method} (samples/s)':<28}{med['notebook']:>10.1f}{med['ours']:>10.1f}{med['model only']:>10.1f}"
              f"{row['ours_vs_notebook']['median']:>8.2f}x{row['ceiling']['median']:>8.2f}x")
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), rounds=args.rounds, steps=args.steps,
                prompts=args.prompts, floor=FLOOR, statistic="median over rounds of the ratio within a round")
    write_results(args.out, "ceiling", meta, eval=eval_row, train=train_rows)


if __name__ == "__main__":
    main()
