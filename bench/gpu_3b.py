"""Full-size PaliGemma-3B-224 / PaliGemma 2 3B-224 on one GPU: step time, samples/s, MFU, peak memory.

    python bench/gpu_3b.py                       # needs a CUDA GPU; without one it says so and exits 0
    python bench/gpu_3b.py --estimate            # no GPU: analytic parameter, FLOP and memory counts
    python bench/gpu_3b.py --plan --batch-sizes 1,4,8   # the GPU-memory planning table of docs/memory.md
    python bench/gpu_3b.py --models paligemma --methods lora,qlora --batch-sizes 4 --steps 5
    python bench/gpu_3b.py --cpu-smoke           # runs the GPU code path on the tiny configs, on CPU

The configs are built by hand with the published dimensions (random weights, no
download), then saved once to a temp dir and loaded through
`pg_finetune.model.load_model` + `pg_finetune.tuning.apply_tuning`, and trained
with `pg_finetune.speed.suffix_loss` and fused AdamW: the training path of
train.py. Per model x tuning method x gradient checkpointing x batch size it
reports median step time, samples/s, MFU and peak allocated GPU memory.

Dimensions (the checkpoints' config.json and the papers):
- SigLIP-So400m/14 at 224 px: width 1152, depth 27, MLP 4304, 16 heads, patch 14 -> 256 image tokens
  (Alabdulmohsin et al. 2023, "Getting ViT in Shape", arXiv:2305.13035; PaliGemma, arXiv:2407.07726).
- Gemma-2B (PaliGemma-3B): d_model 2048, 18 layers, 8 query heads, 1 KV head, head 256, GeGLU hidden
  16384 (Gemma report arXiv:2403.08295, Table 1: "feedforward hidden dims 32768" = gate + up).
- Gemma2-2B (PaliGemma 2 3B): d_model 2304, 26 layers, 8 query heads, 4 KV heads, head 256, GeGLU
  hidden 9216, attention soft-cap 50, final logit soft-cap 30, sliding window 4096 (Gemma 2 report
  arXiv:2408.00118, Table 1; PaliGemma 2 arXiv:2412.03555).
- vocabulary 257216 = Gemma's 256000 + 1024 <locNNNN> + 128 <segNNN> + padding to a multiple of 64;
  the projector is one linear layer 1152 -> d_model; lm_head is tied to the token embeddings.

FLOPs (`count_flops`) count multiply-adds x 2 of every matmul: the vision tower on 256 patches,
the projector, the decoder's projections and MLP on `seq_len` tokens, attention scores and
weighted sums over the full seq_len x seq_len square (the prefix is bidirectional), and the
lm_head on the positions that get logits. Training adds the backward pass part by part: input
gradients (= forward) wherever a gradient flows (decoder and lm_head; the frozen vision tower
and projector run forward only), weight gradients (= forward) for trained weights only, and 2 x
forward for the attention products. MFU divides those training FLOPs by step time and the
GPU's dense bf16 peak; recomputation under gradient checkpointing is not counted as useful work.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

GiB = 2**30
METHODS = ("full", "attention_only", "lora", "qlora")
# dense bf16 peak, TFLOP/s, from the vendors' data sheets (SXM parts; H100 PCIe is 756)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}

SIGLIP_SO400M_224 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         patch_size=14, image_size=224, vision_use_head=False)
GEMMA_2B = dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                num_key_value_heads=1, head_dim=256)
GEMMA2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
VOCAB = 257216
IMAGE_TOKEN_ID = 257152  # PaliGemma's <image>


def paligemma_config(name: str = "paligemma", image_size: int = 224) -> PaliGemmaConfig:
    """PaliGemma-3B ("paligemma") or PaliGemma 2 3B ("paligemma2") with the published dimensions.

    image_size 224 / 448 / 896 gives 256 / 1024 / 4096 image tokens (the -224/-448/-896 checkpoints).
    """
    text_cls, text = {"paligemma": (GemmaConfig, GEMMA_2B), "paligemma2": (Gemma2Config, GEMMA2_2B)}[name]
    width = text["hidden_size"]
    vision = SiglipVisionConfig(**{**SIGLIP_SO400M_224, "image_size": image_size}, projection_dim=width)
    text_config = text_cls(**text, vocab_size=VOCAB, max_position_embeddings=8192, pad_token_id=0, eos_token_id=1,
                           bos_token_id=2)
    config = PaliGemmaConfig(vision_config=vision, text_config=text_config, image_token_index=IMAGE_TOKEN_ID,
                             vocab_size=VOCAB, projection_dim=width, hidden_size=width)
    config.pad_token_id = 0
    return config


# ----------------------------------------------------------------------------------------------- counting
def _dims(config: PaliGemmaConfig) -> dict:
    v, t = config.vision_config, config.text_config
    return dict(
        dv=v.hidden_size, iv=v.intermediate_size, lv=v.num_hidden_layers, patch_in=v.num_channels * v.patch_size**2,
        patches=(v.image_size // v.patch_size) ** 2, proj=config.projection_dim,
        d=t.hidden_size, inter=t.intermediate_size, layers=t.num_hidden_layers,
        q=t.num_attention_heads * t.head_dim, kv=t.num_key_value_heads * t.head_dim, vocab=t.vocab_size,
        norms=4 if t.model_type == "gemma2" else 2,  # Gemma 2 adds pre/post-feedforward norms
    )


def count_params(config: PaliGemmaConfig) -> dict[str, int]:
    """Parameters by part; `total` counts the tied lm_head / embeddings once, as model.parameters() does."""
    if config.vision_config.vision_use_head:
        raise ValueError("count_params covers SigLIP without its pooling head (vision_use_head=False), as PaliGemma")
    x = _dims(config)
    dv, iv = x["dv"], x["iv"]
    vision_layer = 4 * (dv * dv + dv) + (dv * iv + iv) + (iv * dv + dv) + 2 * 2 * dv  # attn, fc1, fc2, 2 LayerNorms
    vision = x["patch_in"] * dv + dv + x["patches"] * dv + x["lv"] * vision_layer + 2 * dv  # patch conv, pos, post-LN
    projector = dv * x["proj"] + x["proj"]
    d = x["d"]
    attention = d * x["q"] + 2 * d * x["kv"] + x["q"] * d  # q, k, v, o (no biases)
    mlp = 3 * d * x["inter"]  # gate, up, down
    decoder_linear = x["layers"] * (attention + mlp)
    norms = x["layers"] * x["norms"] * d + d  # RMSNorm weights per layer + the final norm
    embeddings = x["vocab"] * d
    tied = config.text_config.tie_word_embeddings if hasattr(config.text_config, "tie_word_embeddings") else True
    lm_head = 0 if getattr(config, "tie_word_embeddings", tied) else embeddings
    parts = dict(vision=vision, projector=projector, embeddings=embeddings, decoder_attention=x["layers"] * attention,
                 decoder_mlp=x["layers"] * mlp, decoder_norms=norms, lm_head=lm_head)
    parts["decoder_linear"] = decoder_linear
    parts["total"] = vision + projector + embeddings + decoder_linear + norms + lm_head
    return parts


def _lora_shapes(config: PaliGemmaConfig) -> list[tuple[int, int]]:
    """(in, out) of every decoder projection LoRA adapts (the default `lora_target_modules`), in one layer:
    q, k, v, o, gate, up, down."""
    x = _dims(config)
    d = x["d"]
    return [(d, x["q"]), (d, x["kv"]), (d, x["kv"]), (x["q"], d), (d, x["inter"]), (d, x["inter"]), (x["inter"], d)]


def lora_params(config: PaliGemmaConfig, r: int = 8) -> int:
    """LoRA A and B matrices on every decoder projection (the default `lora_target_modules`)."""
    return _dims(config)["layers"] * sum(r * (n_in + n_out) for n_in, n_out in _lora_shapes(config))


def count_flops(
    config: PaliGemmaConfig,
    seq_len: int,
    batch: int,
    *,
    loss_positions: int | None = None,
    method: str = "full",
    train_vision: bool = False,
) -> dict[str, float]:
    """Forward and training FLOPs of one batch (2 FLOPs per multiply-add; matmuls only).

    seq_len: decoder tokens per example, the 256 image tokens included. loss_positions: positions
    per example that get logits (None: all seq_len, as `model(**batch).loss`; the suffix length
    with `suffix_loss`). method decides which weights get weight gradients; the vision tower and
    projector train only with train_vision. Returns per-part forward FLOPs, `forward`, `train`, and
    `train_per_token`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x = _dims(config)
    dv, P, S, d = x["dv"], x["patches"], seq_len, x["d"]
    macs = dict(
        patch_embedding=P * x["patch_in"] * dv,
        vision_linear=P * x["lv"] * (4 * dv * dv + 2 * dv * x["iv"]),
        vision_attention=x["lv"] * 2 * P * P * dv,  # Q K^T and A V over 256 x 256
        projector=P * dv * x["proj"],
        decoder_attention_linear=S * x["layers"] * (2 * d * x["q"] + 2 * d * x["kv"]),
        decoder_mlp=S * x["layers"] * 3 * d * x["inter"],
        decoder_attention=x["layers"] * 2 * S * S * x["q"],
        lm_head=(S if loss_positions is None else loss_positions) * x["vocab"] * d,
    )
    forward = {k: 2.0 * v * batch for k, v in macs.items()}
    weight_grads = {
        "full": ("decoder_attention_linear", "decoder_mlp", "lm_head"),  # lm_head is the tied embedding
        "attention_only": ("decoder_attention_linear",),
        "lora": (),  # adapters: r * (in + out) per projection, < 1% of the work at 3B; not counted
        "qlora": (),
    }[method] + (("patch_embedding", "vision_linear", "projector") if train_vision else ())
    backward = 0.0
    for part, flops in forward.items():
        in_graph = train_vision or not part.startswith(("patch", "vision", "projector"))
        if in_graph and part != "patch_embedding":  # no gradient for the pixels
            backward += 2 * flops if part.endswith("attention") else flops  # input gradients
        if part in weight_grads:
            backward += flops
    if method != "full" and not train_vision:
        # nothing before the first decoder layer trains: its q/k/v inputs need no gradient
        backward -= 2.0 * batch * S * (d * x["q"] + 2 * d * x["kv"])
    result = dict(forward)
    result["forward"] = sum(forward.values())
    result["train"] = result["forward"] + backward
    result["train_per_token"] = result["train"] / (batch * seq_len)
    return result


# ---------------------------------------------------------------------------------------- memory estimate
@dataclass
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    attention_scores: float = 0.0  # eager attention's saved S x S probabilities (0 for sdpa / flex)

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits + self.overhead
                + self.attention_scores)


def adapter_activations(
    config: PaliGemmaConfig, lora_r: int, *, lora_dropout: float = 0.0, autocast: bool = True, device: str = "cuda"
) -> int:
    """Bytes per token per decoder layer that LoRA on every decoder projection saves for backward."""
    shapes = _lora_shapes(config)
    inputs = sum(n_in for n_in, _ in shapes)  # each adapter casts and saves its own copy of its input
    copy = 2 if autocast else 4  # lora_A's input: bf16 cast by autocast, else peft's fp32 cast
    mask = (1 if device == "cuda" else 4) if lora_dropout > 0 else 0
    return (copy + mask) * inputs + copy * len(shapes) * lora_r  # + lora_A's output, saved by lora_B


def estimate_memory(
    config: PaliGemmaConfig,
    method: str,
    batch: int,
    seq_len: int,
    *,
    gradient_checkpointing: bool = False,
    loss_positions: int | None = None,
    lora_r: int = 8,
    lora_dropout: float = 0.0,
    autocast: bool = True,
    device: str = "cuda",
    attention: str | None = None,
    overhead: float = 1.0 * GiB,
) -> MemoryEstimate:
    """Bytes, rough: bf16 weights and activations (qlora: 4-bit decoder projections, the rest bf16:
    `tuning.prepare_for_kbit_training` does not upcast bf16 weights as peft's
    prepare_model_for_kbit_training does, which would add 4 bytes x ~0.93 B = +1.9 GB at 3B), AdamW
    with two states per trained weight (bf16 for full/attention_only, fp32 LoRA adapters), frozen
    vision tower (no saved activations).

    attention: "eager" saves every layer's heads x S x S probabilities for backward (Gemma 2's
    soft-cap tanh output bf16, the fp32 softmax and its bf16 copy: 8 bytes per score; Gemma: 6);
    "sdpa" and "flex_attention" save O(S). None = what load_model uses: sdpa for PaliGemma, eager
    for PaliGemma 2 (sdpa cannot soft-cap). overhead: CUDA context and allocator slack (GPU), or
    the Python/torch runtime (CPU RSS).

    LoRA/QLoRA adapters keep activations of their own (`adapter_activations`): peft casts each adapted
    projection's input to the fp32 adapters' dtype, and lora_A saves that input for its weight
    gradient, as a bf16 copy under bf16 autocast (`training.bf16`, `autocast=True`) or fp32 without;
    lora_B saves lora_A's r-wide output; `lora_dropout > 0` saves the dropout mask (a bool per element
    on CUDA's fused dropout, the input's fp32 on CPU). Counted from autograd's saved tensors on the
    tiny model (tests/test_bench_flops.py).
    """
    p = count_params(config)
    x = _dims(config)
    n_lora = lora_params(config, lora_r)
    if method == "full":
        trained = p["total"] - p["vision"] - p["projector"]
        weights, grads, optimizer = 2 * p["total"], 2 * trained, 4 * trained
    elif method == "attention_only":
        trained = p["decoder_attention"]
        weights, grads, optimizer = 2 * p["total"], 2 * trained, 4 * trained
    elif method == "lora":
        weights, grads, optimizer = 2 * p["total"] + 4 * n_lora, 4 * n_lora, 8 * n_lora
    elif method == "qlora":
        # nf4: 0.5 byte per weight + double-quantised absmax (1 byte per 64 weights + fp32 per 256 blocks)
        four_bit = p["decoder_linear"] * (0.5 + 1 / 64 + 4 / (64 * 256))
        weights = four_bit + 2 * (p["total"] - p["decoder_linear"]) + 4 * n_lora
        grads, optimizer = 4 * n_lora, 8 * n_lora
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    tokens = batch * seq_len
    d = x["d"]
    # bf16 elements saved per token per decoder layer: norm inputs/outputs (4d), q/k/v before and after
    # rotary (2(q + 2kv)), attention output (q), GeGLU gate, up, gelu(gate), product (4 inter).
    per_layer = 2 * (4 * d + 2 * (x["q"] + 2 * x["kv"]) + x["q"] + 4 * x["inter"])
    if method in ("lora", "qlora"):
        per_layer += adapter_activations(config, lora_r, lora_dropout=lora_dropout, autocast=autocast, device=device)
    if gradient_checkpointing:  # layer inputs kept, one layer's activations alive during its recompute
        activations = tokens * (x["layers"] * 2 * d + per_layer)
    else:
        activations = tokens * x["layers"] * per_layer
    positions = batch * (seq_len if loss_positions is None else loss_positions)
    logits = positions * x["vocab"] * (2 + 4 + 4)  # bf16 logits, fp32 upcast, fp32 gradient of log-softmax
    gemma2 = config.text_config.model_type == "gemma2"
    attention = attention or ("eager" if gemma2 else "sdpa")
    scores = 0.0
    if attention == "eager":
        per_layer_scores = batch * config.text_config.num_attention_heads * seq_len**2 * (8 if gemma2 else 6)
        scores = per_layer_scores * (1 if gradient_checkpointing else x["layers"])
    return MemoryEstimate(weights, grads, optimizer, activations, logits, overhead, scores)


def run_estimate(args) -> dict:
    rows = []
    print(f"suffix_loss: logits on {args.suffix_tokens} positions per example; sequence "
          f"{args.seq_len} tokens (256 image + prompt + suffix)\n")
    for name in args.models.split(","):
        config = paligemma_config(name)
        params = count_params(config)
        print(f"== {name}: {params['total'] / 1e9:.3f} B parameters "
              f"(vision {params['vision'] / 1e6:.0f} M, projector {params['projector'] / 1e6:.1f} M, "
              f"embeddings {params['embeddings'] / 1e6:.0f} M, decoder {params['decoder_linear'] / 1e6:.0f} M)")
        for loss_positions, label in ((None, "full logits"), (args.suffix_tokens, "suffix_loss")):
            f = count_flops(config, args.seq_len, 1, loss_positions=loss_positions)
            print(f"   forward per example ({label}): {f['forward'] / 1e12:.3f} TFLOP = "
                  + ", ".join(f"{k} {f[k] / 1e9:.0f}" for k in ("patch_embedding", "vision_linear", "vision_attention", "projector",
                              "decoder_attention_linear", "decoder_mlp", "decoder_attention", "lm_head"))
                  + " GFLOP")
        print(f"{'method':<16}{'batch':>6}{'ckpt':>6}{'weights':>9}{'grads':>7}{'optim':>7}{'activ':>7}"
              f"{'logits':>8}{'total GiB':>11}{'(full logits)':>15}{'train TFLOP':>13}")
        for method in METHODS:
            for batch in args.batch_sizes:
                for ckpt in (False, True):
                    m = estimate_memory(config, method, batch, args.seq_len, gradient_checkpointing=ckpt,
                                        loss_positions=args.suffix_tokens, lora_dropout=args.lora_dropout)
                    full = estimate_memory(config, method, batch, args.seq_len, gradient_checkpointing=ckpt,
                                           lora_dropout=args.lora_dropout)
                    flops = count_flops(config, args.seq_len, batch, loss_positions=args.suffix_tokens, method=method)
                    rows.append(dict(model=name, method=method, batch=batch, gradient_checkpointing=ckpt,
                                     total_gib=m.total / GiB, total_full_logits_gib=full.total / GiB,
                                     **{k: v / GiB for k, v in vars(m).items()}, train_tflop=flops["train"] / 1e12))
                    print(f"{method:<16}{batch:>6}{'on' if ckpt else 'off':>6}{m.weights / GiB:>9.2f}"
                          f"{m.grads / GiB:>7.2f}{m.optimizer / GiB:>7.2f}{m.activations / GiB:>7.2f}"
                          f"{m.logits / GiB:>8.2f}{m.total / GiB:>11.2f}{full.total / GiB:>15.2f}"
                          f"{flops['train'] / 1e12:>13.2f}")
        print()
    q = next(r for r in rows if r["model"] == "paligemma" and r["method"] == "qlora" and r["batch"] == 4
             and not r["gradient_checkpointing"]) if "paligemma" in args.models.split(",") and 4 in args.batch_sizes else None
    if q:
        verdict = "fits" if q["total_gib"] < 16 * 0.93 else "does not fit"  # ~7% of a card is not allocatable
        print(f"QLoRA on PaliGemma-3B-224 at batch 4 (no checkpointing, suffix_loss): ~{q['total_gib']:.1f} GiB "
              f"-> {verdict} a 16 GB GPU (with full logits: ~{q['total_full_logits_gib']:.1f} GiB)")
    return {"rows": rows, "qlora_3b_batch4_fits_16gb": None if not q else q["total_gib"] < 16 * 0.93}


def plan_table(args) -> list[str]:
    """Markdown rows: estimated peak GiB per model x method x resolution x batch, without / with checkpointing.

    PaliGemma 2 gets two rows per case: eager attention (what load_model falls back to) and
    flex_attention (model.attn_implementation: flex_attention, which keeps soft-capping and the
    prefix-LM mask without saving S x S scores).
    """
    lines = ["| model | method | px | image tokens | attention | batch | GiB, no ckpt | GiB, ckpt |",
             "|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        for size in (224, 448, 896):
            config = paligemma_config(name, size)
            seq = (size // 14) ** 2 + args.text_tokens
            for method in args.methods.split(","):
                for attention in (("eager", "flex_attention") if name == "paligemma2" else ("sdpa",)):
                    for batch in args.batch_sizes:
                        cells = [estimate_memory(config, method, batch, seq, gradient_checkpointing=ckpt,
                                                 loss_positions=args.suffix_tokens, attention=attention,
                                                 lora_dropout=args.lora_dropout).total / GiB
                                 for ckpt in (False, True)]
                        lines.append(f"| {name} | {method} | {size} | {(size // 14) ** 2} | {attention} | {batch} | "
                                     f"{cells[0]:.1f} | {cells[1]:.1f} |")
    return lines


# ------------------------------------------------------------------------------------------- measurement
def synthetic_batch(config: PaliGemmaConfig, batch: int, text_tokens: int, suffix_tokens: int, device, dtype):
    """PaliGemmaCollator's layout with random token ids: image tokens, <bos>, prompt, "\\n", suffix, <eos>."""
    x = _dims(config)
    g = torch.Generator().manual_seed(0)
    prompt = text_tokens - suffix_tokens
    image = torch.full((batch, x["patches"]), config.image_token_id)
    text = torch.randint(10, min(x["vocab"], IMAGE_TOKEN_ID) - 1, (batch, text_tokens), generator=g)
    text[:, 0] = 2  # <bos>
    text[:, -1] = 1  # <eos>
    input_ids = torch.cat([image, text], dim=1)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, x["patches"] + prompt :] = 1
    labels = torch.where(token_type_ids == 1, input_ids, torch.full_like(input_ids, -100))
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "token_type_ids": token_type_ids.to(device), "labels": labels.to(device),
            "pixel_values": pixel_values.to(device=device, dtype=dtype)}


def save_random(config: PaliGemmaConfig, out: Path, device: str, dtype: torch.dtype) -> Path:
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = PaliGemmaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out)
    del model
    return out


def measure(path: Path, config, method: str, batch: int, ckpt: bool, args, device: str, dtype_name: str) -> dict:
    from pg_finetune.model import load_model
    from pg_finetune.recipe import ModelConfig, TuningConfig
    from pg_finetune.speed import suffix_loss
    from pg_finetune.tuning import apply_tuning

    cuda = device == "cuda"
    tuning = TuningConfig(method=method,
                          bnb_4bit_compute_dtype="bfloat16" if cuda else "float32")
    model = load_model(ModelConfig(name_or_path=str(path), dtype=dtype_name), tuning)
    if method != "qlora":
        model = model.to(device)
    model = apply_tuning(model, tuning, gradient_checkpointing=ckpt).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    data = synthetic_batch(config, batch, args.text_tokens, args.suffix_tokens, device,
                           torch.bfloat16 if dtype_name == "bfloat16" else torch.float32)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = suffix_loss(model, data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    seq_len = data["input_ids"].shape[1]
    flops = count_flops(config, seq_len, batch, loss_positions=args.suffix_tokens, method=method)
    peak = args.peak_tflops * 1e12
    row = dict(method=method, batch=batch, gradient_checkpointing=ckpt, seq_len=seq_len, step_s=step_s,
               samples_per_s=batch / step_s, train_tflop=flops["train"] / 1e12,
               mfu=flops["train"] / step_s / peak if peak else None, loss=loss.item(),
               peak_gib=torch.cuda.max_memory_allocated() / GiB if cuda else None)
    del model, optimizer, params, data
    if cuda:
        torch.cuda.empty_cache()
    return row


def run_gpu(args, device: str) -> dict:
    results = {}
    for name in args.models.split(","):
        config = paligemma_config(name) if not args.cpu_smoke else _tiny_config(name)
        rows = []
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            path = save_random(config, Path(tmp) / name, device, dtype)
            for method in args.methods.split(","):
                for ckpt in (False, True):
                    for batch in args.batch_sizes:
                        try:
                            row = measure(path, config, method, batch, ckpt, args, device,
                                          "bfloat16" if device == "cuda" else "float32")
                        except torch.OutOfMemoryError:
                            row = dict(method=method, batch=batch, gradient_checkpointing=ckpt, error="out of memory")
                            torch.cuda.empty_cache()
                        rows.append(row)
                        _print_row(name, row)
        results[name] = rows
    return results


def _tiny_config(name: str) -> PaliGemmaConfig:
    from pg_finetune.tiny import build_config, build_processor

    return build_config(build_processor(), variant=name)


def _print_row(name: str, r: dict) -> None:
    head = f"{name:<11}{r['method']:<16}{'on' if r['gradient_checkpointing'] else 'off':>5}{r['batch']:>6}"
    if "error" in r:
        print(f"{head}  {r['error']}")
        return
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
    print(f"{head}{1000 * r['step_s']:>10.1f}{r['samples_per_s']:>10.2f}{mfu:>8}{peak:>10}")


def _peak_tflops(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimate", action="store_true", help="analytic counts only (no GPU needed)")
    parser.add_argument("--plan", action="store_true",
                        help="markdown table of estimated GiB per method x resolution x batch (docs/memory.md)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the measurement code path on tiny configs, CPU")
    parser.add_argument("--models", default="paligemma,paligemma2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-sizes", default="1,4,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--text-tokens", type=int, default=24, help="<bos> + prompt + \\n + suffix + <eos>")
    parser.add_argument("--suffix-tokens", type=int, default=10, help="label tokens per example (suffix + <eos>)")
    parser.add_argument("--lora-dropout", type=float, default=0.05,
                        help="estimate/plan: LoRA dropout (its mask is saved for backward); 0.05 as the 3B recipes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by GPU name)")
    parser.add_argument("--tmp", default=None, help="where the random checkpoints are written (~6 GB each)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    args.seq_len = 256 + args.text_tokens
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.machine(), torch=torch.__version__,
                seq_len=args.seq_len, suffix_tokens=args.suffix_tokens)

    if args.plan:
        print("\n".join(plan_table(args)))
        return 0
    if args.estimate:
        result = run_estimate(args)
        path = out / "gpu_3b_estimate.json"
        path.write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
        print(f"wrote {path}")
        return 0
    if args.cpu_smoke:
        args.batch_sizes, args.steps, args.warmup, args.peak_tflops = [1, 2], 1, 1, 0.0
        args.text_tokens, args.suffix_tokens = 12, 4
        args.seq_len = None
        run_gpu(args, "cpu")
        print("cpu smoke run: the measurement path works (figures are not GPU figures)")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured. Run `python bench/gpu_3b.py --estimate` for the analytic "
              "counts, or run this on a GPU machine.")
        return 0
    device_name = torch.cuda.get_device_name()
    args.peak_tflops = args.peak_tflops or _peak_tflops(device_name) or math.nan
    meta.update(device=device_name, peak_bf16_tflops=args.peak_tflops)
    print(f"{device_name}, dense bf16 peak {args.peak_tflops} TFLOP/s; sequence {args.seq_len} tokens\n")
    print(f"{'model':<11}{'method':<16}{'ckpt':>5}{'batch':>6}{'step ms':>10}{'samples/s':>10}{'MFU':>8}{'peak GiB':>10}")
    results = run_gpu(args, "cuda")
    path = out / "gpu_3b.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
