"""A thin `transformers.Trainer` subclass: atomic checkpoints and a NaN check on every step.

    trainer = PaliGemmaTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                               recipe=recipe)
    trainer.train(resume_from_checkpoint=choose_checkpoint(recipe, is_main))  # pg_finetune.run_dir

Everything PaliGemma-specific lives in the collator; this class changes what the stock
Trainer (transformers 5.23) does not guarantee, or does slowly:

1. **A checkpoint directory appears only when it is complete.** `Trainer._save_checkpoint`
   writes `checkpoint-N/` in place (weights, optimizer, scheduler, RNG state, trainer state,
   one file after another), so a crash or SIGKILL during a save leaves a partial
   `checkpoint-N` that `get_last_checkpoint` would pick and `resume_from_checkpoint` would then
   fail on (or worse, half-load). Here every file, the resolved `recipe.yaml` included, is
   written under `tmp-checkpoint-N/checkpoint-N` and then renamed to `checkpoint-N` (one
   `os.replace` of a directory: atomic on POSIX filesystems). `tmp-*` never matches
   transformers' `^checkpoint-\\d+$`, so no resume can pick a partial save; stale ones are removed
   at the next save. `save_total_limit` rotation runs after the rename, over complete
   checkpoints only. Not covered: power loss before the OS flushes the files (no fsync), and
   `load_best_model_at_end` (this project does not use it).
2. **A non-finite loss stops training before the optimizer step that would poison the weights.**
   The loss of every micro-batch is checked in `training_step` (the stock logging path sees it
   only every `logging_steps`, after NaN weights may already have been saved), and before each
   save every trainable parameter is checked too (a finite loss can still give inf gradients).
   Both raise `NonFiniteLossError`, which `pg_finetune.train` turns into exit code 3.
3. **Resuming a full fine-tune loads the checkpoint's weights.** transformers 5 saves PaliGemma in
   its original key layout (`language_model.model.*`, via `revert_weight_conversion`), but
   `Trainer._load_from_checkpoint` loads `model.safetensors` with a raw non-strict
   `load_state_dict`: no key matches, transformers only warns, and training "resumes" from the
   base weights with the checkpoint's optimizer state (huggingface/transformers#43701, open).
   `_load_from_checkpoint` here maps the keys back and fails loudly on anything still missing.

4. **The loss is computed where the labels are** (`compute_loss` -> `pg_finetune.speed.suffix_loss`):
   logits only at suffix positions, and a frozen vision tower's image features cached; with
   big_vision's label smoothing and per-example normalisation when the recipe asks (the example
   count of the accumulated, all-process batch replaces the token count: `_get_num_items_in_batch`).
5. **Per-step bookkeeping without walking the model.** The stock loop counts the model's parameters
   for its FLOPs estimate (`floating_point_ops`, every step) and builds the parameter list for
   gradient clipping from `model.parameters()` (every step): on a tiny LoRA model ~2 ms of a ~45 ms
   step. Here the count is taken once per model and clipping gets the trainable parameters as a
   list kept per model (outside FSDP, DeepSpeed and XLA, which clip their own way). Same numbers.
6. **A run's totals survive a resume.** Every checkpoint carries `run_totals.json` (sum of the
   per-step losses and training seconds up to that step, over every segment that led to it), so
   `trainer.run_totals` after `train()` describes the whole run, not the last segment; and
   `train()` refuses a checkpoint already at max_steps (the stock loop would run one step past it).

The run directory's rules (whose checkpoints, intact or not, totals across resumes) are
`pg_finetune.run_dir`; bad training records at any batch size are `pg_finetune.data.bad_records`.

Also here, for the training entry: `RunEval` (the task metric on generated outputs, and the
teacher-forced loss on the eval records' suffixes, before and after training), `GenerationEvalCallback`
(the same every `eval.eval_steps` steps) and `BestSoFar` (which evaluation scored best on
`eval.metric_for_best`: best/ beside final/, early stopping; saved in every checkpoint so that a
resume keeps it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.core_model_loading import revert_weight_conversion
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, is_sagemaker_mp_enabled

from pg_finetune.generate import GenerationSettings, evaluate_task, scoreable
from pg_finetune.recipe import Recipe, save_recipe
from pg_finetune.run_dir import (
    BEST_JSON,
    BEST_SO_FAR,
    RUN_TOTALS,
    STAGING_PREFIX,
    RunTotals,
    checkpoint_step,
    read_run_totals,
    remove_partial_checkpoints,
    write_json,
)
from pg_finetune.speed import ImageFeatureCache, label_positions, suffix_loss
from pg_finetune.tasks.base import ScoreOptions

logger = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    """The loss (or a trainable weight) became NaN/inf; `step` is the optimizer step that failed (1-based)."""

    def __init__(self, step: int, what: str):
        self.step = step
        self.what = what
        super().__init__(f"{what} became NaN/inf at step {step}")


class LengthGroupedEpochSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler (shuffle, then sort within mega-batches of 50 batches),
    reshuffled from `seed + epoch`: the same order on every process and after a resume, which the
    stock one (global torch RNG) does not promise."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # Trainer calls this at the start of every epoch
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def text_lengths(dataset: Any, tokenizer: Any) -> list[int]:
    """Token count of each record's prefix + "\n" + suffix, read without decoding any image."""
    texts = []
    for i in range(len(dataset)):
        meta = dataset.rows_meta(i)
        texts.append(f"{meta.get('prefix') or ''}\n{meta.get('suffix') or ''}")
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


class PaliGemmaTrainer(Trainer):
    """`Trainer` with atomic checkpoints (recipe.yaml inside) and a per-step NaN/inf check."""

    def __init__(
        self,
        *args: Any,
        recipe: Recipe | None = None,
        label_positions_loss: bool = True,
        cache_image_features: bool = True,
        label_smoothing: float | None = None,
        loss_normalization: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self._staging_run_dir: str | None = None
        self.label_positions_loss = label_positions_loss
        # big_vision's loss options (speed.suffix_loss); None = the recipe's training section, else off
        training = recipe.training if recipe is not None else None
        if label_smoothing is None:
            label_smoothing = training.label_smoothing if training is not None else 0.0
        if loss_normalization is None:
            loss_normalization = training.loss_normalization if training is not None else "token"
        if loss_normalization not in ("token", "example"):
            raise ValueError(f"loss_normalization must be 'token' or 'example', got {loss_normalization!r}")
        stock_loss = not label_positions_loss or self.label_smoother is not None or self.compute_loss_func is not None
        if (label_smoothing or loss_normalization == "example") and stock_loss:
            raise ValueError(
                "label_smoothing and loss_normalization='example' are computed by the label-positions loss; "
                "set training.label_positions_loss: true (and no label_smoothing_factor / compute_loss_func)"
            )
        self.label_smoothing, self.loss_normalization = float(label_smoothing), loss_normalization
        if loss_normalization == "example":
            # compute_loss divides by the accumulated batch's example count (`_get_num_items_in_batch`)
            self.loss_is_scaled_for_ga = True
        # The cache calls the vision tower outside the wrapped model's forward: under FSDP or ZeRO-3 the
        # parameters are only gathered inside it, so there the features are computed the normal way.
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        # The features are computed under the autocast accelerate wraps the model's forward in (bf16/fp16).
        use_cache = cache_image_features and not sharded
        self.image_features = ImageFeatureCache(autocast=self.accelerator.autocast) if use_cache else None
        self._flos_parameters: tuple[torch.nn.Module, int] | None = None  # (model, non-embedding parameters)
        self._clipped_parameters: tuple[torch.nn.Module, list[torch.nn.Parameter]] | None = None

    # ------------------------------------------------------------------------------ run totals
    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any):
        """`Trainer.train`, refusing a checkpoint already at max_steps; sets `self.run_totals` (whole run)."""
        if resume_from_checkpoint is not None and checkpoint_step(resume_from_checkpoint) >= self.planned_max_steps():
            raise ValueError(
                f"{resume_from_checkpoint} is already at step {checkpoint_step(resume_from_checkpoint)} of "
                f"{self.planned_max_steps()}: nothing to train (transformers would run one step past max_steps)"
            )
        self._earlier = read_run_totals(resume_from_checkpoint)
        self._segment_started = time.time()
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        segment_steps = output.global_step - self._earlier.steps
        self.run_totals = self._earlier.extended(
            output.global_step, output.training_loss * segment_steps, time.time() - self._segment_started
        )
        return output

    def _run_totals_now(self) -> RunTotals:
        # What Trainer sums into its train_loss: the logged part plus the not yet logged one.
        segment_loss = float(getattr(self, "_total_loss_scalar", 0.0))
        pending = getattr(self, "_tr_loss", None)
        if pending is not None:
            segment_loss += float(pending.item())
        return self._earlier.extended(self.state.global_step, segment_loss, time.time() - self._segment_started)

    def planned_max_steps(self) -> int:
        """The optimizer steps this run trains to (max_steps, or num_train_epochs x steps per epoch), as `train` counts."""
        if getattr(self, "_planned_max_steps", None) is None:
            dataloader = self.get_train_dataloader()
            self._planned_max_steps = int(self.set_initial_training_values(self.args, dataloader)[-1])
        return self._planned_max_steps

    def load_checkpoint_weights(self, checkpoint: str) -> None:
        """Load only the model (or adapter) weights of `checkpoint`: to write final/ from it without training."""
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))  # its history
        self.run_totals = read_run_totals(checkpoint)

    # ------------------------------------------------------------------------------------ sampler
    def _get_train_sampler(self, train_dataset=None):
        # The stock group_by_length wants a `datasets.Dataset` length column or `input_ids` in every
        # item; our records are text + image, so lengths come from the text (image tokens are the
        # same count for every record).
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "rows_meta"):
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            return LengthGroupedEpochSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                text_lengths(dataset, tokenizer),
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Only the suffix carries labels (a few tokens of ~280): computing logits over all positions
        # spends most of the lm_head's work (257k vocabulary) on numbers the loss never reads.
        # `suffix_loss` equals the model's own loss (tests/test_speed.py) and adds big_vision's label
        # smoothing and per-example normalisation (tests/test_loss_options.py); anything it does not
        # cover (outputs wanted, transformers' label_smoothing_factor, a custom loss) goes through the
        # stock path, which knows neither option (so it gets no example count either).
        per_example = self.loss_normalization == "example"
        if (
            not self.label_positions_loss
            or return_outputs
            or "labels" not in inputs
            or self.label_smoother is not None
            or self.compute_loss_func is not None
        ):
            n_items = None if per_example else num_items_in_batch
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=n_items)
        # token: label tokens of the accumulated batch (all ranks); example: its examples (counted below)
        n_items = num_items_in_batch if (self.model_accepts_loss_kwargs or per_example) else None
        loss = suffix_loss(
            model, inputs, n_items, image_features=self.image_features,
            label_smoothing=self.label_smoothing, per_example=per_example,
        )
        if self.args.average_tokens_across_devices and n_items is not None:
            # as Trainer.compute_loss: the loss is a sum over this rank's items / all ranks' items
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        """The stock label-token count; for loss_normalization 'example' the examples (rows) instead.

        big_vision averages per-example losses over the global batch, examples without label tokens
        included (as 0). Counting every row of the accumulated micro-batches, summed over processes
        as transformers sums tokens, makes batch 2 x accumulation 4 (or 2 processes x 4) the same
        update as one batch of 8.
        """
        if self.loss_normalization != "example" or not batch_samples or "labels" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        count = torch.tensor(sum(int(batch["labels"].shape[0]) for batch in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        elif self.args.n_gpu > 1:  # DataParallel, as transformers does for tokens
            count = count // self.args.n_gpu
        return count

    # --------------------------------------------------------------------------- step bookkeeping
    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """`Trainer.floating_point_ops` (6 x input tokens x non-embedding parameters), counting once per model."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._flos_parameters is None or self._flos_parameters[0] is not self.model:
            self._flos_parameters = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * self._flos_parameters[1]

    def _clip_grad_norm(self, model):
        # accelerate's FSDP path needs model.parameters() itself (it compares the lists); DeepSpeed and
        # XLA clip elsewhere; DTensor gradients (tensor parallel) take the stock mesh-aware path.
        special = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA)
        if special or is_sagemaker_mp_enabled() or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        if self._clipped_parameters is None or self._clipped_parameters[0] is not model:
            # frozen parameters never get a gradient, and clip_grad_norm_ skips those without one
            self._clipped_parameters = (model, [p for p in model.parameters() if p.requires_grad])
        return self.accelerator.clip_grad_norm_(self._clipped_parameters[1], self.args.max_grad_norm)

    # ------------------------------------------------------------------------------------ NaN guard
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Checked before the optimizer step this micro-batch feeds, so the weights are still good.
        # The flag is reduced over processes so every rank stops at the same step (no DDP hang).
        bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLossError(self.state.global_step + 1, "the training loss")
        return loss

    def _check_weights_finite(self) -> None:
        bad_names = [
            name for name, param in self.model.named_parameters()
            if param.requires_grad and not torch.isfinite(param.detach()).all()
        ]
        bad = torch.tensor([float(len(bad_names))], device=self.args.device)
        if self.accelerator.num_processes > 1:  # FSDP shards: every rank must agree to stop
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            what = f"trainable weight {bad_names[0]}" if bad_names else "a trainable weight (on another rank)"
            raise NonFiniteLossError(self.state.global_step, what)

    # ------------------------------------------------------------------------- resume: model weights
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        files = _safetensors_files(folder)
        if hasattr(model, "peft_config") or self.is_fsdp_enabled or self.is_deepspeed_enabled or not files:
            # adapters (peft maps its own keys), FSDP/DeepSpeed states, or no safetensors: stock path
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        own = model.state_dict()
        # save_pretrained renamed the model's keys to the original layout; undo that, pairing by tensor identity
        key_of = {id(tensor): key for key, tensor in own.items()}
        file_to_model = {
            saved: key_of[id(tensor)]
            for saved, tensor in revert_weight_conversion(model, dict(own)).items()
            if id(tensor) in key_of
        }
        state: dict[str, torch.Tensor] = {}
        for file in files:
            for key, tensor in safetensors.torch.load_file(file, device="cpu").items():
                state[file_to_model.get(key, key)] = tensor
        result = model.load_state_dict(state, strict=False)
        loaded = {own[k].data_ptr() for k in state if k in own}
        missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]  # tied (lm_head) is fine
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"cannot resume from {folder}: its weights do not match the model (missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}); was it written by another recipe or model?"
            )
        logger.info("resumed weights: %d tensors from %s", len(state), folder)

    # ---------------------------------------------------------------------------- atomic checkpoints
    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, the stock save code sees the staging dir as the run dir.
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        self._check_weights_finite()
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            remove_partial_checkpoints(run_dir)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N on every rank
        finally:
            self._staging_run_dir = None
        written = os.path.join(staging, name)
        if self.args.should_save and self.recipe is not None:
            save_recipe(self.recipe, written)
        if self.args.should_save and hasattr(self, "_earlier"):
            write_json(Path(written) / RUN_TOTALS, asdict(self._run_totals_now()))
        if self.args.should_save and getattr(self, "best", None) is not None:  # a resume keeps the best so far
            write_json(Path(written) / BEST_SO_FAR, self.best.to_json())
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_K.pth, shards) are in
        if self.args.should_save:
            self._publish(written, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    @staticmethod
    def _publish(written: str, final: str) -> None:
        """Rename the finished checkpoint into place; an older one of the same step is replaced."""
        if os.path.exists(final):  # resumed from an earlier checkpoint and reached this step again
            old = os.path.join(os.path.dirname(written), "replaced")  # inside tmp-*: never picked
            os.replace(final, old)
        os.replace(written, final)

    def save_best(self, best: BestSoFar) -> Path:
        """Write `output_dir/best/`: what final/ holds (weights or adapter, processor, recipe.yaml) plus
        best.json, at the current weights. Like final/ and the checkpoints it is written under
        `tmp-best/best` and renamed into place, so no reader ever sees half of it. Call on every rank."""
        run_dir = Path(super()._get_output_dir(None))
        staging, final = run_dir / f"{STAGING_PREFIX}best", run_dir / "best"
        written = staging / "best"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.save_model(str(written))  # on every rank: FSDP / ZeRO-3 gather the weights collectively
        if self.args.should_save:
            (written / "training_args.bin").unlink(missing_ok=True)  # a pickle: see final/ in pg_finetune.train
            if self.processing_class is not None:
                self.processing_class.save_pretrained(written)
            if self.recipe is not None:
                save_recipe(self.recipe, written)
            write_json(written / BEST_JSON, best.record())
            self._publish(str(written), str(final))
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final


def _safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors weight files (one file, or the shards its index names)."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    single = folder / SAFE_WEIGHTS_NAME
    return [single] if single.is_file() else []


# ----------------------------------------------------------------------------------------------------
# Generation metrics: the task metric before and after training, and every eval.eval_steps
# ----------------------------------------------------------------------------------------------------
EVAL_LOSS_KEY = "loss"  # eval.metric_for_best may name the held-out loss too (logged as eval/loss)


class RunEval:
    """Generation metric of the task on a fixed eval subset (the same records before and after), and
    with `loss_collator` the teacher-forced loss on those records' suffixes (`loss`)."""

    def __init__(
        self, recipe: Recipe, processor, task, records: list[dict], out_dir: Path, is_main: bool,
        loss_collator: Callable[[list], dict] | None = None,
    ):  # fmt: skip
        self.recipe, self.processor, self.task, self.records = recipe, processor, task, records
        self.metric = task.get_metric(recipe.task.metric)  # the task's own unless the recipe names another
        if records:
            scoreable(self.metric, records)  # ValueError now, not mid-training, when none can be scored
        self.out_dir, self.is_main = out_dir, is_main
        self.loss_collator = loss_collator
        self.settings = GenerationSettings(
            max_new_tokens=recipe.eval.max_new_tokens or task.max_new_tokens,
            num_beams=recipe.eval.num_beams,
            do_sample=recipe.eval.do_sample,
            batch_size=recipe.eval.batch_size,
        )

    def __call__(self, model, label: str, save_as: str | None = None) -> dict[str, float]:
        scores, rows = evaluate_task(
            model, self.processor, self.task, self.records, self.settings, metric=self.metric,
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

    def metric_keys(self) -> list[str]:
        """The keys `__call__` reports on these records (some depend on the data, e.g. count's
        `accuracy/<n>`), found by scoring the records' own targets: no model needed. Plus `loss`
        when the held-out loss is computed."""
        kept, references = scoreable(self.metric, self.records)
        targets = [self.task.parse(r.get("suffix") or "") for r in kept]
        keys = list(self.metric.score(targets, references, ScoreOptions()).metrics)
        return keys + ([EVAL_LOSS_KEY] if self.loss_collator is not None else [])

    def lower_is_better(self, key: str) -> bool:
        return key == EVAL_LOSS_KEY or key in self.metric.lower_is_better

    @torch.no_grad()
    def loss(
        self, model, label: str = "", autocast: Callable[[], AbstractContextManager] | None = None
    ) -> float | None:
        """Teacher-forced loss on the eval records: the mean over every suffix (+ eos) token of the
        eval records of -log p(token | image, prefix, earlier suffix tokens), in eval mode (no dropout),
        batched by eval.batch_size through the training collator's layout and `suffix_loss`: the
        training loss's definition on held-out records, as plain cross-entropy (no label smoothing, a
        token mean whatever training.loss_normalization). None without a loss collator or any suffix."""
        records = [r for r in self.records if isinstance(r.get("suffix"), str)]
        if self.loss_collator is None or not records:
            return None
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        try:
            with autocast() if autocast is not None else nullcontext():
                for start in range(0, len(records), self.settings.batch_size):
                    batch = self.loss_collator(records[start : start + self.settings.batch_size])
                    batch = {k: v.to(device) for k, v in batch.items()}
                    n = label_positions(batch["labels"])[1].numel()
                    total += float(suffix_loss(model, batch, num_items_in_batch=1))  # summed over the tokens
                    tokens += n
        finally:
            model.train(was_training)
        value = total / max(tokens, 1)
        if self.is_main:
            logger.info("held-out loss on %d records, %d suffix tokens (%s): %.4f", len(records), tokens, label, value)
        return value


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in scores.items())


@dataclass
class BestSoFar:
    """The evaluation that scored best on `metric` so far, and how many evaluations since it.

    An evaluation is better only when strictly better (a tie keeps the earlier step, as transformers'
    `metric_for_best_model` does) and finite (a NaN never wins). `should_stop`: `patience` evaluations
    in a row without improvement (eval.early_stopping_patience; None = never). Saved in every checkpoint
    (`to_json` / `from_json`, run_dir.BEST_SO_FAR) so that a resumed run compares with the same best.
    """

    metric: str
    lower_is_better: bool = False
    patience: int | None = None
    step: int | None = None
    value: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    evals_since_best: int = 0

    def is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value < self.value if self.lower_is_better else value > self.value

    def update(self, step: int, scores: dict[str, float]) -> bool:
        """Count the evaluation at `step`; True when it is the new best."""
        value = float(scores.get(self.metric, math.nan))
        if self.is_better(value):
            self.step, self.value, self.scores, self.evals_since_best = step, value, dict(scores), 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def record(self) -> dict[str, Any]:
        """best.json: which step won, on what, and every score at that step."""
        direction = "lower" if self.lower_is_better else "higher"
        return {"step": self.step, "metric": self.metric, "value": self.value, "better": direction,
                "scores": self.scores}  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {**self.record(), "evals_since_best": self.evals_since_best}

    @classmethod
    def from_json(cls, data: dict[str, Any], patience: int | None) -> BestSoFar:
        return cls(
            metric=data["metric"], lower_is_better=data["better"] == "lower", patience=patience,
            step=data["step"], value=data["value"], scores=dict(data.get("scores") or {}),
            evals_since_best=int(data.get("evals_since_best", 0)),
        )  # fmt: skip

    def describe(self) -> str:
        return f"step {self.step}, {self.metric}={self.value:.4f}" if self.step is not None else "none yet"


class GenerationEvalCallback(TrainerCallback):
    """Every `eval.eval_steps` steps, score generations on the capped eval subset and log them
    (`eval/<key>`), with the held-out loss (`eval/loss`) when `run` computes it. With `best`, keep
    best/ at the best evaluation's weights and stop training after `best.patience` evaluations
    without improvement.

    Runs in `on_step_end`, before the Trainer's save of the same step: checkpoint-N holds the best so
    far including step N's evaluation, and an early stop's last step is saved too."""

    def __init__(self, run: RunEval, every: int, best: BestSoFar | None = None):
        self.run, self.every, self.best = run, every, best
        self.trainer: Trainer | None = None
        self.stopped_at: int | None = None  # the step early stopping ended training at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.trainer is None or state.global_step % self.every != 0:
            return
        step = state.global_step
        scores = self.run(self.trainer.model, label=f"step {step}")
        autocast = self.trainer.accelerator.autocast
        held_out = self.run.loss(self.trainer.model, label=f"step {step}", autocast=autocast)
        if held_out is not None:
            scores = {**scores, EVAL_LOSS_KEY: held_out}
        should_log = control.should_log  # Trainer.log clears it: this step's training loss would go unlogged
        self.trainer.log({f"eval/{k}": v for k, v in scores.items()})
        control.should_log = should_log
        if self.best is None:
            return
        best = self.best
        value = scores.get(best.metric, math.nan)
        if best.update(step, scores):
            logger.info("best so far: %s=%.4f at step %d; writing best/", best.metric, value, step)
            self.trainer.save_best(best)
        else:
            logger.info("%s=%.4f at step %d: no improvement on the best (%s), %d evaluation(s) in a row",
                        best.metric, value, step, best.describe(), best.evals_since_best)  # fmt: skip
        if best.should_stop:
            logger.warning(
                "early stopping at step %d: %d evaluations without improvement on %s (eval.early_stopping_patience); "
                "best: %s (best/); final/ holds the weights of step %d",
                step, best.evals_since_best, best.metric, best.describe(), step,
            )  # fmt: skip
            self.stopped_at = step
            control.should_training_stop = True
            control.should_save = True  # the checkpoint records the stop: a re-run does not train on


__all__ = ["BestSoFar", "GenerationEvalCallback", "NonFiniteLossError", "PaliGemmaTrainer", "RunEval"]
