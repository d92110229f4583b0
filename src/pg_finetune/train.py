"""Fine-tune PaliGemma / PaliGemma 2 from a YAML recipe.

    python -m pg_finetune.train --recipe recipes/tiny/easyvqa_full.yaml
    python -m pg_finetune.train --recipe recipes/tuxemon_caption.yaml training.learning_rate=1e-4
    accelerate launch -m pg_finetune.train --recipe recipes/tuxemon_caption.yaml

Stages, top to bottom: recipe -> model (+ tuning) -> data + collator ->
task metric before training -> Trainer -> save (checkpoint, processor, recipe)
-> task metric after training. Overrides are `section.key=value`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from pg_finetune.augment import DetectionAugment, EpochCallback, collect_classes
from pg_finetune.collator import PaliGemmaCollator
from pg_finetune.data import BadRecordError
from pg_finetune.generate import GenerationSettings, evaluate_task
from pg_finetune.model import ModelLoadError, load_model, load_processor
from pg_finetune.model_card import write_model_card
from pg_finetune.recipe import Recipe, RecipeError, load_recipe, redact_recipe, save_recipe
from pg_finetune.recipe_data import load_eval_records, train_dataset
from pg_finetune.report import write_report
from pg_finetune.tasks import get_task
from pg_finetune.trainer import (
    STAGING_PREFIX,
    NonFiniteLossError,
    PaliGemmaTrainer,
    last_complete_checkpoint,
    remove_partial_checkpoints,
)
from pg_finetune.tuning import apply_tuning, describe_parameters, merge_adapter_into_base, merge_lora

logger = logging.getLogger("pg_finetune.train")

DEFAULT_RECIPE = "recipes/tiny/easyvqa_full.yaml"


# ----------------------------------------------------------------------------------------------------
# Callbacks: generation metrics during training; test-only hooks for the resume tests
# (checkpoints, the recipe beside each one, and the NaN guard live in pg_finetune.trainer)
# ----------------------------------------------------------------------------------------------------
KILL_AT_STEP_ENV = "PG_FINETUNE_KILL_AT_STEP"  # tests: SIGKILL this process at the end of step N
TRACE_BATCHES_ENV = "PG_FINETUNE_TRACE_BATCHES"  # tests: append each collated batch's records to a file


class KillAtStepCallback(TrainerCallback):
    """Test hook: the process really dies by SIGKILL after optimizer step `step` (before any save)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class TracingCollator:
    """Test hook: collate, then append `{"ids", "texts"}` of the batch to a JSONL file (flushed per batch).

    The Trainer's dataloader collates one batch ahead of the step that consumes it, so a trace
    holds every consumed batch in order plus at most one prefetched batch at its end.
    """

    def __init__(self, collator: PaliGemmaCollator, path: str):
        self.collator, self.path = collator, path

    def __getattr__(self, name: str):
        return getattr(self.collator, name)

    def __call__(self, records: list[dict | None]) -> dict:
        batch = self.collator(records)
        kept = [r for r in records if r is not None]
        line = {"ids": [r.get("id") for r in kept], "texts": [f"{r['prefix']}\n{r['suffix']}" for r in kept]}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return batch


class GenerationEvalCallback(TrainerCallback):
    """Every `eval.eval_steps` steps, score generations on the capped eval subset and log them."""

    def __init__(self, run: RunEval, every: int):
        self.run, self.every = run, every
        self.trainer: Trainer | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.trainer is not None and state.global_step % self.every == 0:
            scores = self.run(self.trainer.model, label=f"step {state.global_step}")
            self.trainer.log({f"eval/{k}": v for k, v in scores.items()})


class RunEval:
    """Generation metric of the task on a fixed eval subset (the same records before and after)."""

    def __init__(self, recipe: Recipe, processor, task, records: list[dict], out_dir: Path, is_main: bool):
        self.recipe, self.processor, self.task, self.records = recipe, processor, task, records
        self.out_dir, self.is_main = out_dir, is_main
        self.settings = GenerationSettings(
            max_new_tokens=recipe.eval.max_new_tokens or task.max_new_tokens,
            num_beams=recipe.eval.num_beams,
            do_sample=recipe.eval.do_sample,
            batch_size=recipe.eval.batch_size,
        )

    def __call__(self, model, label: str, save_as: str | None = None) -> dict[str, float]:
        scores, rows = evaluate_task(
            model, self.processor, self.task, self.records, self.settings,
            max_length=self.recipe.data.max_length, progress=self.is_main, desc=f"eval ({label})",
        )
        if self.is_main:
            logger.info("%s on %d held-out examples (%s): %s", self.task.name, len(rows), label, _fmt(scores))
            if save_as:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                with open(self.out_dir / f"predictions_{save_as}.jsonl", "w") as f:
                    for row in rows:
                        f.write(json.dumps(row) + "\n")
        return scores


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in scores.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pg_finetune.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"YAML recipe (default: {DEFAULT_RECIPE})")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. training.max_steps=100 tuning.lora_r=16")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    return parser.parse_args(argv)


def training_arguments(recipe: Recipe, output_dir: Path) -> TrainingArguments:
    t, log = recipe.training, recipe.logging
    if log.report_to == "tensorboard":  # transformers 5 reads the event directory from the environment
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "logs"))
    if log.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", log.wandb_mode)
        if log.wandb_project:
            os.environ.setdefault("WANDB_PROJECT", log.wandb_project)
    return TrainingArguments(
        output_dir=str(output_dir),
        run_name=log.run_name or recipe.name,
        report_to=[] if log.report_to == "none" else [log.report_to],
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
        weight_decay=t.weight_decay,
        optim=t.optim,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # never smooth a NaN over; PaliGemmaTrainer stops at the first one
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=t.bf16,
        fp16=t.fp16,
        dataloader_num_workers=t.dataloader_num_workers,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # records are dicts with images; the collator picks what it needs
        label_names=["labels"],
        use_cpu=t.use_cpu,
        disable_tqdm=False,
        log_level="info" if recipe.logging.log_level == "debug" else "warning",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)

    # ---------------------------------------------------------------------------------------------- recipe
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (RecipeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_recipe:
        save_recipe(recipe, "/dev/stdout")
        return 0
    logging.getLogger("pg_finetune").setLevel(recipe.logging.log_level.upper())
    transformers.logging.set_verbosity_warning()
    output_dir = Path(recipe.training.output_dir)
    set_seed(recipe.training.seed)
    is_main = int(os.environ.get("RANK", "0")) == 0
    started = time.time()

    # ----------------------------------------------------------------------------------- model + tuning
    try:
        processor = load_processor(recipe.model.name_or_path, revision=recipe.model.revision)
        model = load_model(recipe.model, recipe.tuning)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model = apply_tuning(model, recipe.tuning, gradient_checkpointing=recipe.training.gradient_checkpointing)
    logger.info("tuning method %s: %s", recipe.tuning.method, describe_parameters(model))

    # ------------------------------------------------------------------------------------ data + collator
    task = get_task(recipe.task.name)
    d = recipe.data
    try:
        train_data = train_dataset(recipe)
        eval_records = load_eval_records(recipe)
    except (BadRecordError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logger.info("train: %d records from %s; eval: %d records", len(train_data), d.train, len(eval_records))
    t = recipe.task
    augment = None
    if t.name == "detect" and (t.shuffle_objects is not False or t.negatives > 0):
        augment = train_data = DetectionAugment(
            train_data, seed=recipe.training.seed, shuffle_objects=t.shuffle_objects is not False,
            negatives=t.negatives, all_classes=collect_classes(train_data),
        )
    collator = PaliGemmaCollator(processor, max_length=d.max_length, padding_side=d.padding_side, truncation=d.truncation)

    # --------------------------------------------------------------------------------- metric before
    run_eval = RunEval(recipe, processor, task, eval_records, output_dir, is_main)
    before = run_eval(model, "before training", save_as="before") if eval_records and recipe.eval.before_and_after else None

    # ------------------------------------------------------------------------------------------ train
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, output_dir)
        remove_partial_checkpoints(output_dir)  # a save cut short by a crash; never resumed from
    callbacks: list[TrainerCallback] = []
    gen_eval = None
    if recipe.eval.eval_steps and eval_records:
        gen_eval = GenerationEvalCallback(run_eval, recipe.eval.eval_steps)
        callbacks.append(gen_eval)
    if augment is not None:
        callbacks.append(EpochCallback(augment))
    if os.environ.get(KILL_AT_STEP_ENV):
        callbacks.append(KillAtStepCallback(int(os.environ[KILL_AT_STEP_ENV])))
    train_collator = collator
    if os.environ.get(TRACE_BATCHES_ENV):
        train_collator = TracingCollator(collator, os.environ[TRACE_BATCHES_ENV])
    trainer = PaliGemmaTrainer(
        model=model,
        args=training_arguments(recipe, output_dir),
        train_dataset=train_data,
        data_collator=train_collator,
        processing_class=processor,
        callbacks=callbacks,
        recipe=recipe,  # written into every checkpoint, inside the atomic rename
        label_positions_loss=recipe.training.label_positions_loss,
        cache_image_features=recipe.training.cache_image_features,
    )
    if gen_eval:
        gen_eval.trainer = trainer
    resume = recipe.training.resume_from_checkpoint
    if resume == "auto":
        resume = last_complete_checkpoint(output_dir)  # never a tmp-* dir left by an interrupted save
        logger.info("resuming from %s", resume or "scratch (no checkpoint found)")
    elif resume is not None and not (Path(resume) / "trainer_state.json").is_file():
        print(
            f"error: training.resume_from_checkpoint: {resume} is not a complete checkpoint (no "
            "trainer_state.json); give a checkpoint-N directory, 'auto', or null",
            file=sys.stderr,
        )
        return 2
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except BadRecordError as err:  # an image that only fails when decoded, mid-epoch
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        _write_log_history(trainer, output_dir, is_main)
        last = last_complete_checkpoint(output_dir)
        print(
            f"error: {err.what} became NaN/inf at step {err.step}; training stopped before that step's "
            f"optimizer update. Last good checkpoint: {last or 'none saved yet'}. Lower "
            "training.learning_rate, check the data, or use bf16 instead of fp16.",
            file=sys.stderr,
        )
        return 3
    _write_log_history(trainer, output_dir, is_main)
    if collator.stats.truncated_prefix or collator.stats.truncated_suffix:
        logger.warning("truncation: %s", collator.stats.summary())

    # ------------------------------------------------------------------------------------------- save
    # Written under tmp-final/ and renamed when complete, like the checkpoints: a crash mid-save never
    # leaves a half-written final/ that someone loads.
    final_dir, staging = output_dir / "final", output_dir / f"{STAGING_PREFIX}final"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # on every rank: FSDP / ZeRO-3 gather the weights collectively
    if is_main:
        # Trainer.save_model also pickles TrainingArguments (torch.save); nothing reads it, and a pickle in
        # the directory people share and load is a hazard for them: the final model is safetensors + JSON only.
        (staging / "training_args.bin").unlink(missing_ok=True)
        processor.save_pretrained(staging)
        save_recipe(recipe, staging)
        shutil.rmtree(final_dir, ignore_errors=True)  # a re-run of the same recipe replaces its final/
        os.replace(staging, final_dir)
    trainer.accelerator.wait_for_everyone()
    if is_main:
        if recipe.training.merge_lora:
            merged_dir = output_dir / "merged"
            if recipe.tuning.method == "qlora":  # merge into a full-precision copy of the base, not the 4-bit one
                full_precision = replace(recipe.tuning, method="lora", load_in_4bit=False)
                merged = merge_adapter_into_base(load_model(recipe.model, full_precision), final_dir)
            else:
                merged = merge_lora(trainer.model)
            merged.save_pretrained(merged_dir)
            processor.save_pretrained(merged_dir)
            save_recipe(recipe, merged_dir)
            logger.info("merged LoRA weights into %s", merged_dir)

    # --------------------------------------------------------------------------------- metric after
    after = run_eval(trainer.model, "after training", save_as="after") if eval_records and recipe.eval.before_and_after else None
    if is_main:
        card = dict(
            trainable=describe_parameters(trainer.model),
            example_prompt=eval_records[0]["prefix"] if eval_records else train_data.rows_meta(0)["prefix"],
            max_new_tokens=run_eval.settings.max_new_tokens,
            before=before,
            after=after,
        )
        is_adapter = recipe.tuning.method in ("lora", "qlora")
        write_model_card(final_dir, redact_recipe(recipe), is_adapter=is_adapter, **card)
        if recipe.training.merge_lora:
            write_model_card(output_dir / "merged", redact_recipe(recipe), is_adapter=False, **card)
    summary = {
        "recipe": recipe.name,
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "wall_time_s": round(time.time() - started, 1),
        "parameters": describe_parameters(trainer.model),
        "before": before,
        "after": after,
        "final_dir": str(final_dir),
    }
    if is_main:
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(_summary_table(task.name, before, after, summary))
        if recipe.logging.html_report:
            try:
                print(f"report: {write_report(output_dir)}")
            except Exception as err:  # a finished training must not fail on its report
                logger.warning("report not written (python -m pg_finetune.report %s retries): %s", output_dir, err)
    return 0


def _write_log_history(trainer: Trainer, output_dir: Path, is_main: bool) -> None:
    """`output_dir/log_history.json`: every logged entry (loss, lr, grad_norm, eval/...) of the run."""
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(trainer.state.log_history, indent=1, default=float, allow_nan=True)
        (output_dir / "log_history.json").write_text(text + "\n")


def _summary_table(task: str, before: dict | None, after: dict | None, summary: dict) -> str:
    lines = [
        "",
        f"== {summary['recipe']}: {summary['steps']} steps in {summary['wall_time_s']} s, "
        f"final train loss {summary['train_loss']:.4f} ==",
    ]
    if before is not None and after is not None:
        lines.append(f"{'metric':<24}{'before':>10}{'after':>10}")
        for key in after:
            lines.append(f"{task + '/' + key:<24}{before.get(key, float('nan')):>10.4f}{after[key]:>10.4f}")
    lines.append(f"checkpoint: {summary['final_dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
