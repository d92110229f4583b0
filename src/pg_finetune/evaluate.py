"""Evaluate a model on a benchmark, or score an existing predictions file.

    pg-eval --benchmark easyvqa --model runs/tiny_easyvqa_full/final --limit 500
    python -m eval.run --benchmark cococap --data dataset_coco.json --image-root coco/ --split val \\
        --model google/paligemma2-3b-pt-224 --adapter runs/x/final
    python -m eval.run --benchmark detection --data data/coco_det/val.jsonl --model runs/x/final
    python -m eval.run --benchmark vqav2 --predictions preds.jsonl --references refs.jsonl

(`pg-eval`, `python -m pg_finetune.evaluate` and `python -m eval.run` are the same program.)
Benchmarks are data (`pg_finetune.benchmarks`): a task, a default source and split, and the
task's metric to use. Writes to --out: `scores.json` (names like `cococap/val/cider`),
`report.json` (what could not be scored, by id), in model mode `predictions.jsonl`, and for
box tasks `detections.html`; prints a table.

Prompts are cut at --max-length text tokens; without the flag, at the `data.max_length` of the
recipe.yaml a trained model directory carries (--adapter's, else --model's), else 512.

Predictions file: one JSON object per line, `{"id": ..., "prediction": "..."}`. References file:
the benchmark's own JSONL form, `id` plus its fields (`answers`, `captions`, `boxes` + `labels` +
`width` + `height`, `count`; see docs/evaluation.md). Missing predictions count as wrong (scored
as an empty output); unknown ids, empty predictions, malformed lines, duplicate ids, references
that cannot be scored, and outputs with problems (malformed detections) are all listed by id.
A run where nothing can be scored is refused (exit 2), never reported as 0.

Exit codes: 0 scored; 1 failed; 2 bad usage or input (a missing file, nothing to score).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from pg_finetune.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from pg_finetune.imports import collector_frozen
from pg_finetune.jsonl import jsonl_objects
from pg_finetune.metrics.captions import TOKENIZERS
from pg_finetune.tasks import Scored, ScoreOptions

REPORT_LISTS = ("missing", "unknown", "empty", "malformed", "duplicate_predictions", "bad_references",
                "duplicate_references", "unreadable_images")  # fmt: skip


class UsageError(Exception):
    """Bad input from the command line: printed as `error: ...`, exit code 2."""


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


def read_references(path: str, split: str, image_root: str | None = None) -> list[dict]:
    """Rows of a references file: a Karpathy caption JSON (the rows of `split`), else JSONL, where a
    line that is not a JSON object becomes `{"_line": N, "_bad": why}`."""
    from pg_finetune.data import is_karpathy, karpathy_rows

    if is_karpathy(path):
        return karpathy_rows(path, split, image_root)
    return [
        {**row, "_line": number} if row is not None else {"_line": number, "_bad": problem}
        for number, row, problem in jsonl_objects(path)
    ]


# ---- scoring ------------------------------------------------------------------------------------------


def score_predictions(
    bench: Benchmark, predictions: dict[str, str], ref_rows: list[dict], options: ScoreOptions
) -> tuple[dict[str, float], dict[str, Any], list[str], Scored]:
    """Score `predictions` against the references in `ref_rows` (records or references-file rows).

    Returns (scores, report, ids scored in order, Scored). Every reference row is either scored
    (a missing prediction as an empty output) or listed in `report["bad_references"]`.
    """
    task, metric = bench.get_task(), bench.get_metric()
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
            references.append(metric.reference(row))
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
    texts = [task.parse(predictions.get(i, "")) for i in ids]
    scored = metric.score(texts, references, options)
    report["scored"] = len(ids)
    report["problems"] = {ids[k]: notes for k, notes in sorted(scored.problems.items())}
    return scored.metrics, report, ids, scored


def nothing_to_score(bench: Benchmark, report: dict, predictions: dict[str, str], from_file: bool) -> str | None:
    """Why this run scored nothing worth a number (None when it did): every reference refused, or a
    predictions file none of whose ids is a reference (another benchmark's, or an empty file)."""
    help_text = bench.get_metric().references_help
    if report["scored"] == 0:
        first = report["bad_references"][0]["problem"] if report["bad_references"] else "the references are empty"
        return (f"nothing to score: no reference row could be scored (first problem: {first}); "
                f"a {bench.name} reference holds {help_text}")  # fmt: skip
    if from_file and len(report["missing"]) == report["scored"]:
        what = "holds no prediction" if not predictions else "has no id of the references"
        return (f"nothing to score: the predictions file {what} ({len(predictions)} predictions, "
                f"{report['scored']} references); a line holds {{\"id\": ..., \"prediction\": \"...\"}}")  # fmt: skip
    return None


# ---- model mode ---------------------------------------------------------------------------------------


def run_model(args: argparse.Namespace, bench: Benchmark) -> tuple[dict[str, str], list[dict], list[dict], Any, dict]:
    """Generate for every record. Returns (predictions by id, reference rows, prediction rows, dataset, report)."""
    from tqdm.auto import tqdm

    from pg_finetune.data import load_records
    from pg_finetune.generate import GenerationSettings, generate
    from pg_finetune.model import ModelLoadError, load_for_inference, resolve_max_length

    task, metric = bench.get_task(), bench.get_metric()
    source = args.data or bench.source
    if source is None:
        raise UsageError(f"benchmark {bench.name!r} needs --data (a JSONL file, dataset directory or hub id); "
                         f"its records hold {metric.references_help}")  # fmt: skip
    if source == bench.source and bench.source_help and not args.data and not Path(source).exists():
        raise UsageError(f"{source} does not exist; {bench.source_help}, or pass --data")
    prefix = args.prompt or bench.prefix or task.default_prefix
    split = args.split or bench.split
    try:
        dataset = load_records(source, split, default_prefix=prefix, require_suffix=False, limit=args.limit,
                               skip_bad_records=True, image_root=args.image_root, config=args.config)  # fmt: skip
    except (OSError, ValueError) as err:
        raise UsageError(f"benchmark {bench.name!r}: cannot load {source!r}: {err}") from None
    metas = [dataset.rows_meta(i) for i in range(len(dataset))]
    # Only records with a usable reference are generated for; the others are reported by id.
    todo = []
    for i, meta in enumerate(metas):
        try:
            metric.reference(meta)
        except (KeyError, ValueError, TypeError):
            continue
        todo.append(i)
    # The prompt budget the model was trained (and evaluated during training) with, not a fixed 512.
    max_length, max_length_source = resolve_max_length(args.max_length, args.model, args.adapter)
    try:
        model, processor = load_for_inference(args.model, args.adapter, dtype=args.dtype, cpu=args.cpu)
    except ModelLoadError as err:
        raise UsageError(str(err)) from None
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens or task.max_new_tokens, batch_size=args.batch_size,
        num_beams=args.num_beams, constrain_detection=args.constrained,
    )  # fmt: skip
    predictions: dict[str, str] = {}
    rows: list[dict] = []
    unreadable: list[str] = []
    bar = tqdm(total=len(todo), desc=f"{bench.name} generating", unit="ex", disable=args.quiet)
    chunk = max(1, args.batch_size) * 4  # decode a few batches of images at a time, not the whole split
    try:
        with collector_frozen():  # the collector's full passes skip the imports' and the model's objects
            for start in range(0, len(todo), chunk):
                records = []
                for i in todo[start : start + chunk]:
                    record = dataset[i]  # decodes the image; None when it cannot be read
                    if record is None:
                        unreadable.append(metas[i]["id"])
                        continue
                    records.append({**record, "prefix": task.prompt(record)})
                raw = generate(model, processor, records, settings, max_length=max_length, progress=False) if records else []
                for record, text in zip(records, raw, strict=True):
                    prediction = task.parse(text)
                    predictions.setdefault(str(record["id"]), prediction)
                    rows.append({"id": record["id"], "prefix": record["prefix"], "prediction": prediction, "raw": text})
                bar.update(len(todo[start : start + chunk]))
    finally:
        bar.close()
    report = {"unreadable_images": unreadable, "skipped_records": dict(dataset.skipped),
              "max_length": max_length, "max_length_source": max_length_source}  # fmt: skip
    return predictions, metas, rows, dataset, report


# ---- HTML page for box tasks ----------------------------------------------------------------------------


def write_detections_page(
    out: Path, bench: Benchmark, ids: list[str], scored: Scored, texts: dict[str, str], ref_rows: list[dict],
    dataset: Any, args: argparse.Namespace, report: dict,
) -> Path | None:
    from pg_finetune.images import BadRecordError, open_image
    from pg_finetune.pages import Example
    from pg_finetune.pages import write_detections_page as write_page

    candidates = [k for k in range(len(ids)) if k in scored.drawn]
    if not candidates or args.html_samples <= 0:
        return None
    picked = sorted(random.Random(0).sample(candidates, min(args.html_samples, len(candidates))))
    by_id = {str(r.get("id")): (n, r) for n, r in enumerate(ref_rows)}
    refs_dir = Path(args.references).parent if args.references else None
    task = bench.get_task()
    examples, no_image = [], []
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
        prompt = task.prompt(row) if row.get("prefix") or row.get("labels") else ""
        examples.append(Example(ids[k], image, prompt, texts.get(ids[k], ""), drawn.truth, drawn.predicted,
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
    if "max_length" in report:
        print(f"max_length {report['max_length']} text tokens ({report['max_length_source']})", file=sys.stderr)
    problems = report.get("problems", {})
    if problems:
        first = "; ".join(f"{i}: {notes[0]}" for i, notes in list(problems.items())[:5])
        print(f"{len(problems)} examples with problems (see report.json): {first}", file=sys.stderr)


def _max_length(text: str) -> int:
    from pg_finetune.model import max_length_arg  # transformers is imported only when the flag is given

    return max_length_arg(text)


def build_parser(prog: str = "pg-eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--benchmark", required=True, help=f"one of: {', '.join(BENCHMARKS)}")
    add("--model", help="hub id, local directory, or 'tiny'")
    add("--adapter", help="PEFT adapter directory to put on --model")
    add("--data", help="data source (JSONL, dataset dir, hub id, Karpathy JSON for cococap)")
    add("--image-root", help="Karpathy JSON: directory holding its filepath/filename images (default: the JSON's "
        "directory); predictions mode: where reference `image` paths start (default: the references file's)")
    add("--config", help="dataset configuration (load_dataset's `name`) of a hub dataset or a dataset repository "
        "whose README lists `configs:`; refused for other sources (default: the dataset's default)")
    add("--split", help="split, may be sliced: test[:500] (default: the benchmark's)")
    add("--limit", type=int, help="evaluate at most N examples")
    add("--prompt", "--prefix", dest="prompt",
        help="prompt for records without one; may name fields: 'answer en {question}' (default: the benchmark's)")
    add("--batch-size", type=int, default=16, help="generation batch size (default: 16)")
    add("--max-new-tokens", type=int, help="generation budget (default: the task's)")
    add("--max-length", type=_max_length, metavar="N",
        help="prompt budget in text tokens (<bos> + prompt + '\\n'; longer prompts are cut). Precedence: this "
        "flag > data.max_length of the training recipe.yaml in --adapter, else in a local --model directory > 512")
    add("--num-beams", type=int, default=1, help="beam count; 1 = greedy (default)")
    add("--constrained", "--constrained-detection", dest="constrained", action="store_true",
        help="decode detect prompts under the detection grammar (output always parses)")
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"], help="weights dtype")
    add("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    add("--predictions", help="score this predictions JSONL instead of running a model")
    add("--references", help="references for --predictions (the benchmark's JSONL form, or a Karpathy JSON)")
    add("--caption-tokenizer", default="auto", choices=TOKENIZERS,
        help="captions: PTB (java) or the simple regex tokenizer; auto: PTB when java is present")
    add("--detection-scores", default="order", choices=["order", "constant"],
        help="box scores for mAP: 1/(k+1) for the k-th output box, or 1.0 for all")
    add("--html-samples", type=int, default=16, help="images drawn in detections.html (0: none; default 16)")
    add("--out", default="eval_out", help="directory for the outputs (default: eval_out)")
    add("--quiet", action="store_true", help="no progress bar and no report on stderr (the scores table still prints)")
    return parser


def main(argv: list[str] | None = None, prog: str = "pg-eval") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        bench = get_benchmark(args.benchmark)
    except KeyError as err:
        raise UsageError(err.args[0]) from None
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    split = (args.split or bench.split).split("[")[0]
    options = ScoreOptions(caption_tokenizer=args.caption_tokenizer, detection_scores=args.detection_scores)
    out = Path(args.out)
    try:  # checked before any model is loaded: a bad --out must not cost a generation run
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create the output directory ({err.strerror or err})") from None
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
            ref_rows = read_references(args.references, args.split or bench.split, image_root=args.image_root)
        except ValueError as err:
            raise UsageError(str(err)) from None
        extra = {"malformed": malformed, "duplicate_predictions": duplicates}
        rows = None
    else:
        if not args.model:
            parser.error("give --model (or --predictions with --references)")
        predictions, ref_rows, rows, dataset, extra = run_model(args, bench)

    scores, report, ids, scored = score_predictions(bench, predictions, ref_rows, options)
    report.update({k: v for k, v in extra.items() if v or k in REPORT_LISTS})
    refused = nothing_to_score(bench, report, predictions, from_file=bool(args.predictions))
    if rows is not None:
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    seconds = time.perf_counter() - started
    report.update(benchmark=bench.name, split=split, seconds=round(seconds, 2),
                  examples_per_second=round(len(ids) / seconds, 2) if seconds > 0 else None)  # fmt: skip
    if refused:
        report["refused"] = refused
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if not args.quiet:
            print_report(report)
        raise UsageError(refused + f" (details in {out / 'report.json'})")
    metric = bench.get_metric()
    if metric.settings is not None:
        report.update(metric.settings(options))
    if scored.drawn:
        page = write_detections_page(out, bench, ids, scored, predictions, ref_rows, dataset, args, report)
        if page is not None:
            report["html"] = str(page)

    named = {f"{bench.name}/{split}/{k}": v for k, v in scores.items()}
    (out / "scores.json").write_text(json.dumps(named, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.quiet:
        print_report(report)
    width = max(len(k) for k in named)
    print(f"{'metric':<{width}}  value")
    for key, value in named.items():
        print(f"{key:<{width}}  {value:.4f}")
    print(f"{len(ids)} examples scored; outputs in {out}/ (scores.json, report.json"
          + (", predictions.jsonl" if rows is not None else "") + (", detections.html)" if "html" in report else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m pg_finetune.evaluate"))
