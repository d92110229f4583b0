"""Evaluate a model on a benchmark, or score an existing predictions file.

    python -m eval.run --benchmark easyvqa --model runs/tiny_easyvqa_full/final --limit 500
    python -m eval.run --benchmark cococap --data dataset_coco.json --image-root coco/ --split val \\
        --model google/paligemma2-3b-pt-224 --adapter runs/x/final
    python -m eval.run --benchmark detection --data data/coco_det/val.jsonl --model runs/x/final
    python -m eval.run --benchmark vqav2 --predictions preds.jsonl --references refs.jsonl

Benchmarks (eval/benchmarks/, one file each): cococap, caption, detection, refexp, vqav2,
count_intersections, easyvqa, vqa. Writes to --out: `scores.json` (names like
`cococap/val/cider`), `report.json` (what could not be scored, by id), in model mode
`predictions.jsonl`, and for detection and refexp `detections.html`; prints a table.

Predictions file: one JSON object per line, `{"id": ..., "prediction": "..."}`. References file:
the benchmark's own JSONL form, `id` plus its fields (`answers`, `captions`, `boxes` + `labels` +
`width` + `height`, `count`; see docs/evaluation.md). Missing predictions count as wrong (scored
as an empty output); unknown ids, empty predictions, malformed lines, duplicate ids, references
that cannot be scored, and outputs with problems (malformed detections) are all listed by id.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from eval.benchmarks import BENCHMARKS, Benchmark, Scored, ScoreOptions, get_benchmark
from pg_finetune.jsonl import jsonl_objects
from pg_finetune.metrics.captions import TOKENIZERS, resolve_tokenizer
from pg_finetune.tasks import get_task

REPORT_LISTS = ("missing", "unknown", "empty", "malformed", "duplicate_predictions", "bad_references",
                "duplicate_references", "unreadable_images")  # fmt: skip


# ---- reading files ------------------------------------------------------------------------------------


def read_predictions(path: str) -> tuple[dict[str, str], list[str], list[str]]:
    """({id: prediction}, malformed, duplicates). Lines that are not `{"id", "prediction": str}` are
    listed in `malformed` by id (or `path:line` without one); a repeated id keeps its first line."""
    predictions: dict[str, str] = {}
    malformed: list[str] = []
    duplicates: list[str] = []
    for number, row, _ in jsonl_objects(path):
        if row is None or row.get("id") is None:
            malformed.append(f"{path}:{number}")
            continue
        pid = str(row["id"])
        if not isinstance(row.get("prediction"), str):
            malformed.append(pid)
            continue
        if pid in predictions:
            duplicates.append(pid)
            continue
        predictions[pid] = row["prediction"]
    return predictions, malformed, duplicates


# ---- scoring ------------------------------------------------------------------------------------------


def _parser(bench: Benchmark):
    return bench.parse or get_task(bench.task).parse


def score_predictions(
    bench: Benchmark, predictions: dict[str, str], ref_rows: list[dict], options: ScoreOptions
) -> tuple[dict[str, float], dict[str, Any], list[str], Scored]:
    """Score `predictions` against the references in `ref_rows` (records or references-file rows).

    Returns (scores, report, ids scored in order, Scored). Every reference row is either scored
    (a missing prediction as an empty output) or listed in `report["bad_references"]`.
    """
    report: dict[str, Any] = {k: [] for k in REPORT_LISTS}
    ids: list[str] = []
    seen: set[str] = set()  # ids as a set too: VQAv2 val has 214k questions, a list lookup each is quadratic
    references: list[Any] = []
    for row in ref_rows:
        where = row.get("where") or row.get("_line")
        if "_bad" in row:
            report["bad_references"].append({"line": where, "problem": row["_bad"]})
            continue
        if row.get("id") is None:
            report["bad_references"].append({"line": where, "problem": "no 'id' field"})
            continue
        rid = str(row["id"])
        if rid in seen:
            report["duplicate_references"].append(rid)
            continue
        try:
            references.append(bench.reference(row))
        except (KeyError, ValueError, TypeError) as err:
            problem = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            report["bad_references"].append({"id": rid, "line": where, "problem": str(problem)})
            continue
        ids.append(rid)
        seen.add(rid)
    known = seen | {str(r["id"]) for r in ref_rows if r.get("id") is not None}
    report["missing"] = [i for i in ids if i not in predictions]
    report["unknown"] = [i for i in predictions if i not in known]
    report["empty"] = [i for i in ids if i in predictions and not predictions[i].strip()]
    parse = _parser(bench)
    texts = [parse(predictions.get(i, "")) for i in ids]
    scored = bench.score(texts, references, options)
    report["scored"] = len(ids)
    report["problems"] = {ids[k]: notes for k, notes in sorted(scored.problems.items())}
    return scored.metrics, report, ids, scored


# ---- model mode ---------------------------------------------------------------------------------------


def run_model(
    args: argparse.Namespace, bench: Benchmark
) -> tuple[dict[str, str], list[dict], list[dict], Any, dict[str, Any]]:
    """Generate for every record.

    Returns (predictions by id, reference rows, prediction rows, dataset, report entries).
    """
    from tqdm.auto import tqdm

    from pg_finetune.generate import GenerationSettings, generate
    from pg_finetune.model import load_for_inference

    task = get_task(bench.task)
    source = args.data or bench.source
    if source is None:
        raise SystemExit(
            f"error: benchmark {bench.name!r} needs --data (a JSONL file, dataset directory or hub id); "
            f"its records hold {bench.references_help}"
        )
    prefix = args.prefix or bench.prefix or task.default_prefix
    try:
        dataset = bench.load(source, args.split or bench.split, limit=args.limit, prefix=prefix, image_root=args.image_root)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: benchmark {bench.name!r}: cannot load {source!r}: {err}") from None
    metas = [dataset.rows_meta(i) for i in range(len(dataset))]
    # Only records with a usable reference are generated for; the others are reported by id.
    todo = []
    for i, meta in enumerate(metas):
        try:
            bench.reference(meta)
        except (KeyError, ValueError, TypeError):
            continue
        todo.append(i)
    model, processor = load_for_inference(args.model, args.adapter, dtype=args.dtype, cpu=args.cpu)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens or bench.max_new_tokens or task.max_new_tokens,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        constrain_detection=args.constrained_detection,
    )
    prompt = bench.prompt or (lambda record: record["prefix"])
    parse = _parser(bench)
    predictions: dict[str, str] = {}
    rows: list[dict] = []
    unreadable: list[str] = []
    bar = tqdm(total=len(todo), desc=f"{bench.name} generating", unit="ex")
    chunk = max(1, args.batch_size) * 4  # decode a few batches of images at a time, not the whole split
    try:
        for start in range(0, len(todo), chunk):
            records = []
            for i in todo[start : start + chunk]:
                record = dataset[i]  # decodes the image; None when it cannot be read
                if record is None:
                    unreadable.append(metas[i]["id"])
                    continue
                records.append({**record, "prefix": prompt(record)})
            raw = generate(model, processor, records, settings, progress=False) if records else []
            for record, text in zip(records, raw, strict=True):
                prediction = parse(text)
                predictions.setdefault(str(record["id"]), prediction)
                rows.append({"id": record["id"], "prefix": record["prefix"], "prediction": prediction, "raw": text})
            bar.update(len(todo[start : start + chunk]))
    finally:
        bar.close()
    report = {"unreadable_images": unreadable, "skipped_records": dict(dataset.skipped)}
    return predictions, metas, rows, dataset, report


# ---- HTML page for box benchmarks -----------------------------------------------------------------------


def write_detections_page(
    out: Path, bench: Benchmark, ids: list[str], scored: Scored, texts: dict[str, str], ref_rows: list[dict],
    dataset: Any, args: argparse.Namespace, report: dict,
) -> Path | None:
    from eval.html import Example, write_page
    from pg_finetune.images import BadRecordError, open_image

    candidates = [k for k in range(len(ids)) if k in scored.drawn]
    if not candidates or args.html_samples <= 0:
        return None
    picked = sorted(random.Random(0).sample(candidates, min(args.html_samples, len(candidates))))
    by_id = {str(r.get("id")): (n, r) for n, r in enumerate(ref_rows)}
    refs_dir = Path(args.references).parent if args.references else None
    examples, no_image = [], []
    prompt = bench.prompt or (lambda record: record.get("prefix", ""))
    for k in picked:
        n, row = by_id[ids[k]]
        image = None
        try:
            if dataset is not None:
                record = dataset[n]
                image = record["image"] if record is not None else None
            elif isinstance(row.get("image"), str):
                root = Path(args.image_root) if args.image_root else refs_dir
                image = open_image(str(root / row["image"]) if root else row["image"], where=str(row.get("_line")))
        except (BadRecordError, OSError):
            image = None
        if image is None:
            no_image.append(ids[k])
            continue
        drawn = scored.drawn[k]
        examples.append(Example(ids[k], image, prompt(row) or "", texts.get(ids[k], ""), drawn.truth, drawn.predicted,
                                scored.problems.get(k, ())))  # fmt: skip
    if no_image:
        report["html_no_image"] = no_image
    if not examples:
        return None
    return write_page(out, examples, f"{bench.name}: {len(examples)} of {len(ids)} examples")


# ---- entry --------------------------------------------------------------------------------------------


def print_report(report: dict) -> None:
    labels = {
        "missing": ("missing prediction ids", "scored as wrong"), "unknown": ("unknown prediction ids", "ignored"),
        "empty": ("empty prediction ids", "scored as given"), "malformed": ("malformed prediction ids", "not read"),
        "duplicate_predictions": ("duplicate prediction ids", "first kept"),
        "duplicate_references": ("duplicate reference ids", "first kept"),
        "unreadable_images": ("ids with unreadable images", "scored as wrong"),
    }  # fmt: skip
    for kind, (label, consequence) in labels.items():
        if report.get(kind):
            shown = ", ".join(map(str, report[kind][:20])) + (" ..." if len(report[kind]) > 20 else "")
            print(f"{len(report[kind])} {label}: {shown} ({consequence})", file=sys.stderr)
    for bad in report.get("bad_references", [])[:20]:
        print(f"reference not scored: {bad.get('id', '')} {bad.get('line', '')}: {bad['problem']}", file=sys.stderr)
    problems = report.get("problems", {})
    if problems:
        first = "; ".join(f"{i}: {notes[0]}" for i, notes in list(problems.items())[:5])
        print(f"{len(problems)} examples with problems (see report.json): {first}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", required=True, help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--model", help="hub id, local directory, or 'tiny'")
    parser.add_argument("--adapter", help="PEFT adapter directory to put on --model")
    parser.add_argument("--data", help="data source (JSONL, dataset dir, hub id, Karpathy JSON for cococap)")
    parser.add_argument("--image-root", help="cococap: directory holding Karpathy's filepath/filename images")
    parser.add_argument("--split", help="split, may be sliced: test[:500] (default: the benchmark's)")
    parser.add_argument("--limit", type=int, help="evaluate at most N examples")
    parser.add_argument("--prefix", help="prompt for records without one; may name fields: 'answer en {question}'")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--constrained-detection", action="store_true",
                        help="decode detect prompts under the detection grammar (output always parses)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--predictions", help="score this predictions JSONL instead of running a model")
    parser.add_argument("--references", help="references for --predictions (the benchmark's JSONL form)")
    parser.add_argument("--caption-tokenizer", default="auto", choices=TOKENIZERS,
                        help="captions: PTB (java) or the simple regex tokenizer; auto: PTB when java is present")
    parser.add_argument("--detection-scores", default="order", choices=["order", "constant"],
                        help="box scores for mAP: 1/(k+1) for the k-th output box, or 1.0 for all")
    parser.add_argument("--html-samples", type=int, default=16, help="images drawn in detections.html (0: none)")
    parser.add_argument("--out", default="eval_out", help="directory for the outputs")
    args = parser.parse_args(argv)  # fmt: skip
    bench = get_benchmark(args.benchmark)
    split = (args.split or bench.split).split("[")[0]
    options = ScoreOptions(caption_tokenizer=args.caption_tokenizer, detection_scores=args.detection_scores)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    dataset = None
    extra: dict[str, Any] = {}
    if args.predictions:
        if not args.references:
            parser.error("--predictions needs --references")
        for path in (args.predictions, args.references):
            if not Path(path).is_file():
                parser.error(f"no such file: {path}")
        predictions, malformed, duplicates = read_predictions(args.predictions)
        try:
            ref_rows = bench.read_references(args.references, args.split or bench.split, image_root=args.image_root)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        extra = {"malformed": malformed, "duplicate_predictions": duplicates}
    else:
        if not args.model:
            parser.error("give --model (or --predictions with --references)")
        predictions, ref_rows, rows, dataset, extra = run_model(args, bench)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    scores, report, ids, scored = score_predictions(bench, predictions, ref_rows, options)
    report.update({k: v for k, v in extra.items() if v or k in REPORT_LISTS})
    seconds = time.perf_counter() - started
    report.update(benchmark=bench.name, split=split, seconds=round(seconds, 2),
                  examples_per_second=round(len(ids) / seconds, 2) if seconds > 0 else None)  # fmt: skip
    if bench.task == "caption":
        report["caption_tokenizer"] = resolve_tokenizer(args.caption_tokenizer)
    if bench.draw:
        page = write_detections_page(out, bench, ids, scored, predictions, ref_rows, dataset, args, report)
        if page is not None:
            report["html"] = str(page)

    named = {f"{bench.name}/{split}/{k}": v for k, v in scores.items()}
    (out / "scores.json").write_text(json.dumps(named, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    width = max(len(k) for k in named)
    print(f"{'metric':<{width}}  value")
    for key, value in named.items():
        print(f"{key:<{width}}  {value:.4f}")
    print(f"{len(ids)} examples scored; outputs in {out}/ (scores.json, report.json"
          + (", predictions.jsonl" if not args.predictions else "") + (", detections.html)" if "html" in report else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
