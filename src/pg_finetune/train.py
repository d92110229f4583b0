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
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from pg_finetune.augment import DetectionAugment, EpochCallback, collect_classes
from pg_finetune.collator import PaliGemmaCollator
from pg_finetune.data import BadRecordError, load_records
from pg_finetune.generate import GenerationSettings, evaluate_task
from pg_finetune.model import ModelLoadError, load_model, load_processor
from pg_finetune.model_card import write_model_card
from pg_finetune.recipe import Recipe, RecipeError, load_recipe, save_recipe
from pg_finetune.tasks import get_task
from pg_finetune.tuning import apply_tuning, describe_parameters, merge_adapter_into_base, merge_lora

logger = logging.getLogger("pg_finetune.train")

DEFAULT_RECIPE = "recipes/tiny/easyvqa_full.yaml"


class NaNLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------
# Callbacks: the resolved recipe beside every checkpoint, a NaN guard, generation metrics during training
# ----------------------------------------------------------------------------------------------------
class SaveRecipeCallback(TrainerCallback):
    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                save_recipe(self.recipe, checkpoint)


class NaNGuardCallback(TrainerCallback):
    """Stop at the first non-finite training loss; the last saved checkpoint stays the good one."""

    def __init__(self):
        self.bad_step: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad_step = state.global_step
            control.should_training_stop = True
            control.should_save = False


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


def _smallest(*limits: int | None) -> int | None:
    given = [n for n in limits if n is not None]
    return min(given) if given else None


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
        logging_nan_inf_filter=False,  # let NaNGuardCallback see a NaN instead of a smoothed-over loss
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=t.bf16,
        fp16=t.fp16,
        dataloader_num_workers=t.dataloader_num_workers,
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
    common = dict(
        image_column=d.image_column,
        prefix_column=d.prefix_column,
        suffix_column=d.suffix_column,
        default_prefix=recipe.task.prefix or task.default_prefix,
        skip_bad_records=d.skip_bad_records,
    )
    try:
        train_data = load_records(d.train, d.train_split, limit=d.max_train_samples, require_suffix=True, **common)
        eval_records: list[dict] = []
        eval_split = d.eval_split
        if eval_split and d.eval is None and Path(d.train).is_file():
            # one JSONL file has no splits: its "test" would be the training data again
            logger.warning("data.train is a single file and data.eval is not set: no held-out evaluation")
            eval_split = None
        if eval_split:
            eval_data = load_records(
                d.eval or d.train, eval_split, limit=_smallest(recipe.eval.max_samples, d.max_eval_samples),
                require_suffix=False, **common,
            )
            eval_records = [r for r in (eval_data[i] for i in range(len(eval_data))) if r is not None]
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
    nan_guard = NaNGuardCallback()
    callbacks: list[TrainerCallback] = [SaveRecipeCallback(recipe), nan_guard]
    gen_eval = None
    if recipe.eval.eval_steps and eval_records:
        gen_eval = GenerationEvalCallback(run_eval, recipe.eval.eval_steps)
        callbacks.append(gen_eval)
    if augment is not None:
        callbacks.append(EpochCallback(augment))
    trainer = Trainer(
        model=model,
        args=training_arguments(recipe, output_dir),
        train_dataset=train_data,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
    )
    if gen_eval:
        gen_eval.trainer = trainer
    resume = recipe.training.resume_from_checkpoint
    if resume == "auto":
        resume = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        logger.info("resuming from %s", resume or "scratch (no checkpoint found)")
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except BadRecordError as err:  # an image that only fails when decoded, mid-epoch
        print(f"error: {err}", file=sys.stderr)
        return 2
    if nan_guard.bad_step is not None:
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        print(
            f"error: the training loss became NaN/inf at step {nan_guard.bad_step}; training stopped. "
            f"Last good checkpoint: {last or 'none saved yet'}. Lower training.learning_rate, check the data, "
            "or use bf16 instead of fp16.",
            file=sys.stderr,
        )
        return 3
    if collator.stats.truncated_prefix or collator.stats.truncated_suffix:
        logger.warning("truncation: %s", collator.stats.summary())

    # ------------------------------------------------------------------------------------------- save
    final_dir = output_dir / "final"
    trainer.save_model(str(final_dir))  # on every rank: FSDP / ZeRO-3 gather the weights collectively
    if is_main:
        processor.save_pretrained(final_dir)
        save_recipe(recipe, final_dir)
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
        write_model_card(final_dir, recipe, is_adapter=is_adapter, **card)
        if recipe.training.merge_lora:
            write_model_card(output_dir / "merged", recipe, is_adapter=False, **card)
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
    return 0


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
