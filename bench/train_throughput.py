"""Training throughput of the tiny recipes against the HF notebook recipe.

    python bench/train_throughput.py                      # processes: ours vs notebook, ~25 min on 2 quiet cores
    python bench/train_throughput.py --rounds 1 --steps 30   # a smoke run (~5 min)
    python bench/train_throughput.py --mode steps         # in-process breakdown of our speed-ups, per step

--mode process (the default; the figure the README quotes): whole training processes, as users run
them. "ours" is `python -m pg_finetune.train --recipe recipes/tiny/easyvqa_{lora,full}.yaml` as
shipped (via bench/ours_train.py); "notebook" is bench/notebook_train.py, the HF notebook recipe with
the Trainer's defaults as a user gets them (its own LoRA r=8 on q/k/v/o/gate/up/down without dropout,
or a decoder-only full fine-tune; the optimizer the Trainer picks; torch's default threads);
"notebook matched" is the same script with the recipe's adapters, dropout, optimizer and trained
parts, so only the pipeline differs. Both read the same JSONL records: "distinct" has one image per
record (4000 easy-VQA images, one question each: no image cache hits within an epoch), "repeated"
the first 4000 questions (~10 per image, what the tiny recipes train on). The figure is the
Trainer-reported train samples/s of each process (`--steps` steps, batch 16, default threads); the
runs alternate (ours, notebook, notebook matched, ours, ...) for `--rounds` rounds, and the table
gives the median over rounds of ours / notebook within a round. Writes
bench/results/train_throughput.json.

--mode steps: in one process, each variant with its own copy of the same model (same seed), the same
batches in the same order, the same optimizer (the fused AdamW the Trainer picks with torch >= 2.8;
`--optim forloop` for `optim: adamw_torch` on CPU) and the same number of steps:

- baseline:   the collator of the usual HF blog/notebook recipe (the full
              `PaliGemmaProcessor(images=, text=, suffix=)` every step) and `model(**batch).loss`;
- +collator:  `PaliGemmaCollator` with its pixel cache off, still `model(**batch).loss`;
- +pixel cache: `PaliGemmaCollator` as train.py builds it (content-keyed pixel_values cache on);
- +suffix_loss: the same collator + `pg_finetune.speed.suffix_loss` (logits at label positions only);
- +image cache: + the dataset's decoded-image cache (`load_records(..., image_cache_mb=256)`, the
              default: many questions share an image);
- ours:       + `suffix_loss(..., image_features=ImageFeatureCache())`: a frozen vision tower's
              output computed once per distinct image (all four methods here freeze it, as
              `TuningConfig`'s defaults do; the cache is bypassed when it trains).

Records are read through the dataset every step, as the Trainer's DataLoader does. The variants run
interleaved, one step each in turn, and the figure is the median step time. A second table times
`optimizer.step()` alone for the for-loop, foreach and fused AdamW. Writes
bench/results/train_steps.json. Numbers, not pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pg_finetune.collator import PaliGemmaCollator
from pg_finetune.data import load_records
from pg_finetune.model import load_model, load_processor
from pg_finetune.recipe import ModelConfig, TuningConfig
from pg_finetune.speed import ImageFeatureCache, suffix_loss
from pg_finetune.tuning import apply_tuning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fresh_dirs, parse_report, write_easyvqa_jsonl, write_results  # noqa: E402

BENCH = Path(__file__).resolve().parent
RECIPES = {"lora": "recipes/tiny/easyvqa_lora.yaml", "full": "recipes/tiny/easyvqa_full.yaml"}

VARIANTS = ("baseline", "+collator", "+pixel cache", "+suffix_loss", "+image cache", "ours")


def baseline_collator(processor):
    def collate(records):
        batch = processor(
            images=[r["image"] for r in records],
            text=["<image>" + r["prefix"] for r in records],  # as the HF PaliGemma docs write it
            suffix=[r["suffix"] for r in records],
            return_tensors="pt",
            padding="longest",
        )
        return dict(batch)

    return collate


def model_loss(model, batch):
    return model(**batch).loss


def cached_suffix_loss():
    cache = ImageFeatureCache()
    return lambda model, batch: suffix_loss(model, batch, image_features=cache)


def build(method: str, model_name: str = "tiny"):
    # "full_vision": recipes/tiny/easyvqa_full.yaml's tuning (vision tower and projector train too)
    vision = method == "full_vision"
    tuning = TuningConfig(method="full" if vision else method,
                          bnb_4bit_compute_dtype="float32", train_vision_tower=vision, train_projector=vision)
    torch.manual_seed(0)
    return apply_tuning(load_model(ModelConfig(name_or_path=model_name), tuning), tuning).train()


def make_optimizer(model, kind: str = "fused"):
    params = [p for p in model.parameters() if p.requires_grad]
    # lr as the tiny recipes; "fused" is the Trainer's default optim (adamw_torch_fused) with torch >= 2.8,
    # "forloop" what `optim: adamw_torch` gives on CPU (foreach=None -> False)
    options = {"forloop": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, **options)


def bench_method(method: str, split: str, processor, steps: int, batch_size: int, max_length: int,
                 optim: str = "fused") -> list[dict]:
    def records(cached: bool):
        return load_records("builtin:easyvqa", split, image_cache_mb=256 if cached else 0)

    setups = {
        "baseline": (records(False), baseline_collator(processor), model_loss),
        "+collator": (records(False), PaliGemmaCollator(processor, max_length=max_length, pixel_cache_mb=0), model_loss),
        "+pixel cache": (records(False), PaliGemmaCollator(processor, max_length=max_length), model_loss),
        "+suffix_loss": (records(False), PaliGemmaCollator(processor, max_length=max_length), suffix_loss),
        "+image cache": (records(True), PaliGemmaCollator(processor, max_length=max_length), suffix_loss),
        "ours": (records(True), PaliGemmaCollator(processor, max_length=max_length), cached_suffix_loss()),
    }
    runs = {}
    for name, (dataset, collate, loss_fn) in setups.items():
        model = build(method)
        runs[name] = dict(model=model, optimizer=make_optimizer(model, optim), collate=collate, loss_fn=loss_fn,
                          dataset=dataset, times=[], tokens=0, slots=0, losses=[])
    n = len(dataset)
    for step in range(steps + 2):  # two warm-up steps
        indices = [(step * batch_size + i) % n for i in range(batch_size)]
        for name in VARIANTS:
            run = runs[name]
            start = time.perf_counter()
            batch = run["collate"]([run["dataset"][i] for i in indices])
            loss = run["loss_fn"](run["model"], batch)
            loss.backward()
            run["optimizer"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            if step >= 2:
                run["times"].append(elapsed)
                run["tokens"] += int(batch["attention_mask"].sum())
                run["slots"] += batch["attention_mask"].numel()
                run["losses"].append(loss.item())
    rows = []
    for name in VARIANTS:
        run = runs[name]
        median = statistics.median(run["times"])
        rows.append({
            "method": method,
            "variant": name,
            "median_step_ms": 1000 * median,
            "samples_per_s": batch_size / median,
            "tokens_per_s": run["tokens"] / len(run["times"]) / median,
            "mean_samples_per_s": batch_size * len(run["times"]) / sum(run["times"]),
            "padding_fraction": 1 - run["tokens"] / run["slots"],
            "first_loss": run["losses"][0],
            "last_loss": run["losses"][-1],
        })
    return rows


def bench_optimizers(method: str, repeats: int = 30) -> dict[str, float]:
    """Median ms of optimizer.step() per AdamW implementation, on gradients from one real step."""
    model = build(method)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {kind: make_optimizer(model, kind) for kind in ("forloop", "foreach", "fused")}
    times: dict[str, list[float]] = {kind: [] for kind in optimizers}
    with torch.no_grad():
        for _ in range(repeats):
            for kind, optimizer in optimizers.items():  # interleaved, like the training steps
                start = time.perf_counter()
                optimizer.step()
                times[kind].append(time.perf_counter() - start)
    return {kind: 1000 * statistics.median(t[2:]) for kind, t in times.items()}


def run_child(cmd: list[str]) -> dict:
    cmd = fresh_dirs(cmd)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return parse_report(done.stdout)


def process_commands(method: str, data: Path, work: Path, steps: int, feature_cache_off: bool = False) -> dict[str, list[str]]:
    """The three processes of one comparison: ours (the recipe as shipped), notebook, notebook matched."""
    from pg_finetune.model import tiny_model_dir
    from pg_finetune.recipe import load_recipe

    recipe = load_recipe(RECIPES[method])
    py = sys.executable
    ours = [py, str(BENCH / "ours_train.py"), "--recipe", RECIPES[method], f"data.train={data}",
            "data.train_split=train", "data.eval_split=null", "eval.before_and_after=false", "data.check_images=false",
            f"training.max_steps={steps}", f"training.output_dir={work / 'ours-RUN'}", "logging.html_report=false",
            "training.save_steps=1000000", "training.logging_steps=50"]  # fmt: skip
    notebook = [py, str(BENCH / "notebook_train.py"), "--data", str(data), "--model", str(tiny_model_dir("tiny")),
                "--method", method, "--max-steps", str(steps), "--output-dir", str(work / "notebook-RUN")]
    matched = [*notebook, "--matched", "--lora-dropout", str(recipe.tuning.lora_dropout), "--optim", recipe.training.optim]
    commands = {"ours": ours, "notebook": notebook, "notebook matched": matched}
    if feature_cache_off:  # what the image-feature cache costs or saves on this data
        commands["ours, no feature cache"] = [*ours, "training.cache_image_features=false"]
    return commands


def process_main(args: argparse.Namespace) -> None:
    if args.threads:  # pg_finetune.train has no thread option: every side runs at torch's default, as users do
        raise SystemExit("--threads applies to --mode steps only")
    work = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    rows = []
    for kind in args.data.split(","):
        data = write_easyvqa_jsonl(work / f"{kind}.jsonl", kind)
        for method in args.methods.split(","):
            commands = process_commands(method, data, work, args.steps, args.feature_cache_off)
            runs: dict[str, list[float]] = {name: [] for name in commands}
            for round_ in range(args.rounds):
                for name, cmd in commands.items():  # interleaved: ours, notebook, matched, ours, ...
                    result = run_child(cmd)
                    runs[name].append(result["samples_per_s"])
                    print(f"{kind:<9}{method:<6}round {round_ + 1}: {name:<23}{result['samples_per_s']:>8.1f} samples/s",
                          flush=True)
            ours_names = [n for n in runs if n.startswith("ours")]
            for ours_name, name in ((o, b) for o in ours_names for b in ("notebook", "notebook matched")):
                ratios = [o / n for o, n in zip(runs[ours_name], runs[name], strict=True)]
                rows.append(dict(data=kind, method=method, ours=ours_name, baseline=name, ours_samples_per_s=runs[ours_name],
                                 baseline_samples_per_s=runs[name], ratios=ratios,
                                 median_ratio=statistics.median(ratios)))
    print(f"\n{'data':<10}{'method':<7}{'ours':<24}{'baseline':<18}{'ours s/s':>9}{'base s/s':>9}{'median ratio':>14}  ratios")
    for r in rows:
        print(f"{r['data']:<10}{r['method']:<7}{r['ours']:<24}{r['baseline']:<18}{statistics.median(r['ours_samples_per_s']):>9.1f}"
              f"{statistics.median(r['baseline_samples_per_s']):>9.1f}{r['median_ratio']:>13.2f}x  "
              + ", ".join(f"{x:.2f}" for x in r["ratios"]))
    meta = dict(torch=torch.__version__, steps=args.steps, rounds=args.rounds, batch_size=16, threads="torch default",
                statistic="median over rounds of ours/baseline Trainer samples/s within a round")
    write_results(args.out, "train_throughput", meta, rows=rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("process", "steps"), default="process")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (process: 200, steps: 40)")
    parser.add_argument("--rounds", type=int, default=3, help="process: interleaved rounds")
    parser.add_argument("--data", default="distinct,repeated", help="process: distinct (one image per record), repeated")
    parser.add_argument("--feature-cache-off", action="store_true",
                        help="process: also run ours with training.cache_image_features=false")
    parser.add_argument("--batch-size", type=int, default=16, help="steps mode (process mode: the recipes' 16)")
    parser.add_argument("--max-length", type=int, default=64, help="data.max_length of the tiny recipes")
    parser.add_argument("--methods", default=None,
                        help="process: lora,full (the tiny recipes); steps: full_vision,full,attention_only,lora,qlora "
                             "(full_vision = full with the vision tower and projector trained, the tiny easyvqa_full recipe)")
    parser.add_argument("--threads", type=int, default=0,
                        help="steps mode: torch threads (0: torch's default, what users get); 1 is steadier on a busy machine")
    parser.add_argument("--optim", choices=("fused", "foreach", "forloop"), default="fused",
                        help="steps mode: AdamW for every variant (fused: the Trainer's default)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.mode == "process":
        args.steps = args.steps or 200
        args.methods = args.methods or "lora,full"
        return process_main(args)
    args.steps = args.steps or 40
    args.methods = args.methods or "full_vision,full,attention_only,lora,qlora"
    if args.threads:
        torch.set_num_threads(args.threads)
    processor = load_processor("tiny")
    methods = args.methods.split(",")

    rows, optim = [], {}
    for method in methods:
        rows += bench_method(method, "train[:512]", processor, args.steps, args.batch_size, args.max_length, args.optim)
        optim[method] = bench_optimizers(method)

    print(f"\n{'method':<15}{'variant':<14}{'step ms':>9}{'samples/s':>11}{'tok/s':>9}{'vs baseline':>13}")
    for method in methods:
        base = next(r for r in rows if r["method"] == method and r["variant"] == "baseline")
        for r in (r for r in rows if r["method"] == method):
            r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
            print(f"{method:<15}{r['variant']:<14}{r['median_step_ms']:>9.1f}{r['samples_per_s']:>11.1f}"
                  f"{r['tokens_per_s']:>9.0f}{r['speedup']:>12.2f}x")
    print(f"\nAdamW optimizer.step() median ms\n{'method':<15}{'forloop':>9}{'foreach':>9}{'fused':>9}")
    for method in methods:
        o = optim[method]
        print(f"{method:<15}{o['forloop']:>9.2f}{o['foreach']:>9.2f}{o['fused']:>9.2f}")
    pad = statistics.mean(r["padding_fraction"] for r in rows if r["variant"] == "ours")
    print(f"\npadding: {100 * pad:.1f}% of the token slots of our batches are padding")

    meta = dict(threads=torch.get_num_threads(), torch=torch.__version__, steps=args.steps, batch_size=args.batch_size,
                optim=args.optim, statistic="median step time over interleaved steps")
    write_results(args.out, "train_steps", meta, rows=rows, optimizer_step_ms=optim)


if __name__ == "__main__":
    main()
