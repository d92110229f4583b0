"""Write a random-weight PaliGemma at its real 3B size, offline, once, for CPU runs of every path.

    python -m pg_finetune.real_size --config paligemma2-3b-pt-224 [--out DIR]
    python -m pg_finetune.real_size --list

The directory is an ordinary bf16 `save_pretrained` directory (model + processor), so recipes
load it with `model.name_or_path: DIR`. Without `--out` it lands in
`$PG_FINETUNE_CACHE/real_size/<config>` (default `~/.cache/pg_finetune/real_size/<config>`) and
is reused: the marker file `COMPLETE` is written last, so a killed write is redone, not loaded.
About 6 GB on disk and 6 GB of memory while written; the weights are drawn directly in bf16 (no
fp32 copy of the model ever exists).

The configs are transcribed by hand from the published `config.json` of google/paligemma-3b-pt-224
and google/paligemma2-3b-pt-224 / -448 (they cannot be downloaded here): SigLIP So400m/14 vision
tower (width 1152, 27 layers, 16 heads, MLP 4304, patch 14, no pooling head), a linear projector
1152 -> d_model, and the decoder
- Gemma 2B (PaliGemma): d_model 2048, 18 layers, 8 heads, 1 KV head, head_dim 256, MLP 16384;
- Gemma 2 2B (PaliGemma 2): d_model 2304, 26 layers, 8 heads, 4 KV heads, head_dim 256, MLP 9216,
  query_pre_attn_scalar 256, sliding window 4096, attention soft-cap 50, final-logit soft-cap 30.
Both use the embedding table of 257216 rows (the 257153 tokens padded to a multiple of 64),
tied to the lm_head, and `<image>` = 257152.

The tokenizer is the tiny model's BPE (`pg_finetune.tiny.build_tokenizer`) padded with
`<unusedN>` filler pieces to Gemma's 256000 ids, then PaliGemma's `<loc0000>`..`<loc1023>`
(256000..257023), `<seg000>`..`<seg127>` (257024..257151) and `<image>` (257152): the published
id layout, so token ids, vocabulary-sized tensors and generation match the real model. Texts
tokenize into more pieces than with Gemma's real SentencePiece model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

GEMMA_VOCAB = 256000  # Gemma's SentencePiece vocabulary
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 257152  # = GEMMA_VOCAB + 1024 + 128
EMBEDDING_ROWS = 257216  # config.json vocab_size: 257153 tokens padded to a multiple of 64
COMPLETE = "COMPLETE"  # marker file, written after everything else

SIGLIP_SO400M_14 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
GEMMA_2B = dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0)
GEMMA2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                 max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                 query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0)

# name -> (decoder family, image size); image tokens = (size / 14) ** 2 = 256 / 1024 / 4096
CONFIGS = {
    "paligemma-3b-pt-224": ("gemma", 224),
    "paligemma-3b-pt-448": ("gemma", 448),
    "paligemma2-3b-pt-224": ("gemma2", 224),
    "paligemma2-3b-pt-448": ("gemma2", 448),
    "paligemma2-3b-pt-896": ("gemma2", 896),
}


def _config_name(name: str) -> tuple[str, int]:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; valid: {', '.join(CONFIGS)}") from None


def build_config(name: str):
    """The `PaliGemmaConfig` of `name` (a key of CONFIGS), with the published dimensions."""
    from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

    family, image_size = _config_name(name)
    text_cls, text = (GemmaConfig, GEMMA_2B) if family == "gemma" else (Gemma2Config, GEMMA2_2B)
    width = text["hidden_size"]
    num_image_tokens = (image_size // 14) ** 2
    vision = SiglipVisionConfig(**SIGLIP_SO400M_14, image_size=image_size, projection_dim=width)
    text_config = text_cls(**text, vocab_size=EMBEDDING_ROWS, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config = PaliGemmaConfig(vision_config=vision, text_config=text_config, image_token_index=IMAGE_TOKEN_ID,
                             vocab_size=EMBEDDING_ROWS, projection_dim=width, hidden_size=width)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 2, 1
    config.text_config.num_image_tokens = config.vision_config.num_image_tokens = num_image_tokens
    return config


def build_tokenizer():
    """A Gemma-layout tokenizer with the published PaliGemma ids (see the module docstring)."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    from pg_finetune.tiny import _merges_of
    from pg_finetune.tiny import build_tokenizer as tiny_tokenizer

    small = tiny_tokenizer()
    vocab = dict(small.get_vocab())
    filler = 0
    while len(vocab) < GEMMA_VOCAB:  # Gemma's ids 7..105 are <unused0>..<unused98> too
        vocab.setdefault(f"<unused{filler}>", len(vocab))
        filler += 1
    tokenizer = GemmaTokenizer(vocab=vocab, merges=_merges_of(small._tokenizer))
    tokenizer.add_tokens(LOC_TOKENS + SEG_TOKENS)  # ordinary tokens in Gemma's vocab, ids 256000..257151
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(IMAGE_TOKEN, normalized=False,
                                                                            special=True)]})
    tokenizer.padding_side = "right"
    return tokenizer


def build_processor(name: str):
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    _, image_size = _config_name(name)
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_seq_length=(image_size // 14) ** 2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,  # bicubic, as the published preprocessor_config.json
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer())
    ids = processor.tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, "<loc0000>", "<seg127>"])
    if ids != [IMAGE_TOKEN_ID, GEMMA_VOCAB, IMAGE_TOKEN_ID - 1]:
        raise RuntimeError(f"tokenizer layout differs from PaliGemma's: <image>, <loc0000>, <seg127> -> {ids}")
    return processor


def default_dir(name: str) -> Path:
    root = Path(os.environ.get("PG_FINETUNE_CACHE", Path.home() / ".cache" / "pg_finetune"))
    return root / "real_size" / name


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def save_real_size(name: str, out: str | Path | None = None, seed: int = 0) -> Path:
    """Write `name` with random bf16 weights to `out` (default: the cache dir) unless already complete."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    out = Path(out) if out is not None else default_dir(name)
    if is_complete(out):
        return out
    config = build_config(name)
    processor = build_processor(name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # draw the weights in bf16: no 12 GB fp32 copy
    try:
        model = PaliGemmaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    for key, value in (("pad_token_id", 0), ("bos_token_id", 2), ("eos_token_id", 1)):
        setattr(model.generation_config, key, value)
    model.save_pretrained(tmp)
    del model
    processor.save_pretrained(tmp)
    (tmp / COMPLETE).write_text(f"{name} seed={seed} written in {time.perf_counter() - start:.0f} s\n")
    shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier attempt
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pg_finetune.real_size", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), help="which published configuration to build")
    parser.add_argument("--out", default=None, help="directory to write (default: the cache dir, see above)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--list", action="store_true", help="list the configs and their parameter counts")
    args = parser.parse_args(argv)
    if args.list:
        for name in CONFIGS:
            print(name, "->", default_dir(name), "(complete)" if is_complete(default_dir(name)) else "")
        return
    if not args.config:
        parser.error("--config is required (or --list)")
    target = Path(args.out) if args.out else default_dir(args.config)
    if is_complete(target):
        print(f"{target} is already complete ({(target / COMPLETE).read_text().strip()})")
        return
    print(f"writing random-weight {args.config} (bf16, ~6 GB) to {target} ...", flush=True)
    out = save_real_size(args.config, target, seed=args.seed)
    print(f"wrote {out}: {(out / COMPLETE).read_text().strip()}")


if __name__ == "__main__":
    main()
