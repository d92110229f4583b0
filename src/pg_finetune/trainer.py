"""A thin `transformers.Trainer` subclass: atomic checkpoints and a NaN check on every step.

    trainer = PaliGemmaTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                               recipe=recipe)
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(output_dir))

Everything PaliGemma-specific lives in the collator; this class only changes two things
the stock Trainer (transformers 5.23) does not guarantee:

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
   logits only at suffix positions, and a frozen vision tower's image features cached.
5. **A run's totals survive a resume.** Every checkpoint carries `run_totals.json` (sum of the
   per-step losses and training seconds up to that step, over every segment that led to it), so
   `trainer.run_totals` after `train()` describes the whole run, not the last segment; and
   `train()` refuses a checkpoint already at max_steps (the stock loop would run one step past it).

Also here, for the training entry (`pg_finetune.train`), the run directory's rules:
`choose_checkpoint` (a run resumes or replaces only its own checkpoints: each carries its
recipe.yaml, compared on `MAY_DIFFER_ON_RESUME`; a damaged file is named with the previous intact
checkpoint), `RunState` (`output_dir/run_state.json`: wall time summed over segments), and for the
training data `SubstituteBadRecords` / `check_image_headers` (data.skip_bad_records at any batch
size, data.check_images).

Also here, for the training entry: `RunEval` (the task metric on generated outputs, before and after
training) and `GenerationEvalCallback` (the same every `eval.eval_steps` steps).
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
import shutil
import struct
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.core_model_loading import revert_weight_conversion
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from pg_finetune.generate import GenerationSettings, evaluate_task, scoreable
from pg_finetune.images import MAX_PIXELS, BadRecordError, describe_image_source
from pg_finetune.recipe import RECIPE_FILENAME, Recipe, recipe_to_dict, redact_recipe, save_recipe
from pg_finetune.speed import ImageFeatureCache, suffix_loss

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-"
_COMPLETE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
RUN_TOTALS = "run_totals.json"  # in every checkpoint: the run's totals up to its step
RUN_STATE = "run_state.json"  # in output_dir: the segments (processes) of the run, their wall time


class NonFiniteLossError(RuntimeError):
    """The loss (or a trainable weight) became NaN/inf; `step` is the optimizer step that failed (1-based)."""

    def __init__(self, step: int, what: str):
        self.step = step
        self.what = what
        super().__init__(f"{what} became NaN/inf at step {step}")


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-N` with the highest N in `output_dir`, or None; `tmp-*` staging dirs never count.

    A `checkpoint-N` without `trainer_state.json` (one written in place by an older version, cut
    short) is skipped with a warning, so resume falls back to the previous complete one.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = _COMPLETE.match(child.name)
        if match and child.is_dir():
            if (child / "trainer_state.json").is_file():
                found.append((int(match[1]), child))
            else:
                logger.warning("ignoring %s: no trainer_state.json (an interrupted save?)", child)
    return str(max(found)[1]) if found else None


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> None:
    """Delete `tmp-checkpoint-*` staging dirs (left by a save that was interrupted); call on one process."""
    for stale in Path(output_dir).glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):
        logger.warning("removing %s, left by an interrupted save", stale)
        shutil.rmtree(stale, ignore_errors=True)


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
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self._staging_run_dir: str | None = None
        self.label_positions_loss = label_positions_loss
        # The cache calls the vision tower outside the wrapped model's forward: under FSDP or ZeRO-3 the
        # parameters are only gathered inside it, so there the features are computed the normal way.
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        # The features are computed under the autocast accelerate wraps the model's forward in (bf16/fp16).
        use_cache = cache_image_features and not sharded
        self.image_features = ImageFeatureCache(autocast=self.accelerator.autocast) if use_cache else None

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
        # `suffix_loss` equals the model's own loss (tests/test_speed.py); anything it does not
        # cover (outputs wanted, label smoothing, a custom loss) goes through the stock path.
        if (
            not self.label_positions_loss
            or return_outputs
            or "labels" not in inputs
            or self.label_smoother is not None
            or self.compute_loss_func is not None
        ):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        n_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = suffix_loss(model, inputs, n_items, image_features=self.image_features)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and n_items is not None:
            # as Trainer.compute_loss: the loss is a sum over this rank's tokens / all ranks' tokens
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

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


def _safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors weight files (one file, or the shards its index names)."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    single = folder / SAFE_WEIGHTS_NAME
    return [single] if single.is_file() else []


# ----------------------------------------------------------------------------------------------------
# The run directory: whose checkpoints these are, whether they are intact, the run's totals
# ----------------------------------------------------------------------------------------------------
# Recipe keys that may differ between a checkpoint's recipe.yaml and the run resuming it: what is
# reported or evaluated, where files go, how often they are written, how fast a step runs (same
# loss and gradients), and how far the run goes (max_steps / num_train_epochs: continue a run
# further). Every other key (model, task, data, tuning, optimiser, schedule, seed, batch, precision)
# changes what the steps compute: resuming across such a change is refused, naming the keys. A key
# ending in "." covers its whole section. New schema fields count as mattering until listed here.
MAY_DIFFER_ON_RESUME = (
    "name", "description", "eval.", "logging.",
    "model.local_files_only", "model.cache_dir",
    "data.eval", "data.eval_split", "data.skip_bad_records", "data.check_images",
    "training.output_dir", "training.resume_from_checkpoint", "training.overwrite_output_dir",
    "training.max_steps", "training.num_train_epochs",
    "training.save_steps", "training.save_total_limit", "training.logging_steps",
    "training.merge_lora", "training.dataloader_num_workers", "training.gradient_checkpointing",
    "training.label_positions_loss", "training.cache_image_features", "training.use_cpu",
)
# Which steps exist: a run starting from scratch next to another run's checkpoints that differ in
# these would share (and rotate away) checkpoint names with it, and final/ is one run's end result.
_RUN_LENGTH = ("training.max_steps", "training.num_train_epochs")
MAY_DIFFER_FROM_SCRATCH = tuple(k for k in MAY_DIFFER_ON_RESUME if k not in (*_RUN_LENGTH, "training.save_steps"))
_MAY_DIFFER_IN_FINAL = tuple(k for k in MAY_DIFFER_ON_RESUME if k not in _RUN_LENGTH)


class RunDirError(ValueError):
    """The output_dir cannot be used as asked (another run's checkpoints, a damaged checkpoint); exit 2."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The global step a complete checkpoint was saved at (its trainer_state.json)."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def _flat(data: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            out[key] = value
    return out


def _may_differ(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)


def _saved_recipe(folder: Path) -> dict | None:
    try:
        data = yaml.safe_load((folder / RECIPE_FILENAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def recipe_differences(folder: Path, recipe: Recipe, allowed: tuple[str, ...]) -> list[str]:
    """Keys of `recipe` that differ from `folder/recipe.yaml`, outside `allowed`: ["tuning.method (lora there, full here)"]."""
    saved = _saved_recipe(folder)
    if saved is None:
        return [f"{RECIPE_FILENAME} (missing or unreadable: cannot tell which recipe wrote it)"]
    ours, theirs = _flat(recipe_to_dict(redact_recipe(recipe))), _flat(saved)
    defaults = _flat(recipe_to_dict(Recipe()))  # a field added since that recipe.yaml was written
    differ = []
    for key, here in ours.items():
        there = theirs.get(key, defaults.get(key))
        if not _may_differ(key, allowed) and there != here:
            differ.append(f"{key} ({there!r} there, {here!r} here)")
    return differ


def _complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint-N with a trainer_state.json, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _COMPLETE.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match[1]), child))
    return sorted(found)


def _run_outputs(output_dir: Path) -> list[Path]:
    """What a run leaves that another run must not mix with: its complete checkpoints and final/."""
    outputs = [folder for _, folder in _complete_checkpoints(output_dir)]
    if (output_dir / "final").is_dir():
        outputs.append(output_dir / "final")
    return outputs


def _file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be what it claims (cheap: no tensor is loaded), or None."""
    try:
        size = path.stat().st_size
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with open(path, "rb") as f:
                header_len = struct.unpack("<Q", f.read(8))[0]
                if header_len > size:
                    return f"truncated ({size} bytes, not even its {header_len}-byte header)"
                header = json.loads(f.read(header_len))
            data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if size != 8 + header_len + data_end:
                return f"truncated or padded ({size} bytes; its header says {8 + header_len + data_end})"
        elif path.suffix in (".pt", ".pth", ".bin"):
            with open(path, "rb") as f:
                zipped = f.read(2) == b"PK"  # torch.save's zip format; an old-style pickle is not checked
            if zipped or size == 0:
                with zipfile.ZipFile(path) as archive:  # the index sits at the end: a cut file has none
                    archive.namelist()
    except (OSError, ValueError, KeyError, TypeError, struct.error, yaml.YAMLError, zipfile.BadZipFile) as err:
        return f"cannot be read ({type(err).__name__}: {str(err)[:120] or 'empty'}); truncated?"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """'FILE: why' for the first damaged file of a checkpoint (weights, optimizer, scheduler, RNG, state), or None."""
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            problem = _file_problem(path)
            if problem:
                return f"{path.name} {problem}"
    return None


def _check_intact(checkpoint: Path) -> None:
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        return
    step = int(_COMPLETE.match(checkpoint.name)[1]) if _COMPLETE.match(checkpoint.name) else None
    earlier = [
        folder for n, folder in reversed(_complete_checkpoints(checkpoint.parent))
        if step is not None and n < step and checkpoint_problem(folder) is None
    ]
    fix = (
        f"resume from the previous complete checkpoint: training.resume_from_checkpoint={earlier[0]} "
        f"(or delete {checkpoint} and resume with 'auto')"
        if earlier
        else f"there is no earlier intact checkpoint: delete {checkpoint} and start over "
        "(training.resume_from_checkpoint: null)"
    )
    raise RunDirError(f"checkpoint {checkpoint} is damaged: {problem}; {fix}")


def choose_checkpoint(recipe: Recipe, is_main: bool) -> str | None:
    """The checkpoint this run resumes from (None: from scratch), once output_dir is known to hold only its own.

    A resume (a path, or 'auto' finding a checkpoint) needs the checkpoint's recipe.yaml to agree with
    `recipe` outside `MAY_DIFFER_ON_RESUME`; a run from scratch needs every checkpoint and final/ in
    output_dir to agree outside `MAY_DIFFER_FROM_SCRATCH` (the same run length: otherwise the two runs'
    checkpoint-N would mix). Anything else raises RunDirError naming the keys, unless
    training.overwrite_output_dir, which deletes the other run's outputs (all of them when starting
    from scratch). The chosen checkpoint's files are checked for damage (truncation) too.
    """
    t = recipe.training
    output_dir = Path(t.output_dir)
    explicit = t.resume_from_checkpoint not in (None, "auto")
    resume: Path | None = None
    if explicit:
        resume = Path(t.resume_from_checkpoint)
        if not (resume / "trainer_state.json").is_file():
            raise RunDirError(
                f"training.resume_from_checkpoint: {resume} is not a complete checkpoint (no trainer_state.json); "
                "give a checkpoint-N directory, 'auto', or null"
            )
    elif t.resume_from_checkpoint == "auto" and (found := last_complete_checkpoint(output_dir)):
        resume = Path(found)
    if resume is not None:
        _check_intact(resume)
        differ = recipe_differences(resume, recipe, MAY_DIFFER_ON_RESUME)
        if differ and (explicit or not t.overwrite_output_dir):
            redo = "" if explicit else (
                ", or training.overwrite_output_dir: true to delete that run's outputs and start over"
            )
            raise RunDirError(
                f"cannot resume from {resume}: it was written by a recipe that differs in {'; '.join(differ)}. "
                f"A resume may change only {', '.join(MAY_DIFFER_ON_RESUME)}. Resume with that checkpoint's "
                f"own recipe ({resume / RECIPE_FILENAME}), use another training.output_dir{redo}"
            )
        if differ:
            logger.warning("%s was written by another recipe (%s): starting over", resume, "; ".join(differ))
            resume = None
    allowed = MAY_DIFFER_ON_RESUME if resume is not None else MAY_DIFFER_FROM_SCRATCH
    others = {
        folder: differ
        for folder in _run_outputs(output_dir)
        if folder != resume and (differ := recipe_differences(folder, recipe, allowed))
    }
    if others and not t.overwrite_output_dir:
        names = ", ".join(folder.name for folder in others)
        first, differ = next(iter(others.items()))
        raise RunDirError(
            f"training.output_dir {output_dir} holds another run's outputs ({names}): {first.name}'s recipe "
            f"differs in {'; '.join(differ)}. Two runs in one directory mix (resume picks the other's "
            "checkpoints, save_total_limit rotates this one's away, final/ is overwritten). Use another "
            "training.output_dir, or set training.overwrite_output_dir: true to delete them"
            + ("" if resume is not None or t.resume_from_checkpoint == "auto" else
               " (or resume_from_checkpoint: auto if this run continues that one)")
        )
    if t.overwrite_output_dir and is_main:
        doomed = list(others) if resume is not None else _run_outputs(output_dir) + [output_dir / "merged"]
        for folder in doomed:
            if folder.exists():
                logger.warning("training.overwrite_output_dir: deleting %s", folder)
                shutil.rmtree(folder)
        if resume is None:
            (output_dir / RUN_STATE).unlink(missing_ok=True)
    return str(resume) if resume is not None else None


def final_is_current(output_dir: Path, recipe: Recipe) -> bool:
    """Whether output_dir/final holds the end result of this recipe (same run length included)."""
    final = output_dir / "final"
    return final.is_dir() and not recipe_differences(final, recipe, _MAY_DIFFER_IN_FINAL)


@dataclass
class RunTotals:
    """A run's totals up to `steps`, over every segment that led there (stored as run_totals.json)."""

    steps: int = 0
    loss_sum: float = 0.0  # the sum of per-step training losses (Trainer's train_loss x steps)
    train_runtime_s: float | None = 0.0  # None: a checkpoint from before run_totals.json

    def extended(self, to_step: int, segment_loss_sum: float, segment_seconds: float) -> RunTotals:
        """These totals plus a segment that trained from `self.steps` to `to_step`."""
        earlier = self.train_runtime_s
        runtime = None if earlier is None else earlier + segment_seconds
        return RunTotals(to_step, self.loss_sum + segment_loss_sum, runtime)

    @property
    def train_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)


def read_run_totals(checkpoint: str | os.PathLike | None) -> RunTotals:
    """The totals saved with `checkpoint` (zeros for None). Without run_totals.json (an older checkpoint) the
    loss comes from its log history, averaged over the logged steps, and the training time is unknown."""
    if checkpoint is None:
        return RunTotals()
    folder = Path(checkpoint)
    if (folder / RUN_TOTALS).is_file():
        return RunTotals(**json.loads((folder / RUN_TOTALS).read_text()))
    state = json.loads((folder / "trainer_state.json").read_text())
    logged = [(e["step"], e["loss"]) for e in state.get("log_history", []) if "loss" in e]
    weighted, previous = 0.0, 0
    for step, loss in logged:
        weighted, previous = weighted + loss * (step - previous), step
    steps = int(state["global_step"])
    mean = weighted / previous if previous else 0.0
    return RunTotals(steps, mean * steps, None)


class RunState:
    """`output_dir/run_state.json`: one entry per segment (process) of a run, and its scores before training.

    A run killed and resumed is several segments; the wall time of the run is their sum. A segment's
    entry is rewritten at every log and save, so a killed one counts up to its last log. A run from
    scratch starts a new file.
    """

    def __init__(self, output_dir: Path, started: float, *, first_step: int, fresh: bool, is_main: bool):
        self.path, self.started, self.is_main = output_dir / RUN_STATE, started, is_main
        self.data: dict[str, Any] = {}
        if not fresh and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                logger.warning("%s is unreadable; the wall time of earlier segments is lost", self.path)
        when = datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.segment = {"started": when, "first_step": first_step, "last_step": first_step, "wall_time_s": 0.0}
        self.data.setdefault("segments", []).append(self.segment)

    def update(self, step: int | None = None, **fields: Any) -> None:
        self.segment["wall_time_s"] = round(time.time() - self.started, 1)
        if step is not None:
            self.segment["last_step"] = step
        self.data.update(fields)
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self.data)

    @property
    def wall_time_s(self) -> float:
        return round(sum(segment["wall_time_s"] for segment in self.data["segments"]), 1)


class RunStateCallback(TrainerCallback):
    """Keeps run_state.json current while training (every log and save)."""

    def __init__(self, run_state: RunState):
        self.run_state = run_state

    def on_log(self, args, state, control, **kwargs):
        self.run_state.update(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.run_state.update(state.global_step)


# ----------------------------------------------------------------------------------------------------
# Training data: bad records at any batch size, and a header check of every image before training
# ----------------------------------------------------------------------------------------------------
class SubstituteBadRecords(Dataset):
    """With data.skip_bad_records: record i, or when its image does not decode, the next good one.

    `RecordDataset.__getitem__` returns None for a bad record. Dropping it in the collator shrinks
    that batch (and at batch size 1 leaves nothing to train on); here the Trainer always gets a full
    batch, so the step count and the number of records per step stay what the recipe says. The
    price: the substitute is seen twice that epoch. The choice depends only on the index, so the
    order is the same after a resume. `known_bad` (from `check_image_headers`) are never decoded.
    Records found bad while training are counted in the wrapped dataset's `skipped`, per process.
    """

    def __init__(self, dataset: Any, known_bad: set[int] | frozenset[int] = frozenset()):
        self.dataset = dataset
        self.bad = set(known_bad)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        for i in ((index + k) % n for k in range(n)):
            if i in self.bad:
                continue
            record = self.dataset[i]
            if record is not None:
                return record
            self.bad.add(i)
        raise BadRecordError("", "image", f"no training record has an image that decodes (all {n} skipped)")

    def rows_meta(self, index: int) -> dict:
        return self.dataset.rows_meta(index)

    @property
    def skipped(self):
        return self.dataset.skipped

    def __repr__(self) -> str:
        return f"SubstituteBadRecords({self.dataset!r})"


def _image_header_problem(source: Any) -> str | None:
    """Why the image behind `source` (path, bytes, datasets dict) cannot be read, from its header and
    (PNG) chunk checksums, without decoding pixels; None when it looks fine or is already decoded."""
    if isinstance(source, dict):
        source = source.get("bytes") if source.get("bytes") is not None else source.get("path")
    what = describe_image_source(source)
    if isinstance(source, bytes | bytearray | memoryview):
        fp: Any = io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike):
        if not os.path.isfile(source):
            return f"image file not found: {os.fspath(source)}"
        fp = source
    else:
        return None if source is not None else "image is empty (neither bytes nor path)"
    try:
        with Image.open(fp) as img:
            if img.width * img.height > MAX_PIXELS:
                return f"{what} is {img.width} x {img.height} pixels, more than the {MAX_PIXELS} we decode"
            img.verify()
    except Image.DecompressionBombError:
        return f"{what} is larger than the {MAX_PIXELS} pixels we decode"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for a bad header
        return f"{what} cannot be decoded ({str(err).split(' <_io.')[0] or type(err).__name__})"
    return None


def check_image_headers(dataset: Any, *, progress: bool = True) -> list[tuple[int, BadRecordError]]:
    """(index, BadRecordError) of each record whose image is unreadable (data.check_images), with a progress bar.

    Reads the dataset's image references (`RecordDataset._image_refs`, fetched with its `_fetch_image`:
    the data package has no public accessor yet); a dataset without them is checked by decoding.
    """
    from tqdm.auto import tqdm

    refs: list[Any] | None = getattr(dataset, "_image_refs", None)
    fetch: Callable[[Any], Any] | None = getattr(dataset, "_fetch_image", None)
    bad = []
    for i in tqdm(range(len(dataset)), desc="checking training images", unit="image", disable=not progress):
        where = dataset.rows_meta(i).get("where", f"record {i}")
        if refs is None:
            try:
                problem = None if dataset[i] is not None else "image cannot be decoded"
            except BadRecordError as err:
                problem = err.problem
        else:
            problem = _image_header_problem(fetch(refs[i]) if fetch else refs[i])
        if problem:
            bad.append((i, BadRecordError(where, "image", problem, reason="image cannot be decoded")))
    return bad


# ----------------------------------------------------------------------------------------------------
# Generation metrics: the task metric before and after training, and every eval.eval_steps
# ----------------------------------------------------------------------------------------------------
class RunEval:
    """Generation metric of the task on a fixed eval subset (the same records before and after)."""

    def __init__(self, recipe: Recipe, processor, task, records: list[dict], out_dir: Path, is_main: bool):
        self.recipe, self.processor, self.task, self.records = recipe, processor, task, records
        self.metric = task.get_metric(recipe.task.metric)  # the task's own unless the recipe names another
        if records:
            scoreable(self.metric, records)  # ValueError now, not mid-training, when none can be scored
        self.out_dir, self.is_main = out_dir, is_main
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


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in scores.items())


class GenerationEvalCallback(TrainerCallback):
    """Every `eval.eval_steps` steps, score generations on the capped eval subset and log them."""

    def __init__(self, run: RunEval, every: int):
        self.run, self.every = run, every
        self.trainer: Trainer | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.trainer is not None and state.global_step % self.every == 0:
            scores = self.run(self.trainer.model, label=f"step {state.global_step}")
            self.trainer.log({f"eval/{k}": v for k, v in scores.items()})


__all__ = [
    "GenerationEvalCallback",
    "NonFiniteLossError",
    "PaliGemmaTrainer",
    "RunDirError",
    "RunEval",
    "RunState",
    "RunStateCallback",
    "RunTotals",
    "SubstituteBadRecords",
    "check_image_headers",
    "checkpoint_step",
    "choose_checkpoint",
    "final_is_current",
    "last_complete_checkpoint",
    "remove_partial_checkpoints",
]
