"""Evaluate a model on a benchmark, or score an existing predictions file.

    python -m eval.run --benchmark easyvqa --model runs/tiny_easyvqa_full/final --limit 500
    python -m eval.run --benchmark caption --data data/val.jsonl --model google/paligemma2-3b-pt-224 --adapter runs/x/final
    python -m eval.run --benchmark easyvqa --predictions preds.jsonl --references refs.jsonl

Writes `predictions.jsonl` and `scores.json` (metric names namespaced like
`easyvqa/test/exact_match`) to --out and prints a table.

Predictions file: one JSON object per line, `{"id": ..., "prediction": "..."}`.
References file: `{"id": ..., <reference field>: [...]}` with the task's field
(`answers` for VQA, `captions` for captioning). Missing predictions count as
wrong (scored as an empty prediction) and are listed by id; predictions with an
unknown id are listed and ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pg_finetune.tasks import get_task


@dataclass(frozen=True)
class Benchmark:
    task: str
    source: str | None  # None: the user passes --data
    split: str


BENCHMARKS: dict[str, Benchmark] = {
    "easyvqa": Benchmark(task="vqa", source="builtin:easyvqa", split="test"),
    "vqa": Benchmark(task="vqa", source=None, split="validation"),
    "caption": Benchmark(task="caption", source=None, split="validation"),
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise SystemExit(f"error: unknown benchmark {name!r}; valid: {', '.join(sorted(BENCHMARKS))}") from None


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SystemExit(f"error: {path}:{line_no}: invalid JSON ({err.msg})") from None
    return rows


def score_files(benchmark: Benchmark, predictions_path: str, references_path: str) -> tuple[dict, dict]:
    """Score a predictions file against references; return (scores, report of ids)."""
    task = get_task(benchmark.task)
    references = {str(r["id"]): r for r in _read_jsonl(references_path)}
    predictions: dict[str, str] = {}
    malformed: list[str] = []
    for row in _read_jsonl(predictions_path):
        if "id" not in row or not isinstance(row.get("prediction"), str):
            malformed.append(str(row.get("id", "<no id>")))
            continue
        predictions[str(row["id"])] = row["prediction"]
    missing = [i for i in references if i not in predictions]
    unknown = [i for i in predictions if i not in references]
    ids = list(references)
    preds = [task.parse(predictions.get(i, "")) for i in ids]
    refs = [task.references(references[i]) for i in ids]
    scores = task.score(preds, refs)
    report = {"scored": len(ids), "missing": missing, "unknown": unknown, "malformed": malformed}
    return scores, report


def evaluate_model(args: argparse.Namespace, benchmark: Benchmark) -> tuple[dict, list[dict]]:
    from pg_finetune.data import load_records
    from pg_finetune.generate import GenerationSettings, evaluate_task
    from pg_finetune.model import load_for_inference

    task = get_task(benchmark.task)
    source = args.data or benchmark.source
    if source is None:
        raise SystemExit(f"error: benchmark {args.benchmark!r} needs --data (a JSONL file or dataset)")
    records_ds = load_records(
        source, args.split or benchmark.split, default_prefix=task.default_prefix, require_suffix=False,
        limit=args.limit, skip_bad_records=True,
    )
    records = [r for r in (records_ds[i] for i in range(len(records_ds))) if r is not None]
    model, processor = load_for_inference(args.model, args.adapter, dtype=args.dtype, cpu=args.cpu)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens or task.max_new_tokens, batch_size=args.batch_size, num_beams=args.num_beams
    )
    return evaluate_task(model, processor, task, records, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", required=True, help=f"one of: {', '.join(sorted(BENCHMARKS))}")
    parser.add_argument("--model", help="hub id, local directory, or 'tiny'")
    parser.add_argument("--adapter", help="PEFT adapter directory to put on --model")
    parser.add_argument("--data", help="data source for benchmarks without a built-in one")
    parser.add_argument("--split", help="split, may be sliced: test[:500]")
    parser.add_argument("--limit", type=int, help="evaluate at most N examples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--predictions", help="score this predictions JSONL instead of running a model")
    parser.add_argument("--references", help="references JSONL for --predictions")
    parser.add_argument("--out", default="eval_out", help="directory for predictions.jsonl and scores.json")
    args = parser.parse_args(argv)
    benchmark = get_benchmark(args.benchmark)
    split = (args.split or benchmark.split).split("[")[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.predictions:
        if not args.references:
            parser.error("--predictions needs --references")
        scores, report = score_files(benchmark, args.predictions, args.references)
        for kind in ("missing", "unknown", "malformed"):
            if report[kind]:
                print(f"{len(report[kind])} {kind} prediction ids: {', '.join(report[kind][:20])}", file=sys.stderr)
    else:
        if not args.model:
            parser.error("give --model (or --predictions with --references)")
        scores, rows = evaluate_model(args, benchmark)
        with open(out / "predictions.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    named = {f"{args.benchmark}/{split}/{k}": v for k, v in scores.items()}
    (out / "scores.json").write_text(json.dumps(named, indent=2) + "\n")
    width = max(len(k) for k in named)
    for key, value in named.items():
        print(f"{key:<{width}}  {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
