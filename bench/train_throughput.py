"""Training throughput of the tiny recipe, per tuning method, against the usual notebook collator.

    python bench/train_throughput.py [--steps 40] [--batch-size 16] [--out bench/results]

Same model, data, optimizer and steps for every row. "ours" uses
`PaliGemmaCollator` (fast tokenizer on the text, image processor once per
batch); "baseline" is the collator of the usual HF blog/notebook recipe: the full
`PaliGemmaProcessor(images=..., text=..., suffix=...)` called on every step.
Prints a table and writes JSON. Numbers, not pass/fail: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from pg_finetune.collator import PaliGemmaCollator
from pg_finetune.data import load_records
from pg_finetune.model import load_model, load_processor
from pg_finetune.recipe import ModelConfig, TuningConfig
from pg_finetune.tuning import apply_tuning


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


def run(method: str, collate_name: str, records, steps: int, batch_size: int) -> dict:
    tuning = TuningConfig(method=method, load_in_4bit=method == "qlora", bnb_4bit_compute_dtype="float32")
    torch.manual_seed(0)
    processor = load_processor("tiny")
    model = apply_tuning(load_model(ModelConfig(name_or_path="tiny"), tuning), tuning).train()
    collate = PaliGemmaCollator(processor, max_length=64) if collate_name == "ours" else baseline_collator(processor)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    tokens = 0
    start = None
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            start, tokens = time.perf_counter(), 0
        chunk = [records[(step * batch_size + i) % len(records)] for i in range(batch_size)]
        batch = collate(chunk)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    return {
        "method": method,
        "collator": collate_name,
        "samples_per_s": steps * batch_size / elapsed,
        "tokens_per_s": tokens / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", default="full,attention_only,lora,qlora")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    dataset = load_records("builtin:easyvqa", "train[:512]")
    records = [dataset[i] for i in range(len(dataset))]
    rows = []
    for method in args.methods.split(","):
        for collate_name in ("ours", "baseline"):
            rows.append(run(method, collate_name, records, args.steps, args.batch_size))
            r = rows[-1]
            print(f"{method:<15}{collate_name:<10}{r['samples_per_s']:>10.1f} samples/s{r['tokens_per_s']:>10.0f} tok/s")
    print(f"\n{'method':<15}{'ours/baseline samples/s':>26}")
    for method in args.methods.split(","):
        ours, base = (next(r for r in rows if r["method"] == method and r["collator"] == c) for c in ("ours", "baseline"))
        print(f"{method:<15}{ours['samples_per_s'] / base['samples_per_s']:>26.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = SimpleNamespace(
        date=time.strftime("%Y-%m-%d"), machine=platform.machine(), threads=torch.get_num_threads(),
        torch=torch.__version__, steps=args.steps, batch_size=args.batch_size,
    )
    (out / "train_throughput.json").write_text(json.dumps({"meta": vars(meta), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out / 'train_throughput.json'}")


if __name__ == "__main__":
    main()
