"""Build a tiny, randomly initialised PaliGemma that runs offline.

    python -m pg_finetune.tiny --out runs/tiny-pg [--variant paligemma|paligemma2]

The model has the real architecture (SigLIP vision tower -> linear projector ->
Gemma or Gemma 2 decoder) at toy widths, and the processor carries a BPE
tokenizer trained here, on the words our built-in tasks use, laid out like
Gemma's (<pad>=0, <eos>=1, <bos>=2, <unk>=3, byte fallback) and followed by the
tokens PaliGemma adds: `<image>`, `<loc0000>`..`<loc1023>`, `<seg000>`..`<seg127>`.
The directory it writes is an ordinary `save_pretrained` directory: both
`transformers.AutoProcessor.from_pretrained` and
`PaliGemmaForConditionalGeneration.from_pretrained` read it unchanged.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    Gemma2Config,
    GemmaConfig,
    GemmaTokenizer,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

VARIANTS = ("paligemma", "paligemma2")
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's ids 0..4
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]  # Gemma's byte fallback pieces

# Words of the built-in tasks (easy-vqa questions and answers, caption, detect and
# count prompts); anything else still encodes, through byte fallback.
_CORPUS_WORDS = """
caption en answer en detect count the intersections segment describe what is this
shape color does image contain a an there in of not no yes circle rectangle triangle
square red green blue yellow teal gray grey brown black white orange purple pink
how many lines cross one two three four five six seven eight nine ten zero
small large big left right top bottom center middle background on with and picture
photo drawing of sitting standing next to it its are is a monster creature cute
pixel art game character ; 0 1 2 3 4 5 6 7 8 9 . , ? ! : -
"""


def _corpus() -> list[str]:
    words = _CORPUS_WORDS.split()
    lines = [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)]
    # Frequent phrases, so that whole prompts become a few tokens.
    phrases = [
        "caption en", "answer en", "detect", "count the intersections",
        "what is the shape?", "what color is the shape?", "is there a", "in the image?",
        "does the image contain a", "does the image not contain a", "what shape is",
    ]
    return lines + [p for p in phrases for _ in range(20)] + [" ".join(p) for p in itertools.permutations("0123456789", 2)]


def build_tokenizer(vocab_size: int = 1024) -> GemmaTokenizer:
    """Train a small Gemma-style BPE tokenizer (deterministic for a given corpus)."""
    base = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    base.normalizer = normalizers.Replace(" ", "\u2581")
    base.pre_tokenizer = pre_tokenizers.Split(pattern="\u2581", behavior="merged_with_previous")
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
        show_progress=False,
        min_frequency=1,
    )
    base.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = GemmaTokenizer(vocab=base.get_vocab(), merges=_merges_of(base))
    tokenizer.padding_side = "right"
    return tokenizer


def _merges_of(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    import json

    model = json.loads(tokenizer.to_str())["model"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def build_processor(image_size: int = 64, patch_size: int = 16, vocab_size: int = 1024) -> PaliGemmaProcessor:
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_seq_length=(image_size // patch_size) ** 2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(vocab_size))


def build_config(
    processor: PaliGemmaProcessor,
    variant: str = "paligemma",
    hidden_size: int = 64,
    num_layers: int = 2,
    patch_size: int = 16,
) -> PaliGemmaConfig:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    tokenizer = processor.tokenizer
    vocab_size = len(tokenizer)
    image_size = processor.image_processor.size["height"]
    vision = SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=1,  # multi-query attention, as in PaliGemma-3B
        head_dim=hidden_size // 4,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if variant == "paligemma":
        text = GemmaConfig(**common)
    else:
        # Gemma 2 adds logit soft-capping and alternating sliding-window layers.
        text = Gemma2Config(
            **common,
            sliding_window=64,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=hidden_size // 4,
        )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        vocab_size=vocab_size,
        projection_dim=hidden_size,
        hidden_size=hidden_size,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_tiny(
    variant: str = "paligemma", seed: int = 0, position_scale: float = 1.0, **kwargs
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """Return a (model, processor) pair with random weights drawn from `seed`.

    position_scale multiplies the vision tower's random position embeddings after init. At 1 (the
    default, what `tiny` builds) they are ~8x weaker than the random patch features, and a frozen
    random tower barely says where a patch is; at 8 they are as strong, and the tiny segment
    recipe learns to place its boxes within ~1,000 steps (recipes/tiny/easyvqa_segment.yaml).
    """
    image_size = kwargs.pop("image_size", 64)
    patch_size = kwargs.pop("patch_size", 16)
    processor = build_processor(image_size=image_size, patch_size=patch_size)
    config = build_config(processor, variant=variant, patch_size=patch_size, **kwargs)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    if position_scale != 1.0:
        with torch.no_grad():
            model.model.vision_tower.embeddings.position_embedding.weight.mul_(position_scale)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model.eval(), processor


def save_tiny(out: str | Path, variant: str = "paligemma", seed: int = 0, position_scale: float = 1.0) -> Path:
    out = Path(out)
    model, processor = build_tiny(variant=variant, seed=seed, position_scale=position_scale)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--variant", choices=VARIANTS, default="paligemma", help="Gemma (1) or Gemma 2 decoder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    out = save_tiny(args.out, variant=args.variant, seed=args.seed)
    print(f"wrote a tiny random {args.variant} model and processor to {out}")


if __name__ == "__main__":
    main()
