"""Fine-tune PaliGemma / PaliGemma 2 from a YAML recipe.

    python -m pg_finetune.train --recipe recipes/tiny/easyvqa_full.yaml
    python -m pg_finetune.train --recipe recipes/tuxemon_caption.yaml training.learning_rate=1e-4
    accelerate launch -m pg_finetune.train --recipe recipes/tuxemon_caption.yaml

Stages, top to bottom: recipe -> model (+ tuning) -> data + collator -> run directory (resume only
this recipe's own checkpoints; a finished run is not trained again) -> Trainer -> task metric before
training -> train (every eval.eval_steps: the task metric, the held-out loss, and with
eval.metric_for_best best/ and early stopping) -> save (checkpoint, processor, recipe) -> task metric
after training -> metrics.json (the whole run, over every kill and resume). Overrides are
`section.key=value`.

torch, transformers and the rest of the training stack are imported only once the recipe is
valid, so a bad recipe is refused in well under a second. Exit codes: 0 done; 2 bad arguments,
recipe or input (data, model); 3 the loss or a weight became NaN/inf; 1 anything else (a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pg_finetune.imports import collector_frozen, import_without_bitsandbytes
from pg_finetune.recipe import Recipe, RecipeError, load_recipe, redact_recipe, save_recipe

if TYPE_CHECKING:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pg_finetune.collator import PaliGemmaCollator

logger = logging.getLogger("pg_finetune.train")

DEFAULT_RECIPE = "recipes/tiny/easyvqa_full.yaml"


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
    import torch
    from transformers import TrainingArguments

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


def _output_dir_problem(path: Path) -> str | None:
    """Why `path` cannot become the run's directory (None when it can), without creating anything."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def main(
    argv: list[str] | None = None,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    wrap_collator: Callable[[PaliGemmaCollator], Callable[[list], dict]] | None = None,
) -> int:
    """Run a recipe from command-line arguments and return the exit code (see the module docstring).

    `callbacks` join the Trainer's own; `wrap_collator(collator)` gives the collator the Trainer
    calls instead of `collator` (tests/hooks.py uses both to kill a run and to trace its batches).
    """
    try:
        args = parse_args(argv)
    except SystemExit as usage:  # argparse: --help (0) or a usage error (2); a caller gets the code back
        return usage.code if isinstance(usage.code, int) else 2
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
    problem = _output_dir_problem(Path(recipe.training.output_dir))
    if problem:  # before the training stack loads: a bad output_dir must not cost a model load
        print(f"error: training.output_dir {recipe.training.output_dir}: {problem}; choose another path",
              file=sys.stderr)  # fmt: skip
        return 2

    # --------------------------------------------------------------------------- the training stack
    # Imported here, after the recipe is known to be valid: these take seconds to import.
    if not recipe.tuning.method_spec.quantized:  # Trainer -> peft -> bitsandbytes otherwise (see imports.py)
        import_without_bitsandbytes("transformers.trainer")
    import transformers
    from transformers import set_seed

    from pg_finetune.collator import PaliGemmaCollator, SequenceTooLongError
    from pg_finetune.data import BadRecordError
    from pg_finetune.data.bad_records import SubstituteBadRecords
    from pg_finetune.model import ModelLoadError, load_model, load_processor
    from pg_finetune.model_card import write_model_card
    from pg_finetune.recipe_data import load_eval_records, train_dataset
    from pg_finetune.report import write_report
    from pg_finetune.run_dir import (
        BEST_DIR,
        STAGING_PREFIX,
        RunDirError,
        RunState,
        RunStateCallback,
        checkpoint_step,
        choose_checkpoint,
        final_is_current,
        last_complete_checkpoint,
        remove_partial_checkpoints,
    )
    from pg_finetune.tasks import get_task
    from pg_finetune.trainer import GenerationEvalCallback, NonFiniteLossError, PaliGemmaTrainer, RunEval
    from pg_finetune.tuning import apply_tuning, describe_parameters, merge_adapter_into_base, merge_lora

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
    method = recipe.tuning.method_spec  # its registry record: adapter or not, 4 bit or not
    logger.info("tuning method %s: %s", recipe.tuning.method, describe_parameters(model))

    # ------------------------------------------------------------------------------------ data + collator
    task = get_task(recipe.task.name)
    d = recipe.data
    try:
        train_data = records = train_dataset(recipe)
        eval_records = load_eval_records(recipe)
        known_bad = _check_images(records, recipe, is_main) if d.check_images else set()
    except (BadRecordError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logger.info("train: %d records from %s; eval: %d records", len(train_data), d.train, len(eval_records))
    if d.skip_bad_records:  # a record whose image fails is replaced by the next good one: batches stay full
        train_data = SubstituteBadRecords(records, known_bad)
    augment_callbacks: list[TrainerCallback] = []
    if task.augment is not None:  # e.g. detection: a new object order every epoch, negative classes
        try:
            train_data, augment_callbacks = task.augment(train_data, recipe.task, recipe.training.seed)
        except ValueError as err:  # records whose fields cannot make the augmented target, each named
            print(f"error: {err}", file=sys.stderr)
            return 2
    if d.augment is not None:  # data.augment: training images only, eval records are never augmented
        from pg_finetune.image_augment import ImageAugment, parse_augment
        from pg_finetune.tasks.detect.augment import EpochCallback

        train_data = ImageAugment(train_data, parse_augment(d.augment)[0], seed=recipe.training.seed)
        # a new draw each epoch, the same after a resume; set_epoch reaches a wrapped DetectionAugment too
        augment_callbacks = [EpochCallback(train_data)]
    collator = PaliGemmaCollator(processor, max_length=d.max_length, padding_side=d.padding_side, truncation=d.truncation)
    # The held-out loss: the training layout and max_length on the eval records; prompts are cut rather
    # than the run stopped mid-training by an over-long eval record (training's truncation: error).
    loss_collator = PaliGemmaCollator(processor, max_length=d.max_length, padding_side=d.padding_side) if recipe.eval.loss else None
    try:
        run_eval = RunEval(recipe, processor, task, eval_records, output_dir, is_main, loss_collator=loss_collator)
        best_problem = _metric_for_best_problem(recipe, run_eval) if recipe.eval.metric_for_best else None
    except ValueError as err:  # the eval records hold nothing the task's metric can score
        print(f"error: eval: {err}", file=sys.stderr)
        return 2
    if best_problem:
        print(f"error: {best_problem}", file=sys.stderr)
        return 2

    # ------------------------------------------------------------------------- run directory + resume
    # A run resumes or replaces only its own outputs: every checkpoint and final/ carries the recipe
    # that wrote it (trainer.MAY_DIFFER_ON_RESUME says which keys a resume may change).
    try:
        resume = choose_checkpoint(recipe, is_main)
    except RunDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if recipe.training.resume_from_checkpoint == "auto":
        logger.info("resuming from %s", resume or "scratch (no checkpoint found)")
    resumed_step = checkpoint_step(resume) if resume else 0
    run_state = RunState(output_dir, started, first_step=resumed_step, fresh=resume is None, is_main=is_main)
    trainer_callbacks: list[TrainerCallback] = [RunStateCallback(run_state)]
    best = _best_so_far(recipe, run_eval, resume) if recipe.eval.metric_for_best else None
    if resume is None and is_main and (output_dir / BEST_DIR).is_dir():  # an earlier run's of this recipe
        logger.info("starting from scratch: removing %s, the best of an earlier run", output_dir / BEST_DIR)
        shutil.rmtree(output_dir / BEST_DIR)
    gen_eval = None
    if recipe.eval.eval_steps and eval_records:
        gen_eval = GenerationEvalCallback(run_eval, recipe.eval.eval_steps, best=best)
        trainer_callbacks.append(gen_eval)
    trainer_callbacks += augment_callbacks
    trainer_callbacks += callbacks
    trainer = PaliGemmaTrainer(
        model=model,
        args=training_arguments(recipe, output_dir),
        train_dataset=train_data,
        data_collator=wrap_collator(collator) if wrap_collator else collator,
        processing_class=processor,
        callbacks=trainer_callbacks,
        recipe=recipe,  # written into every checkpoint, inside the atomic rename
        label_positions_loss=recipe.training.label_positions_loss,
        cache_image_features=recipe.training.cache_image_features,
    )
    if gen_eval:
        gen_eval.trainer = trainer
    trainer.best = best  # saved in every checkpoint: a resume keeps the best so far
    # A checkpoint at max_steps is a finished run (transformers would train one step past it): nothing
    # to do when final/ holds its result; when a kill cut the final save short, write final/ from it.
    finish_only = False
    early_stopped = best is not None and resume is not None and best.should_stop  # stopped at that checkpoint
    if resume is not None and (resumed_step >= (planned := trainer.planned_max_steps()) or early_stopped):
        further = "raise training.max_steps to train further"
        if early_stopped:  # the run ended there: nothing to train, final/ is that step's weights
            planned = resumed_step
            further = "stopped early: raise eval.early_stopping_patience or set it null to train further"
        if final_is_current(output_dir, recipe):
            print(f"{output_dir}: this run is complete ({Path(resume).name}, max {planned} steps) and final/ "
                  f"holds its result; nothing to do ({further})")
            return 0
        if resumed_step > planned:
            print(f"error: {resume} is at step {resumed_step}, past this recipe's {planned} steps; give "
                  "training.resume_from_checkpoint an earlier checkpoint-N, or raise training.max_steps",
                  file=sys.stderr)
            return 2
        finish_only = True
        logger.info("%s is at the last step (%d): writing final/ from it without training", resume, planned)

    # --------------------------------------------------------------------------------- metric before
    before_and_after = bool(eval_records) and recipe.eval.before_and_after
    if finish_only:  # scored by the segment that trained, before its first step
        before, loss_before = run_state.data.get("before"), run_state.data.get("eval_loss_before")
    else:
        before = run_eval(model, "before training", save_as="before") if before_and_after else None
        loss_before = run_eval.loss(model, "before training", trainer.accelerator.autocast) if before_and_after else None

    # ------------------------------------------------------------------------------------------ train
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, output_dir)
        remove_partial_checkpoints(output_dir)  # a save cut short by a crash; never resumed from
        run_state.update(resumed_step, before=before, eval_loss_before=loss_before)
    if finish_only:
        trainer.load_checkpoint_weights(resume)
    else:
        set_seed(recipe.training.seed)  # as Trainer init did: the before-eval must not change training's RNG
        try:
            with collector_frozen():  # ~0.4 s less start-up: the Trainer's gc.collect() skips the imports' objects
                trainer.train(resume_from_checkpoint=resume)
        except (BadRecordError, SequenceTooLongError) as err:  # a bad image, or too long under truncation: error
            print(f"error: {err}", file=sys.stderr)
            return 2
        except NonFiniteLossError as err:
            _write_log_history(trainer, output_dir, is_main)
            run_state.update(trainer.state.global_step)
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
    if records.skipped:
        counts = ", ".join(f"{reason}: {n}" for reason, n in records.skipped.most_common())
        logger.warning("skipped bad training records (%s)", counts)

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
            if method.quantized:  # merge into a full-precision copy of the base, not the 4-bit one
                merged = merge_adapter_into_base(load_model(recipe.model), final_dir)
            else:
                merged = merge_lora(trainer.model)
            merged.save_pretrained(merged_dir)
            processor.save_pretrained(merged_dir)
            save_recipe(recipe, merged_dir)
            logger.info("merged LoRA weights into %s", merged_dir)

    # --------------------------------------------------------------------------------- metric after
    after = run_eval(trainer.model, "after training", save_as="after") if before_and_after else None
    loss_after = run_eval.loss(trainer.model, "after training", trainer.accelerator.autocast) if before_and_after else None
    if is_main:
        card = dict(
            trainable=describe_parameters(trainer.model),
            example_prompt=eval_records[0]["prefix"] if eval_records else train_data.rows_meta(0)["prefix"],
            max_new_tokens=run_eval.settings.max_new_tokens,
            before=before,
            after=after,
        )
        write_model_card(final_dir, redact_recipe(recipe), is_adapter=method.is_adapter, **card)
        if recipe.training.merge_lora:
            write_model_card(output_dir / "merged", redact_recipe(recipe), is_adapter=False, **card)
    # The whole run, over every segment a kill and resume made of it (trainer.run_totals, run_state.json).
    totals = trainer.run_totals
    run_state.update(totals.steps)
    runtime = totals.train_runtime_s
    samples = totals.steps * trainer.get_total_train_batch_size(trainer.args)
    summary = {
        "recipe": recipe.name,
        "train_loss": totals.train_loss,
        "steps": totals.steps,
        "train_samples_per_second": round(samples / runtime, 3) if runtime else None,
        "train_runtime_s": round(runtime, 1) if runtime is not None else None,
        "wall_time_s": run_state.wall_time_s,
        "segments": len(run_state.data["segments"]),
        "total_flos": trainer.state.total_flos,
        "skipped_records": dict(records.skipped),
        "parameters": describe_parameters(trainer.model),
        "before": before,
        "after": after,
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "best": best.record() if best is not None and best.step is not None else None,
        "early_stopped_at": totals.steps if early_stopped or (gen_eval and gen_eval.stopped_at) else None,
        "final_dir": str(final_dir),
    }
    if summary["best"]:
        summary["best"]["dir"] = str(output_dir / BEST_DIR)
        logger.info("best evaluation: %s (%s)", best.describe(), output_dir / BEST_DIR)
    if runtime is None:
        logger.warning("%s has no run_totals.json (an older checkpoint): training time and throughput unknown", resume)
    if is_main:
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(_summary_table(task.name, before, after, summary))
        if recipe.logging.html_report:
            try:
                print(f"report: {write_report(output_dir)}")
            except Exception as err:  # a finished training must not fail on its report
                logger.warning("report not written (python -m pg_finetune.report %s retries): %s", output_dir, err)
    return 0


def _metric_for_best_problem(recipe: Recipe, run_eval) -> str | None:
    """Why eval.metric_for_best cannot be compared (not a key this task's metric reports on these eval
    records), or None. The keys are found by scoring the records' own targets: no model runs."""
    if not run_eval.records:
        return "eval.metric_for_best: no eval records to compare (every one was dropped as bad); check data.eval"
    keys = run_eval.metric_keys()
    if recipe.eval.metric_for_best in keys:
        return None
    return (f"eval.metric_for_best: {recipe.eval.metric_for_best!r} is not a key that metric "
            f"{run_eval.metric.name!r} of task {recipe.task.name!r} reports; valid: {', '.join(keys)}")  # fmt: skip


def _best_so_far(recipe: Recipe, run_eval, resume: str | None):
    """The best evaluation so far: the resumed checkpoint's (read_best_so_far) when it compared the same
    metric, else none yet."""
    from pg_finetune.run_dir import read_best_so_far
    from pg_finetune.trainer import BestSoFar

    ev = recipe.eval
    saved = read_best_so_far(resume)
    if saved is not None and saved.get("metric") == ev.metric_for_best:
        best = BestSoFar.from_json(saved, ev.early_stopping_patience)
        logger.info("resumed best so far: %s, %d evaluation(s) since", best.describe(), best.evals_since_best)
        return best
    if saved is not None:
        logger.warning("%s compared %s, this run compares %s: the best starts over", resume, saved.get("metric"),
                       ev.metric_for_best)  # fmt: skip
    lower = run_eval.lower_is_better(ev.metric_for_best)
    return BestSoFar(ev.metric_for_best, lower_is_better=lower, patience=ev.early_stopping_patience)


def _check_images(records, recipe: Recipe, is_main: bool) -> set[int]:
    """data.check_images: every training image's header, before any training. Unreadable ones are all
    listed (BadRecordError), or with data.skip_bad_records counted and returned to be skipped."""
    from pg_finetune.data import BadRecordError
    from pg_finetune.data.bad_records import check_image_headers

    bad = check_image_headers(records, progress=is_main)
    if bad and not recipe.data.skip_bad_records:
        first = bad[0][1]
        raise BadRecordError(
            first.where, first.field, first.problem, reason=first.reason,
            problems=[(err.where, err.field, err.problem) for _, err in bad],
        )
    if len(bad) == len(records):
        raise ValueError(f"data.check_images: none of the {len(records)} training images is readable")
    for _, err in bad:
        records.skipped[err.reason] += 1
    if bad:
        logger.warning("data.check_images: %d of %d training images are unreadable and skipped from the start; "
                       "first: %s", len(bad), len(records), bad[0][1].where)
    else:
        logger.info("data.check_images: all %d training images are readable", len(records))
    return {i for i, _ in bad}


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
    if summary.get("eval_loss_before") is not None and summary.get("eval_loss_after") is not None:
        lines.append(f"{'held-out loss':<24}{summary['eval_loss_before']:>10.4f}{summary['eval_loss_after']:>10.4f}")
    if summary.get("early_stopped_at"):
        lines.append(f"stopped early at step {summary['early_stopped_at']} (eval.early_stopping_patience)")
    if summary.get("best"):
        best = summary["best"]
        lines.append(f"best: step {best['step']}, {best['metric']}={best['value']:.4f} ({best['dir']})")
    lines.append(f"checkpoint: {summary['final_dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
