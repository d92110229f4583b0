"""The run directory (`training.output_dir`): whose checkpoints these are, whether they are intact,
and the run's totals across resumes.

    resume = choose_checkpoint(recipe, is_main)       # RunDirError: another run's, or damaged
    last = last_complete_checkpoint(output_dir)       # never a tmp-* staging dir

- Checkpoints are complete or absent: `PaliGemmaTrainer` writes them under `tmp-checkpoint-N/` and
  renames them (`STAGING_PREFIX`); `remove_partial_checkpoints` clears what a crash left.
- A run resumes or replaces only its own outputs: every checkpoint and final/ carries the recipe
  that wrote it, compared on `MAY_DIFFER_ON_RESUME`; a damaged file is named with the previous
  intact checkpoint.
- `RUN_TOTALS` in every checkpoint and `RUN_STATE` in the directory keep the whole run's loss, time
  and segments, so metrics.json describes the run, not its last segment.
- With eval.metric_for_best, `best/` (beside final/, same contents plus `BEST_JSON`) holds the weights
  of the best evaluation, and every checkpoint carries `BEST_SO_FAR`, so a resumed run compares
  with the best of the steps before it (`read_best_so_far`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pg_finetune.recipe import RECIPE_FILENAME, Recipe, recipe_to_dict, redact_recipe

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-"
_COMPLETE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
RUN_TOTALS = "run_totals.json"  # in every checkpoint: the run's totals up to its step
RUN_STATE = "run_state.json"  # in output_dir: the segments (processes) of the run, their wall time
BEST_DIR = "best"  # in output_dir, beside final/: the weights of the best evaluation (eval.metric_for_best)
BEST_JSON = "best.json"  # in best/: its step, the metric, its value, every score at that step
BEST_SO_FAR = "best_so_far.json"  # in every checkpoint: BEST_JSON's fields up to that step + evals since


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
    "data.eval", "data.eval_split", "data.eval_config", "data.skip_bad_records", "data.check_images",
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
    """What a run leaves that another run must not mix with: its complete checkpoints, final/ and best/."""
    outputs = [folder for _, folder in _complete_checkpoints(output_dir)]
    outputs += [output_dir / name for name in ("final", BEST_DIR) if (output_dir / name).is_dir()]
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


def read_best_so_far(checkpoint: str | os.PathLike | None) -> dict | None:
    """The best evaluation up to `checkpoint` (its BEST_SO_FAR), or None: none recorded (no
    eval.metric_for_best then, or an older checkpoint) or no checkpoint."""
    path = Path(checkpoint) / BEST_SO_FAR if checkpoint is not None else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


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
