"""Benchmarks are data: a task, a default source and split, an optional metric and prompt.

    python -m eval.run --benchmark cococap --data dataset_coco.json --image-root coco/ --split val --model M
    python -m eval.run --benchmark vqav2 --predictions preds.jsonl --references refs.jsonl

The task (`pg_finetune.tasks`) brings the prompt format, the parser, the references and the
metric; a benchmark only says where its data is and, where the published number uses another
metric than the task's own, which of the task's metrics (VQAv2's official accuracy over the VQA
task's parser; RefCOCO's first-box IoU over the detect task's). Its data is read by
`pg_finetune.data.load_records`, the same reader training uses, so anything that can be
evaluated can be trained on. Metric names are namespaced `benchmark/split/metric`.

Adding a benchmark: one entry below.
"""

from __future__ import annotations

from dataclasses import dataclass

from pg_finetune.tasks import Metric, Task, get_task


@dataclass(frozen=True)
class Benchmark:
    """name: registry key and first part of metric names.
    task: the task whose prompt, parser and generation budget apply; metric: one of the task's
        metrics by name (None: the task's own).
    source, split: default data (source None: `--data` is required); source_help: how to make the
        default source when it is missing.
    prefix: prompt for records without one (may name record fields: `answer en {question}`); None:
        the task's default.
    """

    name: str
    description: str
    task: str
    split: str
    source: str | None = None
    metric: str | None = None
    prefix: str | None = None
    source_help: str = ""

    def get_task(self) -> Task:
        return get_task(self.task)

    def get_metric(self) -> Metric:
        return self.get_task().get_metric(self.metric)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("cococap", "COCO captions (Karpathy JSON or captions JSONL), CIDEr/BLEU-4/ROUGE-L", "caption",
                  split="val", prefix="caption en"),
        Benchmark("caption", "any caption data (--data), CIDEr/BLEU-4/ROUGE-L", "caption", split="validation"),
        Benchmark("detection", "any detection JSONL (--data): mIoU, acc@0.5/0.75, COCO mAP, invalid rate", "detect",
                  split="validation"),
        Benchmark("refexp", "referring expressions, one box per prompt: mIoU, acc@0.5", "detect", split="validation",
                  metric="refexp", prefix="detect {expression}"),
        Benchmark("vqav2", "VQAv2, official VQA accuracy", "vqa", split="validation", source="HuggingFaceM4/VQAv2",
                  metric="vqav2_accuracy", prefix="answer en {question}"),
        Benchmark("count_intersections", "line-intersection counting, accuracy and per-class accuracy",
                  "count_intersections", split="test", source="data/count_intersections",
                  source_help="make it with `python data_prep/make_count_intersections.py --out "
                              "data/count_intersections --split test --seed 1 --num 200`"),
        Benchmark("refcoco_seg", "referring segmentation (--data), masks as RLE/PNG: mask mIoU, boxacc@0.5/0.75",
                  "segment", split="validation", prefix="segment {expression}"),
        Benchmark("easyvqa", "easy-VQA shapes (offline), exact match", "vqa", split="test", source="builtin:easyvqa"),
        Benchmark("vqa", "generic VQA (--data), exact match", "vqa", split="validation"),
        Benchmark("ocr", "text reading (--data): exact match, CER, WER, ANLS", "ocr", split="validation"),
        Benchmark("docvqa", "DocVQA / InfoVQA (--data), ANLS", "vqa", split="validation", metric="anls",
                  prefix="answer en {question}"),
        Benchmark("chartqa", "ChartQA (--data), relaxed accuracy (numbers within 5%)", "vqa", split="test",
                  metric="relaxed_accuracy", prefix="answer en {question}"),
        Benchmark("ai2d", "AI2D diagrams (--data; prefix lists the options), multiple-choice accuracy",
                  "vqa", split="test", metric="multiple_choice_accuracy"),
        Benchmark("scienceqa", "ScienceQA (--data; prefix lists the options), multiple-choice accuracy",
                  "vqa", split="test", metric="multiple_choice_accuracy"),
    )
}  # fmt: skip


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; KeyError listing the valid names otherwise."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; valid: {', '.join(sorted(BENCHMARKS))}") from None
