"""Typed recipe schema: YAML in, validated dataclasses out, resolved YAML back.

    from pg_finetune.recipe import load_recipe
    recipe = load_recipe("recipes/tiny/easyvqa_lora.yaml", ["training.learning_rate=1e-4"])

A recipe is a YAML mapping with `name`, `description` and one mapping per section
(`model`, `task`, `data`, `tuning`, `training`, `eval`, `logging`); a missing
section means all its defaults. Every field below carries its help text in
`field(metadata={"help": ...})`. Unknown keys are errors, never ignored. All type,
range and combination problems are collected and raised together as one
`RecipeError`, each line naming the dotted key and the fix.

Importing and validating a recipe never imports torch: `python -m pg_finetune.train` refuses a
bad recipe in well under a second (tests/test_train.py checks it).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import importlib.util
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pg_finetune.tuning import METHODS, TuningMethod, method_of

DEFAULT_LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
RECIPE_FILENAME = "recipe.yaml"
# Keys earlier versions had: a recipe that still sets one is told what replaced it.
REMOVED_KEYS = {
    "tuning.load_in_4bit": "method qlora implies 4-bit loading, the other methods never quantize; delete it",
    "training.per_device_eval_batch_size": "eval.batch_size batches the held-out loss and generation; set that instead",
    "data.max_eval_samples": "eval.max_samples caps the eval records; set that instead",
}
TuningMethodName = Literal[tuple(METHODS)]  # the schema accepts exactly the registry's names
MAX_SEED = 2**32 - 1  # numpy.random.seed refuses anything outside 0..2**32 - 1


def _field(default: Any, help_text: str) -> Any:
    """A dataclass field with its help text in `metadata["help"]`."""
    return field(default=default, metadata={"help": help_text})


def _section(factory: type, help_text: str) -> Any:
    return field(default_factory=factory, metadata={"help": help_text})


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    name_or_path: str = _field(
        "tiny",
        "Hub id (google/paligemma2-3b-pt-224), a local save_pretrained dir, or 'tiny' / "
        "'tiny-paligemma2' for the built-in random tiny model that runs offline ('tiny-spatial': 'tiny' with "
        "8x stronger vision position embeddings, for the tiny segment recipe).",
    )
    revision: str | None = _field(None, "Hub revision (branch, tag or commit); null = default branch.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "float32", "dtype the weights are loaded in; 'auto' keeps the checkpoint's."
    )
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = _field(
        "sdpa",
        "Attention kernel. sdpa falls back to eager for PaliGemma 2 (sdpa cannot soft-cap); flex_attention "
        "keeps PaliGemma 2's soft-capping and the prefix-LM mask without eager's S x S memory (GPU training; "
        "on CPU it runs inference only, torch has no CPU backward; needs model.dropout 0). "
        "flash_attention_2 is refused: transformers then drops PaliGemma's prefix-LM mask.",
    )
    final_logit_softcapping: float | None = _field(
        None,
        "Gemma 2 logit soft-capping. null keeps the checkpoint's value, 0 turns it off "
        "(big_vision transfers PaliGemma 2 with it off).",
    )
    dropout: float = _field(
        0.0,
        "big_vision's llm dropout, in [0, 1): while training, drops each element of every decoder "
        "layer's attention output and MLP output with this probability before they are added to the "
        "residual stream (big_vision models/ppp/gemma.py; 0.1 in its chartqa and scicap transfers). Not "
        "transformers' attention_dropout (attention probabilities), which stays as the checkpoint has it. "
        "Off in eval and generation.",
    )
    local_files_only: bool = _field(False, "Never touch the network when loading the model.")
    cache_dir: str | None = _field(None, "Hugging Face cache dir; null = the default cache.")


@dataclass
class TaskConfig:
    """What the model is trained to do (prompt format, output parser, metric)."""

    name: str = _field("vqa", "A key of pg_finetune.tasks.TASKS, e.g. 'vqa' or 'caption'.")
    prefix: str | None = _field(
        None,
        "Prompt used when a record has none; null = the task's default. May name record fields: "
        "\"answer en {question}\".",
    )
    shuffle_objects: bool | None = _field(
        None,
        "Detection: rebuild each training suffix with the objects in a new seeded order every epoch "
        "(as big_vision does); null = on for task detect, off otherwise. True needs task detect.",
    )
    negatives: int = _field(
        0,
        "Detection: add up to this many classes absent from the image (from the union of training labels) "
        "to each training prefix, with nothing for them in the suffix; 0 = none. > 0 needs task detect.",
    )
    metric: str | None = _field(
        None,
        "Which of the task's metrics the held-out evaluation reports; null = the task's own. E.g. "
        "vqa: exact_match or vqav2_accuracy (the official VQAv2 accuracy, as --benchmark vqav2); "
        "detect: detection or refexp.",
    )


@dataclass
class DataConfig:
    """Where records come from and how they become token sequences."""

    train: str = _field(
        "builtin:easyvqa",
        "JSONL path, local save_to_disk dir, image folder, hub dataset id, Karpathy caption JSON "
        "(dataset_coco.json; karpathy+all:PATH for one record per caption), or 'builtin:easyvqa'.",
    )
    train_split: str = _field(
        "train", "Split to train on; may carry a slice like 'train[:1%]' or 'train[:2000]'."
    )
    eval: str | None = _field(None, "Eval source (same forms as train); null = same source as train.")
    eval_split: str | None = _field("test", "Split to evaluate on, slices allowed; null = no eval.")
    train_config: str | None = _field(
        None,
        "Dataset configuration name for a hub id or a directory of data files (datasets.load_dataset(id, "
        "NAME), e.g. 'full'); refused for other sources. null = the dataset's default configuration.",
    )
    eval_config: str | None = _field(
        None,
        "Configuration of the eval source; null = train_config when eval reads the train source (data.eval "
        "null or equal to data.train), else the default configuration.",
    )
    image_column: str = _field("image", "Column holding the image (PIL image or path).")
    image_root: str | None = _field(
        None,
        "Karpathy caption JSON only: the directory its filepath/filename image paths start from; "
        "null = the JSON's directory. (JSONL image paths are relative to the file.)",
    )
    prefix_column: str = _field("prefix", "Column holding the prompt; missing -> task.prefix.")
    suffix_column: str = _field(
        "suffix",
        "Column holding the target text the loss is on. Numbers become text: 3 -> '3', 3.0 -> '3', "
        "0.5 -> '0.5'; booleans, infinities and lists are refused (NaN counts as missing).",
    )
    lowercase_suffix: bool = _field(
        False,
        "Lower-case every target, and the reference texts eval scores against (captions, answers, texts), "
        "as big_vision's PaliGemma colab does for its long captions. Not for detect (class names).",
    )
    max_train_samples: int | None = _field(None, "Keep at most this many training records; null = all.")
    max_length: int = _field(
        512, "Max TEXT tokens per example: bos + prefix + '\\n' + suffix + eos (image tokens not counted)."
    )
    padding_side: Literal["right", "left"] = _field("right", "Pad side for training batches.")
    truncation: Literal["prefix_first", "error"] = _field(
        "prefix_first", "Too long: cut the prefix first then the suffix, or raise."
    )
    skip_bad_records: bool = _field(
        False,
        "Skip (and count) records that fail to load instead of raising. A training record whose image "
        "fails to decode is replaced by the next good record, so every batch keeps its size.",
    )
    check_images: bool = _field(
        False,
        "Before training, open every training image's header (no pixel decode; PNG chunks are "
        "checksummed), with a progress bar: unreadable images are all listed at once (exit 2), or "
        "with skip_bad_records skipped from the first step and counted.",
    )
    augment: str | None = _field(
        None,
        "Training-image augmentation as big_vision's ops joined by '|' (eval images never change): "
        "'inception_crop(area_min=50)', 'resize_small(256)|random_crop(224)', 'zoomout(max_f=1.5)' (boxes "
        "in the suffix move with the image; crops are refused for detect/segment). Seeded per seed, "
        "epoch and record, so a resume sees the same images. null = none. See pg_finetune.image_augment.",
    )


@dataclass
class TuningConfig:
    """Which parameters train: full, attention_only, lora, or qlora (+ freeze flags)."""

    method: TuningMethodName = _field(
        "lora", "; ".join(f"{m.name}: {m.trains}" for m in METHODS.values()) + "."
    )
    train_vision_tower: bool = _field(False, "Also train the SigLIP vision tower fully (every method; for lora/qlora via modules_to_save).")
    train_projector: bool = _field(False, "Also train the multi-modal projector fully (every method; for lora/qlora via modules_to_save).")
    lora_r: int = _field(8, "LoRA rank.")
    lora_alpha: int = _field(16, "LoRA scaling numerator (scale = alpha / r); usually 2 x rank.")
    lora_dropout: float = _field(
        0.0,
        "Dropout on the LoRA input, in [0, 1). 0 as peft's default: peft draws a mask for every adapted "
        "layer's input (a slower step) and 0.05 did not help the tiny recipes (bench/RESULTS.md); "
        "try 0.05-0.1 when a small dataset overfits.",
    )
    lora_target_modules: str = _field(
        DEFAULT_LORA_TARGET_MODULES,
        "Regex of module names that get adapters (peft full-match). The default keeps them in the "
        "decoder: a plain ['q_proj', ...] list would also hit SigLIP's projections.",
    )
    lora_vision: bool = _field(False, "Also put LoRA adapters on the vision tower.")
    lora_projector: bool = _field(False, "Also put LoRA adapters on the multi-modal projector.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _field("nf4", "4-bit data type (qlora).")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = _field(
        "bfloat16", "dtype the 4-bit weights are dequantised to for matmuls (float32 on CPU)."
    )
    bnb_4bit_use_double_quant: bool = _field(
        True, "Quantise the quantisation constants too (saves ~0.4 bit/param)."
    )

    @property
    def method_spec(self) -> TuningMethod:
        """The `pg_finetune.tuning.METHODS` record of `method`: what trains, adapter or not, 4 bit or not."""
        return method_of(self)


@dataclass
class TrainingConfig:
    """Optimiser, schedule and Trainer settings (names follow transformers.TrainingArguments)."""

    output_dir: str = _field("runs/{name}", "Where checkpoints go; '{name}' is replaced by the recipe name.")
    num_train_epochs: float = _field(1.0, "Epochs to train (ignored when max_steps is set).")
    max_steps: int = _field(-1, "Optimiser steps to train; -1 = use num_train_epochs.")
    per_device_train_batch_size: int = _field(8, "Training batch per device.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimiser step.")
    learning_rate: float = _field(2e-4, "Peak learning rate, in (0, 1].")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _field(
        "cosine", "Learning-rate schedule after warmup."
    )
    warmup_ratio: float = _field(0.0, "Fraction of steps spent warming up, in [0, 1).")
    weight_decay: float = _field(0.0, "Decoupled weight decay, >= 0.")
    optim: Literal[
        "adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adamw_bnb_8bit", "paged_adamw_8bit"
    ] = _field(
        "adamw_torch_fused",
        "Optimiser (TrainingArguments.optim). adamw_torch_fused is the Trainer's own default (one fused kernel per "
        "step, CPU and CUDA; ~4x faster than adamw_torch's per-parameter loop on CPU); the *_8bit ones need bitsandbytes.",
    )
    adam_beta2: float = _field(0.999, "Adam beta2.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm; 0 = no clipping.")
    label_smoothing: float = _field(
        0.0,
        "big_vision's label smoothing eps on the suffix tokens' cross-entropy, in [0, 1): the target "
        "puts 1 - eps on the label and eps / (V - 1) on each other token (not torch's eps / V mix). "
        "big_vision's transfers use 0.0-0.4. Needs label_positions_loss: true.",
    )
    loss_normalization: Literal["token", "example"] = _field(
        "token",
        "'token': mean over every suffix token of the (accumulated, all-process) batch, as transformers "
        "does. 'example': mean over each example's suffix tokens, then over all examples of the "
        "accumulated, all-process batch, as big_vision's PaliGemma trainer does (short targets weigh as "
        "much as long ones). Needs label_positions_loss: true.",
    )
    seed: int = _field(42, "Seed for model init, data order and dropout.")
    logging_steps: int = _field(10, "Log the training loss every N steps.")
    save_steps: int = _field(500, "Save a checkpoint every N steps.")
    save_total_limit: int | None = _field(2, "Keep at most N checkpoints; null = keep all.")
    gradient_checkpointing: bool = _field(False, "Recompute activations in backward to save memory.")
    group_by_length: bool = _field(
        False,
        "Batch records of similar text length together (less padding; still shuffled, from seed + epoch). "
        "Worth it when prompt or target lengths vary a lot (long captions, detection).",
    )
    label_positions_loss: bool = _field(
        True,
        "Apply the lm_head and cross-entropy only where labels are (the suffix): the same loss and "
        "gradients, less compute and memory (the vocabulary is 257k). false = transformers' own loss.",
    )
    cache_image_features: bool = _field(
        True,
        "While the vision tower and projector are frozen (lora, attention_only), compute each distinct "
        "image's features once and reuse them (keyed by pixel content; bounded, 1 GiB). Ignored when "
        "label_positions_loss is false, and under FSDP / DeepSpeed (sharded parameters).",
    )
    bf16: bool = _field(False, "bfloat16 autocast (Ampere or newer GPUs).")
    fp16: bool = _field(False, "float16 autocast with loss scaling (e.g. T4).")
    dataloader_num_workers: int = _field(0, "DataLoader worker processes; 0 = load in the main process.")
    resume_from_checkpoint: str | None = _field(
        None, "'auto' = latest checkpoint in output_dir, or a checkpoint path; null = start fresh."
    )
    overwrite_output_dir: bool = _field(
        False,
        "A run never mixes with another's: starting from scratch in an output_dir that holds "
        "checkpoints or final/ of a different recipe (or 'auto' finding one) is refused (exit 2). "
        "true = delete the checkpoints, final/ and merged/ found there first (a resume of this "
        "recipe's own checkpoint is unaffected).",
    )
    merge_lora: bool = _field(
        False, "After training, merge LoRA weights into the base and save the merged model."
    )
    use_cpu: bool = _field(False, "Train on CPU even when a GPU is present.")


@dataclass
class EvalConfig:
    """Generation-based evaluation (task metric on decoded outputs)."""

    before_and_after: bool = _field(True, "Score the model before and after training.")
    max_samples: int | None = _field(200, "Score at most this many eval records; null = all.")
    batch_size: int = _field(16, "Generation batch size.")
    max_new_tokens: int | None = _field(None, "Generation budget; null = the task's default.")
    num_beams: int = _field(1, "Beam count; 1 = greedy (big_vision decodes greedily).")
    do_sample: bool = _field(False, "Sample instead of greedy/beam decoding.")
    eval_steps: int | None = _field(
        None, "Compute generation metrics every N steps; null = only before/after."
    )
    metric_for_best: str | None = _field(
        None,
        "With eval_steps: keep the checkpoint that scores best on this metric (a key the task's metric "
        "reports, e.g. 'accuracy' or 'cider') as best/ beside final/; null = no best/.",
    )
    early_stopping_patience: int | None = _field(
        None,
        "With metric_for_best: stop after this many evaluations without improvement; null = never.",
    )
    loss: bool = _field(
        True,
        "Also compute the teacher-forced loss on the eval records' suffixes at every eval_steps and "
        "before/after: logged as eval/loss, drawn beside the training loss, usable as metric_for_best: loss. "
        "One forward pass per batch, no decoding (about a third of a generation eval on the default recipe).",
    )


@dataclass
class LoggingConfig:
    """Where metrics go."""

    report_to: Literal["none", "tensorboard", "wandb"] = _field("none", "Metric logger.")
    run_name: str | None = _field(None, "Run name shown by the logger; null = the recipe name.")
    wandb_project: str | None = _field(None, "Weights & Biases project (report_to: wandb).")
    wandb_mode: Literal["online", "offline", "disabled"] = _field(
        "offline", "wandb mode; offline needs no login."
    )
    log_level: Literal["debug", "info", "warning", "error"] = _field("info", "Python log level.")
    html_report: bool = _field(
        True, "At the end, write curves.png and report.html (before/after examples) into the output dir."
    )


@dataclass
class Recipe:
    """One fine-tuning run: model x task x data x tuning method x training settings."""

    name: str = _field("run", "Run name; fills '{name}' in training.output_dir.")
    description: str = _field("", "Free text saying what this recipe is for.")
    model: ModelConfig = _section(ModelConfig, "Base model to load.")
    task: TaskConfig = _section(TaskConfig, "Task (prompt format, parser, metric).")
    data: DataConfig = _section(DataConfig, "Training and eval data.")
    tuning: TuningConfig = _section(TuningConfig, "Which parameters train.")
    training: TrainingConfig = _section(TrainingConfig, "Optimiser and Trainer settings.")
    eval: EvalConfig = _section(EvalConfig, "Generation-based evaluation.")
    logging: LoggingConfig = _section(LoggingConfig, "Metric logging.")


# Read from the annotations so the section list cannot disagree with the schema.
SECTIONS: dict[str, type] = {
    name: tp for name, tp in typing.get_type_hints(Recipe).items() if dataclasses.is_dataclass(tp)
}
TOP_LEVEL_FIELDS = [f.name for f in dataclasses.fields(Recipe) if f.name not in SECTIONS]


class RecipeError(ValueError):
    """A recipe failed validation; `problems` holds one message per problem."""

    def __init__(self, problems: Sequence[str], source: str = "<dict>"):
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        header = f"recipe {source} has {count} problem{'s' if count != 1 else ''}:"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))

    def __reduce__(self):
        return (type(self), (self.problems, self.source))


# ---------------------------------------------------------------------------
# Generic type checking driven by the dataclass annotations
# ---------------------------------------------------------------------------


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for `X | None`, else (False, tp)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)):
            inner = args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
            return True, inner
    return False, tp


def _describe(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{_describe(inner)} or null"
    if typing.get_origin(inner) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(inner))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        inner, str(inner)
    )


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_value(value: Any, tp: Any) -> tuple[Any, str | None]:
    """Return (coerced value, None) or (None, 'expected ..., got ...')."""
    optional, inner = _is_optional(tp)
    if value is None:
        return (None, None) if optional else (None, f"expected {_describe(inner)}, got null")
    if typing.get_origin(inner) is Literal:
        allowed = typing.get_args(inner)
        if isinstance(value, str) and value in allowed:
            return value, None
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        return None, f"{_show(value)} is not one of {', '.join(repr(a) for a in allowed)}{hint}"
    if inner is bool:
        if isinstance(value, bool):
            return value, None
        return None, f"expected true or false, got {_show(value)}"
    if inner is int:
        # bool is a subclass of int in Python; `lora_r: true` is a mistake, not 1
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:  # torch and numpy take int64 at most
                return None, f"expected an integer that fits in 64 bits, got {value}"
            return value, None
        return None, f"expected an integer, got {_show(value)}"
    if inner is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # PyYAML follows YAML 1.1 and reads `2e-5` (no dot) as a string, so accept numeric strings
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None:
            return None, f"expected a number, got {_show(value)}"
        if not math.isfinite(number):
            return None, f"expected a finite number, got {_show(value)}"
        return number, None
    if inner is str:
        if isinstance(value, str):
            return value, None
        return None, f"expected a string, got {_show(value)}; quote it in YAML"
    raise TypeError(f"recipe schema uses an unsupported annotation {tp!r}")  # a bug in this file


def _unknown_key_message(key: str, dotted: str, valid: Sequence[str], section: str | None) -> str:
    msg = f"unknown key {dotted!r}"
    if dotted in REMOVED_KEYS:
        return f"{msg}: {dotted} was removed: {REMOVED_KEYS[dotted]}"
    close = difflib.get_close_matches(key, list(valid), n=1)
    if close:
        return f"{msg}; did you mean {close[0]!r}?"
    # a known field placed in the wrong section
    for other, cls in SECTIONS.items():
        if other != section and key in {f.name for f in dataclasses.fields(cls)}:
            return f"{msg}; {key!r} belongs in section '{other}' ('{other}.{key}')"
    return f"{msg}; valid keys: {', '.join(valid)}"


def _build_section(cls: type, raw: Any, section: str, problems: list[str], bad_keys: set[str]) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.append(f"{section}: expected a mapping of keys, got {_show(raw)}")
        bad_keys.add(section)
        return cls()
    hints = typing.get_type_hints(cls)
    valid = list(hints)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{section}.{key}"
        if key not in hints:
            problems.append(_unknown_key_message(str(key), dotted, valid, section))
            continue
        coerced, error = _check_value(value, hints[key])
        if error:
            problems.append(f"{dotted}: {error}")
            bad_keys.add(dotted)
        else:
            kwargs[key] = coerced
    return cls(**kwargs)


# ---------------------------------------------------------------------------
# Range and combination checks: all of them live here
# ---------------------------------------------------------------------------


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _at_least(
    problems: list[str], key: str, value: int | None, low: int, optional: bool = False, extra: str = ""
) -> None:
    if value is None or value >= low:
        return
    allowed = f">= {low}" + (" or null" if optional else "") + extra
    problems.append(f"{key}: must be {allowed}, got {value}")


def _adapter_methods() -> str:
    return " or ".join(name for name, method in METHODS.items() if method.is_adapter)


def model_problems(m: ModelConfig) -> list[str]:
    """The rules of the `model` section; `load_model` applies them to a config built in code too."""
    problems: list[str] = []
    if not 0 <= m.dropout < 1:
        problems.append(f"model.dropout: must be in [0, 1), got {m.dropout}; e.g. 0.1")
    if m.attn_implementation == "flash_attention_2":
        problems.append(
            "model.attn_implementation: flash_attention_2 is refused for PaliGemma: transformers then drops "
            "the prefix-LM mask silently (the prefix becomes causal); use sdpa or eager"
        )
    if m.final_logit_softcapping is not None and m.final_logit_softcapping < 0:
        problems.append(
            f"model.final_logit_softcapping: must be >= 0 (0 = off) or null (checkpoint's value), "
            f"got {m.final_logit_softcapping}"
        )
    return problems


def tuning_problems(tu: TuningConfig) -> list[str]:
    """The rules of the `tuning` section; `apply_tuning` applies them to a cfg built in code too."""
    problems: list[str] = []
    at_least = functools.partial(_at_least, problems)
    method = method_of(tu)
    if method.is_adapter:
        at_least("tuning.lora_r", tu.lora_r, 1, extra=f" when tuning.method is {tu.method} (try 8 or 16)")
        at_least("tuning.lora_alpha", tu.lora_alpha, 1, extra=" (usually 2 x tuning.lora_r)")
        try:
            re.compile(tu.lora_target_modules)
        except re.error as err:
            problems.append(f"tuning.lora_target_modules: not a valid regex ({err}); fix the pattern")
    if not 0 <= tu.lora_dropout < 1:
        problems.append(f"tuning.lora_dropout: must be in [0, 1), got {tu.lora_dropout}; e.g. 0.05")
    if method.quantized and not _has_module("bitsandbytes"):
        problems.append(
            f"tuning.method: {tu.method} needs bitsandbytes, which is not installed; "
            "pip install -e '.[qlora]' or use method lora"
        )
    for adapters, full in (("lora_vision", "train_vision_tower"), ("lora_projector", "train_projector")):
        if method.is_adapter and getattr(tu, adapters) and getattr(tu, full):
            # peft drops adapters inside a module listed in modules_to_save, silently
            problems.append(
                f"tuning.{adapters} and tuning.{full} are both true: a fully trained module cannot also hold "
                f"LoRA adapters; keep one of them"
            )
        if not method.is_adapter and getattr(tu, adapters):
            problems.append(
                f"tuning.{adapters}: true needs tuning.method {_adapter_methods()} (got {tu.method!r}); "
                f"set tuning.{adapters}: false or change the method"
            )
    return problems


def _check_combinations(recipe: Recipe) -> list[str]:
    """Every range and cross-field rule, one message per broken rule, naming key(s) and fix."""
    from pg_finetune.tasks import TASKS  # here, so importing the schema stays light

    problems: list[str] = []
    at_least = functools.partial(_at_least, problems)
    t, d, tu, tr, ev = recipe.task, recipe.data, recipe.tuning, recipe.training, recipe.eval

    if not recipe.name.strip():
        problems.append(
            "name: must be a non-empty string (it names the run and fills '{name}' in output_dir)"
        )

    # model
    problems += model_problems(recipe.model)

    # task
    if t.name not in TASKS:
        close = difflib.get_close_matches(t.name, list(TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"task.name: unknown task {t.name!r}; valid tasks: {', '.join(sorted(TASKS))}{hint}")
    task = TASKS.get(t.name)
    augments = task is not None and task.augment is not None  # detection's object order and negatives
    if t.shuffle_objects and not augments:
        problems.append(
            f"task.shuffle_objects: true only works with task.name detect (got {t.name!r}); "
            "set task.shuffle_objects: false or null"
        )
    at_least("task.negatives", t.negatives, 0, extra=" (0 = no absent classes in the prompt)")
    if t.negatives > 0 and not augments:
        problems.append(
            f"task.negatives: {t.negatives} only works with task.name detect (got {t.name!r}); "
            "set task.negatives: 0"
        )
    if task is not None and t.metric is not None and t.metric not in task.metrics:
        problems.append(
            f"task.metric: task {t.name!r} has no metric {t.metric!r}; valid: {', '.join(task.metrics)} "
            "(null = the task's own)"
        )

    # data
    if not d.train.strip():
        problems.append(
            "data.train: must not be empty; give a JSONL path, dataset dir, image folder, hub id or builtin:easyvqa"
        )
    if not d.train_split.strip():
        problems.append("data.train_split: must not be empty; e.g. 'train' or 'train[:2000]'")
    at_least("data.max_length", d.max_length, 8, extra=" (text tokens: bos + prefix + '\\n' + suffix + eos)")
    at_least("data.max_train_samples", d.max_train_samples, 1, optional=True)
    for key, config in (("data.train_config", d.train_config), ("data.eval_config", d.eval_config)):
        if config is not None and not config.strip():
            problems.append(f"{key}: must not be empty; give a configuration name (e.g. 'full') or null")
    if d.train.startswith("builtin:") and d.train_config is not None:
        problems.append(
            f"data.train_config: {d.train!r} has no dataset configurations; set data.train_config: null"
        )
    if d.lowercase_suffix and task is not None and task.check_target is not None:
        problems.append(
            f"data.lowercase_suffix: true would lower-case the class names in task {t.name!r}'s targets but "
            "not in its prompts and references; lower-case the data itself, or set data.lowercase_suffix: false"
        )
    if d.augment is not None:
        from pg_finetune.image_augment import augment_problems  # standard library only at import

        problems += augment_problems(d.augment, t.name)

    # tuning
    problems += tuning_problems(tu)
    if tr.merge_lora and not tu.method_spec.is_adapter:
        problems.append(
            f"training.merge_lora: true needs tuning.method {_adapter_methods()} (got {tu.method!r}); "
            "set training.merge_lora: false"
        )

    # training
    if not 0 < tr.learning_rate <= 1:
        problems.append(
            f"training.learning_rate: must be > 0 and <= 1, got {tr.learning_rate}; e.g. 2e-4 for LoRA"
        )
    if not 0 <= tr.warmup_ratio < 1:
        problems.append(f"training.warmup_ratio: must be in [0, 1), got {tr.warmup_ratio}; e.g. 0.05")
    if tr.weight_decay < 0:
        problems.append(f"training.weight_decay: must be >= 0, got {tr.weight_decay}")
    if not 0 <= tr.label_smoothing < 1:
        problems.append(f"training.label_smoothing: must be in [0, 1), got {tr.label_smoothing}; e.g. 0.1")
    if tr.label_smoothing and not tr.label_positions_loss:
        problems.append(
            f"training.label_smoothing: {tr.label_smoothing} needs training.label_positions_loss: true "
            "(transformers' own loss has no big_vision smoothing); set it to true, or label_smoothing: 0"
        )
    if tr.loss_normalization == "example" and not tr.label_positions_loss:
        problems.append(
            "training.loss_normalization: 'example' needs training.label_positions_loss: true (transformers' "
            "own loss averages over tokens); set it to true, or loss_normalization: token"
        )
    if tr.max_grad_norm < 0:
        problems.append(f"training.max_grad_norm: must be >= 0 (0 = no clipping), got {tr.max_grad_norm}")
    if not 0 <= tr.adam_beta2 < 1:
        problems.append(f"training.adam_beta2: must be in [0, 1), got {tr.adam_beta2}; e.g. 0.999")
    if tr.num_train_epochs <= 0:
        problems.append(f"training.num_train_epochs: must be > 0, got {tr.num_train_epochs}")
    if not 0 <= tr.seed <= MAX_SEED:
        problems.append(f"training.seed: must be in [0, 2**32 - 1] (numpy's seed range), got {tr.seed}; e.g. 42")
    if tr.max_steps != -1 and tr.max_steps < 1:
        problems.append(f"training.max_steps: must be -1 (use num_train_epochs) or >= 1, got {tr.max_steps}")
    for key in (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "save_steps",
    ):
        at_least(f"training.{key}", getattr(tr, key), 1)
    at_least("training.save_total_limit", tr.save_total_limit, 1, optional=True)
    at_least("training.dataloader_num_workers", tr.dataloader_num_workers, 0)
    if tr.bf16 and tr.fp16:
        problems.append(
            "training.bf16 and training.fp16: both true; pick one (bf16 on Ampere or newer, fp16 on T4)"
        )
    if not tr.output_dir.strip():
        problems.append("training.output_dir: must not be empty; e.g. 'runs/{name}'")
    if tr.resume_from_checkpoint is not None and not tr.resume_from_checkpoint.strip():
        problems.append("training.resume_from_checkpoint: empty; use 'auto', a checkpoint path, or null")
    if tr.optim in ("adamw_bnb_8bit", "paged_adamw_8bit") and not _has_module("bitsandbytes"):
        problems.append(
            f"training.optim: {tr.optim} needs bitsandbytes, which is not installed; "
            "pip install -e '.[qlora]' or use adamw_torch"
        )

    # eval
    at_least("eval.batch_size", ev.batch_size, 1)
    at_least("eval.num_beams", ev.num_beams, 1)
    at_least("eval.max_samples", ev.max_samples, 1, optional=True)
    at_least("eval.max_new_tokens", ev.max_new_tokens, 1, optional=True)
    at_least("eval.eval_steps", ev.eval_steps, 1, optional=True)
    at_least("eval.early_stopping_patience", ev.early_stopping_patience, 1, optional=True)
    for key, value in (("metric_for_best", ev.metric_for_best), ("early_stopping_patience", ev.early_stopping_patience)):
        if value is None:
            continue
        if not ev.eval_steps:
            problems.append(
                f"eval.{key}: needs eval.eval_steps (the evaluations it compares); set eval.eval_steps, "
                f"e.g. 200, or eval.{key}: null"
            )
        if d.eval_split is None:
            problems.append(
                f"eval.{key}: needs eval records, but data.eval_split is null; set data.eval_split "
                f"(e.g. 'test') or eval.{key}: null"
            )
    if ev.early_stopping_patience is not None and ev.metric_for_best is None:
        problems.append(
            "eval.early_stopping_patience: needs eval.metric_for_best (the metric that must improve); "
            "set it, e.g. 'accuracy' or 'loss', or eval.early_stopping_patience: null"
        )
    if ev.metric_for_best is not None:
        name = ev.metric_for_best
        if not name.strip():
            problems.append("eval.metric_for_best: empty; name a key the task's metric reports, e.g. 'accuracy', or null")
        elif name.startswith("eval/"):
            problems.append(
                f"eval.metric_for_best: {name!r}; give the key without 'eval/', e.g. {name.removeprefix('eval/')!r}"
            )
        elif name == "loss" and not ev.loss:
            problems.append("eval.metric_for_best: 'loss' needs eval.loss: true (the held-out loss is off)")
    return problems


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _build(data: Any, source: str, problems: list[str]) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"<top level>: expected a mapping of sections, got {_show(data)}"], source)
    bad_keys: set[str] = set()
    top_hints = typing.get_type_hints(Recipe)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            kwargs[key] = _build_section(SECTIONS[key], value, key, problems, bad_keys)
        elif key in TOP_LEVEL_FIELDS:
            coerced, error = _check_value(value, top_hints[key])
            if error:
                problems.append(f"{key}: {error}")
                bad_keys.add(key)
            else:
                kwargs[key] = coerced
        elif isinstance(value, dict):
            close = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"unknown section {key!r}{hint} (valid sections: {', '.join(SECTIONS)})")
        else:
            problems.append(_unknown_key_message(str(key), str(key), [*TOP_LEVEL_FIELDS, *SECTIONS], None))
    recipe = Recipe(**kwargs)
    recipe.training.output_dir = recipe.training.output_dir.replace("{name}", recipe.name)

    # A key that already failed its type check kept its default; rules about it would mislead.
    def mentions_bad_key(message: str) -> bool:
        return any(re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message) for k in bad_keys)

    problems.extend(p for p in _check_combinations(recipe) if not mentions_bad_key(p))
    return recipe


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    """Validate a plain dict (as read from YAML) into a `Recipe`; raise one `RecipeError` listing every problem."""
    problems: list[str] = []
    recipe = _build(data, source, problems)
    if problems:
        raise RecipeError(problems, source)
    return recipe


def validate_recipe(recipe: Recipe, source: str = "<recipe>") -> Recipe:
    """Re-validate a `Recipe` built or edited in code (same rules as loading)."""
    return recipe_from_dict(recipe_to_dict(recipe), source)


def _field_type(dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    if not key:
        return typing.get_type_hints(Recipe).get(section)
    cls = SECTIONS.get(section)
    return typing.get_type_hints(cls).get(key) if cls else None


def _redact_override(dotted: str, raw: str) -> str:
    """`key=value` for messages, with the value replaced when it looks like a Hugging Face token."""
    value = raw.strip()
    if _TOKEN_VALUE.match(value) or ("token" in dotted.lower() and value.startswith("hf_")):
        return f"{dotted}=<redacted>"
    return f"{dotted}={raw}"


def _apply_override(data: dict, override: str) -> str | None:
    """Apply one `section.key=value` override to `data` in place; return a problem message or None."""
    dotted, sep, raw = override.partition("=")
    dotted = dotted.strip()
    shown = _redact_override(dotted, raw) if sep else override  # error messages never echo a token
    if not sep or not dotted:
        return f"override {shown!r}: expected 'section.key=value', e.g. 'training.learning_rate=1e-4'"
    parts = dotted.split(".")
    if len(parts) > 2:
        return f"override {shown!r}: key {dotted!r} is too deep; use 'section.key=value'"
    if len(parts) == 1 and parts[0] in SECTIONS:
        return f"override {shown!r}: {dotted!r} is a section; set one key, e.g. '{dotted}.<key>=value'"
    if len(parts) == 2 and parts[0] not in SECTIONS:
        close = difflib.get_close_matches(parts[0], list(SECTIONS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"override {shown!r}: unknown section {parts[0]!r}{hint} (valid sections: {', '.join(SECTIONS)})"
    tp = _field_type(dotted)
    if tp is None:
        if len(parts) == 2:
            valid = list(typing.get_type_hints(SECTIONS[parts[0]]))
            msg = _unknown_key_message(parts[1], dotted, valid, parts[0])
        else:
            msg = _unknown_key_message(dotted, dotted, [*TOP_LEVEL_FIELDS, *SECTIONS], None)
        return f"override {shown!r}: {msg}"
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        detail = "" if shown != override else f" ({str(err).splitlines()[0]})"
        return f"override {shown!r}: value is not valid YAML{detail}; quote it"
    # On the command line nobody quotes strings: `model.revision=0123` or `logging.wandb_mode=off`
    # should stay text for a text field instead of becoming 83 or false.
    _, inner = _is_optional(tp)
    is_text = inner is str or (
        typing.get_origin(inner) is Literal and all(isinstance(a, str) for a in typing.get_args(inner))
    )
    if is_text and isinstance(value, (bool, int, float)):
        value = raw.strip()
    if len(parts) == 1:
        data[dotted] = value
    else:
        section = data.get(parts[0])
        if section is None:
            section = data[parts[0]] = {}
        if not isinstance(section, dict):
            return None  # the section itself is malformed; validation reports it
        section[parts[1]] = value
    return None


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus: a key written twice in one mapping is recorded in `duplicates`.

    Plain PyYAML keeps the last value of a repeated key without a word, so a recipe that sets
    `learning_rate` in two places (or has two `training:` sections) would run with whichever came
    last. Each repeat becomes one problem naming the dotted key and every line it is on.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[str] = []
        self._paths: dict[int, str] = {}  # id(mapping node) -> its dotted key, for messages

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        path = self._paths.get(id(node), "")
        lines: dict[str, list[int]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            dotted = f"{path}.{key_node.value}" if path else key_node.value
            lines.setdefault(key_node.value, []).append(key_node.start_mark.line + 1)
            if isinstance(value_node, yaml.MappingNode):
                self._paths[id(value_node)] = dotted
        for key, where in lines.items():
            if len(where) > 1:
                shown = ", ".join(map(str, where[:-1])) + f" and {where[-1]}"
                times = "twice" if len(where) == 2 else f"{len(where)} times"
                if not path and key in SECTIONS:
                    self.duplicates.append(
                        f"section {key!r}: written {times} (lines {shown}); YAML would keep only the "
                        "last one and drop the others' keys; merge them into one section"
                    )
                else:
                    dotted = f"{path}.{key}" if path else key
                    self.duplicates.append(
                        f"{dotted}: written {times} (lines {shown}); YAML would silently keep the "
                        "last value; delete all but one"
                    )
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path, source: str) -> str:
    """The recipe file as text; a byte that is not UTF-8 is named by line and column."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RecipeError([f"cannot read the recipe file: {err.strerror or err}"], source) from err
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (some Windows editors write one) is fine
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise RecipeError(
            [
                f"line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); save the recipe as "
                "UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ],
            source,
        ) from err


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `section.key=value` overrides (values parsed as YAML), validate."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        path = path / RECIPE_FILENAME
        source = str(path)
    text = _read_text(path, source)
    loader = _RecipeLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        raise RecipeError([f"not valid YAML: {err}"], source) from err
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"<top level>: expected a mapping of sections, got {_show(data)}"], source)
    problems: list[str] = list(loader.duplicates)
    for override in overrides:
        problem = _apply_override(data, override)
        if problem:
            problems.append(problem)
    recipe = _build(data, source, problems)
    if problems:
        raise RecipeError(problems, source)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain dicts/scalars, every default filled in, in schema order."""
    return dataclasses.asdict(recipe)


_TOKEN_VALUE = re.compile(r"^hf_[A-Za-z0-9]{20,}$")
_TOKEN_ANYWHERE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")


def _redact_secrets(obj: Any) -> Any:
    """Replace anything that looks like a Hugging Face token: the schema has no token field, but be sure."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            looks_secret = isinstance(value, str) and "token" in str(key).lower() and value.startswith("hf_")
            out[key] = "<redacted>" if looks_secret else _redact_secrets(value)
        return out
    if isinstance(obj, list):
        return [_redact_secrets(v) for v in obj]
    if isinstance(obj, str):  # also inside free text ("description: uses hf_...")
        return _TOKEN_ANYWHERE.sub("<redacted>", obj)
    return obj


def redact_recipe(recipe: Recipe) -> Recipe:
    """A copy of `recipe` with token-looking values replaced, for anything written or shown (model cards)."""
    data = _redact_secrets(recipe_to_dict(recipe))
    sections = {name: cls(**data.pop(name)) for name, cls in SECTIONS.items()}
    return Recipe(**data, **sections)


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe as YAML (to DIR/recipe.yaml when `path` is a directory); return the path."""
    from pg_finetune import __version__

    path = Path(path)
    if path.is_dir():
        path = path / RECIPE_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _redact_secrets(recipe_to_dict(recipe))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = (
        f"# Resolved recipe '{recipe.name}', written by pg-finetune {__version__} at {now}.\n"
        "# Every default is filled in, so this file alone reproduces the run:\n"
        f"#   accelerate launch -m pg_finetune.train --recipe {path}\n"
    )
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    path.write_text(header + body, encoding="utf-8")
    return path


__all__ = [
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "Recipe",
    "RecipeError",
    "TaskConfig",
    "TrainingConfig",
    "TuningConfig",
    "load_recipe",
    "recipe_from_dict",
    "redact_recipe",
    "recipe_to_dict",
    "save_recipe",
    "validate_recipe",
]
