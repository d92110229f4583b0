"""Load a PaliGemma or PaliGemma 2 model and its processor.

`model.name_or_path` is a hub id (`google/paligemma2-3b-pt-224`), a local
`save_pretrained` directory, or `tiny` / `tiny-paligemma2` / `tiny-spatial` for the random tiny
model of `pg_finetune.tiny` (written once to a cache directory and then loaded
through the same `from_pretrained` path as a real checkpoint).
No `trust_remote_code`: PaliGemma is part of transformers.

`resolve_max_length` picks the text-token budget inference uses: `--max-length`, else the
`data.max_length` of the recipe a trained model directory carries, else 512.

`model.dropout` > 0 adds big_vision's llm dropout to the decoder (`add_residual_dropout`): active in
train mode only, so `model.eval()` (evaluation, generation) turns it off.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoProcessor, PaliGemmaForConditionalGeneration

from pg_finetune.recipe import RECIPE_FILENAME, model_problems
from pg_finetune.tuning import method_of, quantization_config

logger = logging.getLogger(__name__)

TINY_MODELS = {
    "tiny": "paligemma", "tiny-paligemma": "paligemma", "tiny-paligemma2": "paligemma2", "tiny-spatial": "paligemma",
}  # fmt: skip
# Tiny models built with more than a decoder variant: name -> `pg_finetune.tiny.build_tiny` options.
# tiny-spatial: vision position embeddings 8x stronger, so a frozen random tower keeps where each patch
# is (the tiny segment recipe places its boxes with it; `tiny` builds exactly as before).
TINY_BUILD_OPTIONS = {"tiny-spatial": {"position_scale": 8.0}}
# The one dtype map: model.dtype and tuning.bnb_4bit_compute_dtype name its keys (tests/test_model.py checks).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
DEFAULT_MAX_LENGTH = 512  # generate()'s default: what inference used before it read the training recipe
MIN_MAX_LENGTH = 8  # the recipe's own floor for data.max_length; the collator needs <bos>, "\n" and <eos>


class ModelLoadError(RuntimeError):
    """The model or processor could not be loaded; the message says what to do."""


def tiny_model_dir(name: str) -> Path:
    """Write the tiny model once under the cache dir and return its path."""
    from pg_finetune.tiny import save_tiny

    variant, options = TINY_MODELS[name], TINY_BUILD_OPTIONS.get(name, {})
    root = Path(os.environ.get("PG_FINETUNE_CACHE", Path.home() / ".cache" / "pg_finetune"))
    path = root / (f"{name}-seed0" if options else f"tiny-{variant}-seed0")
    if not (path / "model.safetensors").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_tiny(tmp, variant=variant, seed=0, **options)
        try:
            tmp.rename(path)  # atomic: a second process racing here finds a complete directory
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face Hub answers (and offline mode is not forced)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def preflight_hub(name: str, what: str, filename: str = "config.json", repo_type: str = "model") -> None:
    """Fail in seconds, not after minutes of retries, when a hub id cannot be reached nor found in the cache."""
    if Path(name).exists() or name in TINY_MODELS:
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, filename, repo_type=repo_type)
    except Exception:  # an id that is not a valid repo name: let the loader say so
        cached = None
    if isinstance(cached, str) or hub_reachable():
        return
    raise ModelLoadError(_explain(name, ConnectionError("the Hub is unreachable and nothing is cached"), what))


def resolve_model_path(name_or_path: str) -> str:
    return str(tiny_model_dir(name_or_path)) if name_or_path in TINY_MODELS else name_or_path


def load_processor(name_or_path: str, *, revision: str | None = None, **hub: Any):
    path = resolve_model_path(name_or_path)
    preflight_hub(name_or_path, "processor", filename="preprocessor_config.json")
    try:
        processor = AutoProcessor.from_pretrained(path, revision=revision, **hub)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_explain(name_or_path, err, "processor")) from err
    if not hasattr(processor, "image_seq_length"):
        raise ModelLoadError(f"{name_or_path}: the processor is a {type(processor).__name__}, not a PaliGemmaProcessor")
    return processor


def load_model(model_cfg: Any, tuning_cfg: Any | None = None) -> PaliGemmaForConditionalGeneration:
    """Load the model described by the recipe's `model` section (in 4 bit for a quantized tuning method)."""
    problems = model_problems(model_cfg)  # the recipe's rules, for a ModelConfig built in code
    if problems:
        raise ModelLoadError("; ".join(problems))
    name = model_cfg.name_or_path
    path = resolve_model_path(name)
    hub = {"revision": model_cfg.revision, "cache_dir": model_cfg.cache_dir, "local_files_only": model_cfg.local_files_only}
    preflight_hub(name, "model config")
    try:
        config = AutoConfig.from_pretrained(path, **hub)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_explain(name, err, "model config")) from err
    if config.model_type != "paligemma":
        raise ModelLoadError(f"{name} is a {config.model_type!r} model, not PaliGemma / PaliGemma 2")

    text = config.text_config
    if model_cfg.final_logit_softcapping is not None:
        # big_vision transfers PaliGemma 2 with the final soft-capping off; 0 means off here.
        text.final_logit_softcapping = model_cfg.final_logit_softcapping or None
    attn = model_cfg.attn_implementation
    if attn == "sdpa" and getattr(text, "attn_logit_softcapping", None):
        logger.warning(
            "%s uses Gemma 2 attention soft-capping, which transformers' sdpa kernel does not support; "
            "using eager attention (also prefix-LM correct)",
            name,
        )
        attn = "eager"

    kwargs: dict[str, Any] = dict(config=config, attn_implementation=attn, dtype=DTYPES[model_cfg.dtype], **hub)
    if tuning_cfg is not None and method_of(tuning_cfg).quantized:
        kwargs["quantization_config"] = quantization_config(tuning_cfg)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = PaliGemmaForConditionalGeneration.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_explain(name, err, "model weights")) from err
    if getattr(model_cfg, "dropout", 0.0):
        add_residual_dropout(model, model_cfg.dropout)
    return model


class _OutputDropout:
    """Forward hook: dropout on a module's output (the first element of a tuple), in train mode only."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], self.p, training=True), *output[1:])
        return torch.nn.functional.dropout(output, self.p, training=True)


def add_residual_dropout(model: torch.nn.Module, p: float) -> list[torch.nn.Module]:
    """big_vision's llm dropout on every decoder layer of a PaliGemma model; returns the hooked modules.

    big_vision (`models/ppp/gemma.py`, `Block`) drops the attention branch and the MLP branch just before
    each is added to the residual stream: Gemma 2 drops after its post-attention norm and before its
    post-feedforward norm, Gemma after self-attention and after the MLP. transformers' Gemma has no such
    dropout (only `attention_dropout`, on the attention probabilities, which big_vision does not have),
    so it is added here as forward hooks on those modules. They act only while `module.training` is
    true, draw from torch's RNG (seeded by training.seed; gradient checkpointing replays the same masks),
    and are not saved with the weights.
    """
    if not 0 < p < 1:
        raise ValueError(f"dropout must be in (0, 1), got {p}")
    hooked = []
    for layer in _paligemma_core(model).language_model.layers:
        if getattr(layer, "_pg_residual_dropout", None) is not None:
            raise ValueError("residual dropout is already on this model")
        gemma2 = hasattr(layer, "post_feedforward_layernorm")  # Gemma 2's post-norms
        for module in (layer.post_attention_layernorm if gemma2 else layer.self_attn, layer.mlp):
            module.register_forward_hook(_OutputDropout(p))
            hooked.append(module)
        layer._pg_residual_dropout = p
    return hooked


def _paligemma_core(model: torch.nn.Module) -> torch.nn.Module:
    """The PaliGemmaModel (vision tower, projector, language model) inside a peft or plain model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.model


def _explain(name: str, err: Exception, what: str) -> str:
    if Path(name).exists() or name in TINY_MODELS:
        return f"cannot load the {what} from local directory {name}: {err}"
    if name.startswith((".", "/", "~")):
        return f"model directory {name} does not exist; check model.name_or_path"
    return (
        f"cannot load the {what} of {name!r} from the Hugging Face Hub ({type(err).__name__}: {str(err)[:200]}).\n"
        f"PaliGemma checkpoints are gated: accept the licence on the model page, log in with `hf auth login` "
        f"(or set HF_TOKEN), then either run online once or download it: "
        f"`hf download {name} --local-dir models/{name.split('/')[-1]}` and set "
        f"model.name_or_path to that directory. To try the toolkit offline use model.name_or_path: tiny."
    )


def load_for_inference(
    name_or_path: str, adapter: str | None = None, *, dtype: str = "float32", cpu: bool = False
) -> tuple[PaliGemmaForConditionalGeneration, Any]:
    """(model in eval mode, processor) for generation: base model, optional PEFT adapter, GPU if present.

    The processor comes from the adapter directory when there is one (training saves it there).
    """
    from pg_finetune.recipe import ModelConfig

    processor = load_processor(adapter or name_or_path)
    model = load_model(ModelConfig(name_or_path=name_or_path, dtype=dtype))
    if adapter:
        from pg_finetune.imports import bitsandbytes_hidden

        with bitsandbytes_hidden():  # the base is full precision: peft's 4/8-bit layer lookup is not needed
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
    if torch.cuda.is_available() and not cpu:
        model = model.cuda()
    return model.eval(), processor


# ---- inference max_length ------------------------------------------------------------------------


def training_max_length(name_or_path: str, adapter: str | None = None) -> tuple[int, Path] | None:
    """(data.max_length, recipe path) from the recipe a trained model directory carries; None without one.

    The adapter directory's recipe.yaml is read first (it describes the adapter's training); the model's
    only when there is no adapter recipe and the model is a local directory. Only `data.max_length` is
    taken, without validating the whole recipe: a file from an older version may hold keys this one
    rejects, and that must not stop an evaluation.
    """
    model_dir = None if name_or_path in TINY_MODELS else name_or_path  # a `tiny` in the cwd is not what loads
    for directory in (adapter, model_dir):
        if directory and (path := Path(directory) / RECIPE_FILENAME).is_file():
            # The first recipe found is the training that made these weights: if it gives no value,
            # a base model's recipe (another training) is no better a guess than the default.
            return _recipe_max_length(path)
    return None


def _recipe_max_length(path: Path) -> tuple[int, Path] | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        logger.warning("cannot read %s (%s); max_length falls back to %d", path, err, DEFAULT_MAX_LENGTH)
        return None
    section = data.get("data", {}) if isinstance(data, dict) else None
    if not isinstance(section, dict):
        logger.warning("%s is not a recipe (no `data` mapping); max_length falls back to %d",
                       path, DEFAULT_MAX_LENGTH)  # fmt: skip
        return None
    value = section.get("max_length")
    if value is None:  # a recipe without the key trained with the default
        logger.info("%s has no data.max_length", path)
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_MAX_LENGTH:
        logger.warning("%s: data.max_length=%r is not an integer >= %d; max_length falls back to %d",
                       path, value, MIN_MAX_LENGTH, DEFAULT_MAX_LENGTH)  # fmt: skip
        return None
    return value, path


def resolve_max_length(flag: int | None, name_or_path: str, adapter: str | None = None) -> tuple[int, str]:
    """(max_length, source) for generation: the flag > the training recipe's data.max_length > 512.

    `source` is "flag", "recipe <path>" or "default", for reports.
    """
    if flag is not None:
        return flag, "flag"
    found = training_max_length(name_or_path, adapter)
    if found is not None:
        return found[0], f"recipe {found[1]}"
    return DEFAULT_MAX_LENGTH, "default"


def max_length_arg(text: str) -> int:
    """argparse `type` for --max-length: an integer the collator accepts (argparse exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer number of text tokens, got {text!r}") from None
    if value < MIN_MAX_LENGTH:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_MAX_LENGTH} (text tokens: <bos> + prompt + '\\n'), got {value}"
        )
    return value
