"""Generation throughput on the tiny model: batched (16 prompts per `generate` call) against one at a time.

    python bench/generation_throughput.py [--num 64] [--batch-size 16] [--max-new-tokens 8] [--threads 1]

Both runs go through `pg_finetune.generate.generate` (left padding, KV cache,
greedy) on the same records; only `GenerationSettings(batch_size=...)` differs.
The runs alternate for `--repeats` rounds and the median time counts. The
outputs must be the same strings: batching must not change a greedy answer.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pg_finetune.data import load_records
from pg_finetune.generate import GenerationSettings, generate
from pg_finetune.model import load_for_inference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=64, help="records to generate for")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tiny", help="tiny or tiny-paligemma2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_for_inference(args.model, None, dtype="float32", cpu=True)
    dataset = load_records("builtin:easyvqa", f"test[:{args.num}]")
    records = [dataset[i] for i in range(len(dataset))]

    settings = {
        "one_at_a_time": GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=1),
        "batched": GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    outputs: dict[str, list[str]] = {}
    generate(model, processor, records[:2], settings["batched"], progress=False)  # warm-up
    for _ in range(args.repeats):
        for name, s in settings.items():
            start = time.perf_counter()
            outputs[name] = generate(model, processor, records, s, progress=False)
            times[name].append(time.perf_counter() - start)

    same = outputs["batched"] == outputs["one_at_a_time"]
    rows = {name: {"median_s": statistics.median(t), "examples_per_s": len(records) / statistics.median(t)}
            for name, t in times.items()}
    ratio = rows["batched"]["examples_per_s"] / rows["one_at_a_time"]["examples_per_s"]
    print(f"\n{'mode':<16}{'examples/s':>12}")
    for name, row in rows.items():
        print(f"{name:<16}{row['examples_per_s']:>12.1f}")
    print(f"batched / one at a time: {ratio:.2f}x; identical outputs: {same}")
    if not same:
        diff = [i for i, (a, b) in enumerate(zip(outputs["batched"], outputs["one_at_a_time"], strict=True)) if a != b]
        print(f"outputs differ at {len(diff)} records, e.g. #{diff[0]}: "
              f"{outputs['batched'][diff[0]]!r} vs {outputs['one_at_a_time'][diff[0]]!r}", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, model=args.model, num=len(records), batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    result = {"meta": meta, "rows": rows, "ratio": ratio, "identical_outputs": same,
              "sample_outputs": outputs["batched"][:5]}
    path = out / "generation_throughput.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
