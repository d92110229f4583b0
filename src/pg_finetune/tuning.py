"""Choose which PaliGemma parameters train: full, attention_only, lora or qlora.

    model = apply_tuning(model, recipe.tuning, gradient_checkpointing=True)
    print(describe_parameters(model))  # trainable params: 11,298,816 / 2,934,765,296 (0.38%)

Methods live in a plain dict registry, `METHODS`: name -> `TuningMethod` record (its `apply`
function, what it trains, whether the result is a LoRA adapter, whether the base loads in 4 bit).
Everything else asks the record (`method_of(cfg).is_adapter`), never the method's name, so a new
method is one `_apply_*` function plus one line in `METHODS`; the recipe schema, the model loader,
the model card and the report follow from its record.

- full: every decoder weight trains, including the token embeddings and the lm_head
  tied to them; the vision tower and the projector train only when
  `train_vision_tower` / `train_projector` say so.
- attention_only: only the decoder's self-attention projections train, as in the
  big_vision PaliGemma colab (`trainable_mask` = "llm/layers/attn/"). SigLIP's own
  attention stays frozen; vision tower and projector follow the flags.
- lora: peft LoRA adapters on the modules named by the `lora_target_modules` regex
  (the decoder by default), `lora_vision` / `lora_projector` widen it, and
  `train_vision_tower` / `train_projector` make those modules fully trainable
  through peft's `modules_to_save` (so the adapter checkpoint carries them).
- qlora: the same LoRA on a base already loaded in 4 bit with `quantization_config(cfg)`.

`cfg` is the recipe's `TuningConfig`, or any object with the same attributes; the rules a valid
one meets (ranks, adapters vs fully trained modules, ...) live in `pg_finetune.recipe`, and
`apply_tuning` checks a cfg built in code against them. Module names follow transformers >= 4.52
(`model.vision_tower`, `model.multi_modal_projector`, `model.language_model`, `lm_head`).

This module imports torch, transformers and peft only inside the functions that need them: the
recipe schema reads `METHODS`, and validating a recipe must not wait for torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."
DECODER_PREFIX = "model.language_model."
# big_vision's colab trains "llm/layers/attn/": everything under the decoder layers' attention.
DECODER_ATTENTION = re.compile(r"model\.language_model\.layers\.\d+\.self_attn\..+")

# Full name prefixes (bitsandbytes matches the start of the module name, not its last part):
# the vision tower, the projector and lm_head stay in full precision.
QLORA_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
# SigLIP's linear layers: attention q/k/v/out_proj and the MLP's fc1/fc2.
LORA_VISION_TARGETS = r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
LORA_PROJECTOR_TARGETS = r".*multi_modal_projector\.linear"


class MissingDependencyError(ImportError):
    """An optional dependency of the chosen recipe is not installed."""


# ---------------------------------------------------------------------------
# Quantisation (qlora)
# ---------------------------------------------------------------------------


def quantization_config(cfg) -> BitsAndBytesConfig | None:
    """The 4-bit `BitsAndBytesConfig` to load the base with for a quantized method (qlora); None otherwise.

    Raises `MissingDependencyError` (an ImportError) when bitsandbytes is not installed: the
    recipe schema refuses such a recipe already, this covers callers that build `cfg` in code.
    """
    if not method_of(cfg).quantized:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            f"tuning.method: {cfg.method} needs bitsandbytes; install it with pip install -e '.[qlora]'"
        ) from err
    from transformers import BitsAndBytesConfig

    from pg_finetune.model import DTYPES

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=DTYPES[cfg.bnb_4bit_compute_dtype],
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
    )


# ---------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------


def _follows_flags(name: str, cfg) -> bool | None:
    """True/False for vision-tower and projector parameters (from the flags), None otherwise."""
    if name.startswith(VISION_PREFIX):
        return cfg.train_vision_tower
    if name.startswith(PROJECTOR_PREFIX):
        return cfg.train_projector
    return None


def _check_layout(model: torch.nn.Module) -> None:
    names = {name for name, _ in model.named_parameters()}
    for prefix in (VISION_PREFIX, PROJECTOR_PREFIX, DECODER_PREFIX):
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(
                f"no parameter named {prefix}*: apply_tuning expects a transformers>=4.52 "
                f"PaliGemmaForConditionalGeneration, got {type(model).__name__}"
            )


def _apply_full(model, cfg, gradient_checkpointing: bool):
    """Decoder (+ tied embeddings/lm_head) trains; vision tower and projector follow the flags."""
    for name, param in model.named_parameters():
        flag = _follows_flags(name, cfg)
        param.requires_grad_(True if flag is None else flag)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    return model


def _apply_attention_only(model, cfg, gradient_checkpointing: bool):
    """Decoder self-attention trains; vision tower and projector follow the flags."""
    for name, param in model.named_parameters():
        flag = _follows_flags(name, cfg)
        param.requires_grad_(bool(DECODER_ATTENTION.fullmatch(name)) if flag is None else flag)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    return model


def lora_target_regex(cfg) -> str:
    """The peft `target_modules` regex (full-matched against module names) for this recipe."""
    patterns = [cfg.lora_target_modules]
    if cfg.lora_vision:
        patterns.append(LORA_VISION_TARGETS)
    if cfg.lora_projector:
        patterns.append(LORA_PROJECTOR_TARGETS)
    return "|".join(f"(?:{p})" for p in patterns)


def _lora_config(cfg):
    from peft import LoraConfig

    modules_to_save = []
    if cfg.train_vision_tower:
        modules_to_save.append("vision_tower")
    if cfg.train_projector:
        modules_to_save.append("multi_modal_projector")
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_regex(cfg),
        modules_to_save=modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _apply_lora(model, cfg, gradient_checkpointing: bool):
    lora_config = _lora_config(cfg)
    model.requires_grad_(False)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    return _wrap_in_lora(model, lora_config, gradient_checkpointing)


def _wrap_in_lora(model, lora_config, gradient_checkpointing: bool):
    from pg_finetune.imports import bitsandbytes_hidden

    # peft imports bitsandbytes (seconds) to look for 4/8-bit layers; a full-precision base has none
    with bitsandbytes_hidden(not getattr(model, "is_loaded_in_4bit", False)):
        from peft import get_peft_model

        peft_model = get_peft_model(model, lora_config)
    if gradient_checkpointing:
        # PeftModel.__init__ calls enable_input_require_grads() again, hooking SigLIP too.
        _keep_input_grads_in_decoder(model)
    return peft_model


def _apply_qlora(model, cfg, gradient_checkpointing: bool):
    if not getattr(model, "is_loaded_in_4bit", False):  # a property of the model given, not of the recipe
        raise ValueError(
            "tuning.method: qlora expects a base loaded in 4 bit: pass quantization_config(cfg) "
            "to from_pretrained (or use method lora for a full-precision base)"
        )
    lora_config = _lora_config(cfg)
    prepare_for_kbit_training(model)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    return _wrap_in_lora(model, lora_config, gradient_checkpointing)


def prepare_for_kbit_training(model) -> None:
    """Freeze every weight; upcast the float16 ones that are not 4-bit to fp32, keep bfloat16 as it is.

    peft's `prepare_model_for_kbit_training` upcasts bf16 weights too: at 3B that is the vision
    tower and the 257k x 2048 embeddings, ~0.93 B weights, +1.9 GB for frozen weights that gain
    nothing from fp32 (bf16 has fp32's range; Gemma's RMSNorm computes in fp32 anyway, and the LoRA
    adapters are fp32 through peft's autocast_adapter_dtype). A bf16 base then trains as the
    `lora` method's bf16 base does. float16 is still upcast, as peft does: fp16 weights that
    `train_vision_tower` / `train_projector` make trainable (modules_to_save) cannot be
    unscaled by the fp16 GradScaler.
    """
    import torch

    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype == torch.float16 and param.__class__.__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TuningMethod:
    """One tuning method: how to apply it and what it means for loading, saving and reporting."""

    name: str  # the recipe's tuning.method
    apply: Callable[[Any, Any, bool], Any]  # (model, cfg, gradient_checkpointing) -> the model to train
    trains: str  # what trains (everything else is frozen), for the recipe's help text and model cards
    is_adapter: bool = False  # the result is a peft model: checkpoints hold LoRA adapters; merge_lora applies
    quantized: bool = False  # the base loads in 4 bit (bitsandbytes), see quantization_config


METHODS: dict[str, TuningMethod] = {
    method.name: method
    for method in (
        TuningMethod("full", _apply_full, "every decoder weight, with the tied embeddings and lm_head"),
        TuningMethod("attention_only", _apply_attention_only, "the decoder's self-attention (as big_vision)"),
        TuningMethod("lora", _apply_lora, "LoRA adapters on a frozen base", is_adapter=True),
        TuningMethod("qlora", _apply_qlora, "LoRA adapters on a 4-bit base", is_adapter=True, quantized=True),
    )
}


def method_of(cfg) -> TuningMethod:
    """The registry record of `cfg.method`; a ValueError listing the valid names for an unknown one."""
    try:
        return METHODS[cfg.method]
    except KeyError:
        valid = ", ".join(METHODS)
        raise ValueError(f"tuning.method: unknown method {cfg.method!r}; valid: {valid}") from None


def apply_tuning(model, cfg, *, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Mark the parameters `cfg.method` trains and return the model to train.

    full and attention_only return `model` itself with `requires_grad` set; lora and qlora
    return a peft `PeftModel` wrapping it. With `gradient_checkpointing`, decoder and vision
    layers recompute activations in backward (`use_reentrant=False`); do not turn it on
    again through the Trainer's `activation_checkpointing` argument.
    """
    from pg_finetune.recipe import tuning_problems  # the schema's rules, for a cfg built in code

    method = method_of(cfg)
    problems = tuning_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    _check_layout(model)
    return method.apply(model, cfg, gradient_checkpointing)


# ---------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------


def _enable_gradient_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _keep_input_grads_in_decoder(model)


def _keep_input_grads_in_decoder(model) -> None:
    """Make only the decoder's input embeddings require grad when they are frozen.

    transformers' `enable_input_require_grads` (called by checkpointing_enable) hooks every
    sub-model's input embeddings, SigLIP's patch embedding included: with a frozen vision
    tower, backward then runs through all of SigLIP for nothing. Non-reentrant
    checkpointing needs no such hook at all; we keep the decoder's one, which is cheap
    and what peft's recipes expect for reentrant checkpointing.
    """
    model.disable_input_require_grads()
    embeddings = model.get_input_embeddings()
    if not embeddings.weight.requires_grad:

        def make_output_require_grad(module, inputs, output):
            output.requires_grad_(True)

        model._require_grads_hooks = [embeddings.register_forward_hook(make_output_require_grad)]


# ---------------------------------------------------------------------------
# Counting and merging
# ---------------------------------------------------------------------------


def _numel(param: torch.Tensor) -> int:
    # bitsandbytes' Params4bit stores two 4-bit values per uint8 byte, flattened to (n/2, 1);
    # quant_state.shape holds the real (out, in) shape.
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    if param.__class__.__name__ == "Params4bit":
        return 2 * param.numel() * param.element_size()
    return param.numel()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once.

    4-bit weights count as the number of values they hold (`quant_state.shape`), not as
    the packed uint8 bytes they are stored in. peft's modules_to_save keeps the frozen
    original beside the trained copy: both count, as both are in memory.
    """
    trainable = total = 0
    for _, param in model.named_parameters():
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def describe_parameters(model: torch.nn.Module) -> str:
    """One log line, e.g. "trainable params: 123,456 / 1,234,567 (10.00%)"."""
    trainable, total = count_parameters(model)
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} / {total:,} ({share:.2f}%)"


def _is_quantized(model: torch.nn.Module) -> bool:
    return any(param.__class__.__name__ in ("Params4bit", "Int8Params") for param in model.parameters())


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into the base weights and return the plain transformers model.

    A model without adapters (full, attention_only) comes back unchanged. A 4-bit base
    (qlora) cannot absorb full-precision deltas without rounding them away: reload the
    base in full precision and use `merge_adapter_into_base(base, adapter_dir)`.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    if _is_quantized(model):
        raise ValueError(
            "cannot merge LoRA into a 4-bit (qlora) base: save the adapter, load the base model "
            "again in full precision (no quantization_config) and call "
            "merge_adapter_into_base(base_model, adapter_dir)"
        )
    return model.merge_and_unload()


def merge_adapter_into_base(base_model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Load the adapter saved in `adapter_dir` onto a full-precision base and merge it in."""
    from peft import PeftModel

    if _is_quantized(base_model):
        raise ValueError(
            "merge_adapter_into_base needs a full-precision base; load it without quantization_config"
        )
    return PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
