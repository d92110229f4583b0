"""Batched generation and task scoring, shared by training-time eval, the eval suite and the CLI.

Prompts are left-padded (so every row's new tokens start at the same column),
decoded with the KV cache, greedy unless sampling or beams are asked for. With
`constrain_detection`, rows whose prompt is `detect a ; b` are decoded under
`pg_finetune.tasks.detect.constrained.DetectionConstraint`, and rows whose prompt is `segment X`
under `pg_finetune.tasks.segment.constrained.SegmentationConstraint`, so their output always parses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from pg_finetune.collator import PaliGemmaCollator
from pg_finetune.tasks.base import ScoreOptions

logger = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 32
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # With do_sample: keep the k most likely tokens (0: no top-k filter; None: the model's generation config).
    top_k: int | None = None
    # > 1 discourages tokens already in the prompt or output (CTRL's penalty); 1.0 = off. Any decoding.
    repetition_penalty: float = 1.0
    batch_size: int = 16
    # Detect prompts only: mask tokens so the output is `<loc>x4 label ( ; ... )*` with prompt labels.
    constrain_detection: bool = False

    def generate_kwargs(self, tokenizer) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=self.do_sample,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if self.repetition_penalty != 1.0:
            kwargs.update(repetition_penalty=self.repetition_penalty)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
            if self.top_k is not None:
                kwargs.update(top_k=self.top_k)
        else:  # keep checkpoints' sampling defaults from warning about unused settings
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    processor: Any,
    records: Sequence[dict],
    settings: GenerationSettings | None = None,
    *,
    max_length: int = 512,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Return the decoded continuation of each record's prompt (suffix ignored)."""
    settings = settings or GenerationSettings()
    collator = PaliGemmaCollator(processor, max_length=max_length, padding_side="left")
    tokenizer = processor.tokenizer
    device = _device_of(model)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    label_tries: dict = {}  # labels -> token trie, shared by the batches of this call
    bar = tqdm(total=len(records), desc=desc, unit="ex", disable=not progress, leave=False)
    try:
        for start in range(0, len(records), settings.batch_size):
            chunk = [{k: v for k, v in r.items() if k != "suffix"} for r in records[start : start + settings.batch_size]]
            batch = {k: v.to(device) for k, v in collator(chunk).items()}
            kwargs = settings.generate_kwargs(tokenizer)
            if settings.constrain_detection:
                kwargs.update(_detection_constraint(tokenizer, chunk, batch, settings, label_tries))
            generated = model.generate(**batch, **kwargs)
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return outputs


def _detection_constraint(tokenizer, chunk, batch, settings, label_tries) -> dict[str, Any]:
    """`logits_processor` kwargs constraining this batch's detect rows; {} when none is a detect prompt."""
    from transformers import LogitsProcessorList

    from pg_finetune.tasks.detect.constrained import DetectionConstraint
    from pg_finetune.tasks.detect.targets import prompt_classes
    from pg_finetune.tasks.segment.constrained import SegmentationConstraint

    prefixes = [r["prefix"] for r in chunk]
    # `segment X` rows: 4 loc + 16 seg tokens then eos; each processor leaves the other's rows alone
    segment = SegmentationConstraint.for_records(tokenizer, prefixes, prompt_length=batch["input_ids"].shape[1])
    processors = [segment] if segment is not None else []
    if any(prompt_classes(p) for p in prefixes):
        processors.append(DetectionConstraint.for_records(
            tokenizer, prefixes, prompt_length=batch["input_ids"].shape[1],
            max_new_tokens=settings.max_new_tokens, tries=label_tries,
        ))  # fmt: skip
    return {"logits_processor": LogitsProcessorList(processors)} if processors else {}


def evaluate_task(
    model: torch.nn.Module,
    processor: Any,
    task: Any,
    records: Sequence[dict],
    settings: GenerationSettings | None = None,
    *,
    metric: Any = None,
    **kwargs: Any,
) -> tuple[dict[str, float], list[dict]]:
    """Generate for `records`, parse with the task, score with `metric` (default: the task's own).

    Returns (scores, predictions) where each prediction row holds id, prompt, prediction and
    reference, ready to be written as JSONL. Records the metric cannot score are left out
    (`scoreable`).
    """
    metric = metric or task.metric
    kept, references = scoreable(metric, records)
    raw = generate(model, processor, kept, settings, **kwargs)
    predictions = [task.parse(text) for text in raw]
    scores = metric.score(predictions, references, ScoreOptions()).metrics
    rows = [
        {"id": r.get("id", str(i)), "prefix": r["prefix"], "prediction": p, "raw": t, "references": ref}
        for i, (r, p, t, ref) in enumerate(zip(kept, predictions, raw, references, strict=True))
    ]
    return scores, rows


def scoreable(metric: Any, records: Sequence[dict]) -> tuple[list[dict], list[Any]]:
    """(records the metric can score, their references); the others are left out with one warning.

    ValueError when there are records and none can be scored: a score of nothing would read as 0.
    """
    references, kept, problems = [], [], []
    for i, record in enumerate(records):
        try:
            references.append(metric.reference(record))
        except (KeyError, ValueError, TypeError) as err:
            problems.append(f"{record.get('where') or record.get('id', i)}: {err}")
            continue
        kept.append(record)
    if problems:
        if not kept:
            raise ValueError(f"metric {metric.name!r} can score none of the {len(records)} eval records "
                             f"(first: {problems[0]}); a record holds {metric.references_help}")  # fmt: skip
        logger.warning("%d of %d eval records not scored by %s (first: %s)", len(problems), len(records),
                       metric.name, problems[0])  # fmt: skip
    return kept, references
