"""Train a small mask codec offline on generated shapes, in big_vision's vae-oid.npz layout.

    python -m pg_finetune.tasks.segment.train_codec --out mask_codec_tiny.npz      # 1-2 minutes on one CPU core
    python -m pg_finetune.tasks.segment.train_codec --steps 300 --out /tmp/c.npz --quiet

Without --out it writes the default cache file (`$PG_FINETUNE_CACHE` or `~/.cache/pg_finetune`,
`mask_codec_tiny.npz`) unless one is there. Seeded: the same flags give the same file. The codec
has PaliGemma's 128 codes and 16 tokens a mask, narrower layers than vae-oid (`TINY_SHAPE`), and
is for tests and offline demos only: a model trained on its tokens reads only its tokens. To score
a real PaliGemma segmentation model, use big_vision's `vae-oid.npz` (`PG_FINETUNE_MASK_CODEC`).

Training: a VQ-VAE with a straight-through estimator, mean squared error against the mask in
[-1, 1] (the decoder's range; a pixel is in the mask where the output is > 0), codebook and
commitment losses, the codebook started from encoder outputs and unused codes restarted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from pg_finetune.tasks.segment.codec import CodecShape, MaskCodec

TINY_SHAPE = CodecShape(
    channels=(8, 16, 32, 64), encoder_kernels=(4, 4, 4, 4), embedding_dim=32, codebook_size=128
)
TINY_FILE = "mask_codec_tiny.npz"


def cache_dir() -> Path:
    return Path(os.environ.get("PG_FINETUNE_CACHE", Path.home() / ".cache" / "pg_finetune"))


def train_codec(
    steps: int = 500, seed: int = 0, batch_size: int = 32, num_masks: int = 2000, lr: float = 2e-3,
    shape: CodecShape = TINY_SHAPE, log_every: int = 0, threads: int = 1,
) -> MaskCodec:  # fmt: skip
    """A codec trained `steps` steps on `num_masks` generated shape masks (CPU, seeded).

    One thread by default: these convolutions are too small to gain from more, and on a shared
    machine extra threads made a step ten times slower. 300 steps reach about 0.89 mean IoU.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(steps, seed, batch_size, num_masks, lr, shape, log_every)
    finally:
        torch.set_num_threads(previous)


def _train(steps: int, seed: int, batch_size: int, num_masks: int, lr: float, shape: CodecShape,
           log_every: int) -> MaskCodec:  # fmt: skip
    import torch
    import torch.nn.functional as F

    from pg_finetune.tasks.segment.shapes import shape_masks64

    torch.manual_seed(seed)
    masks = torch.from_numpy(shape_masks64(num_masks, seed))
    rng = np.random.default_rng(seed + 1)
    codec = MaskCodec(shape)
    optimizer = torch.optim.Adam(codec.parameters(), lr=lr)
    used = torch.zeros(shape.codebook_size, dtype=torch.bool)
    for step in range(steps):
        batch = masks[torch.from_numpy(rng.integers(0, num_masks, batch_size))]
        z = codec.encode_continuous(batch)  # (B, 16, D)
        flat = z.reshape(-1, z.shape[-1])
        if step == 0 or (step % 50 == 0 and not used.all()):
            # Unused codes (all of them at first) restart at encoder outputs, so none stays dead.
            with torch.no_grad():
                dead = torch.arange(shape.codebook_size) if step == 0 else (~used).nonzero()[:, 0]
                picks = torch.from_numpy(rng.integers(0, len(flat), len(dead)))
                codec.codebook[dead] = flat[picks].detach() + 1e-3 * torch.randn(len(dead), flat.shape[1])
            used[:] = False
        codes = codec.nearest_codes(z)
        used[codes.unique()] = True
        zq = codec.codebook[codes]
        logits = codec.decode_vectors(z + (zq - z).detach())  # straight-through
        target = 2 * batch - 1
        loss = F.mse_loss(logits, target) + F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            with torch.no_grad():
                pred, truth = logits > 0, batch > 0.5
                iou = ((pred & truth).sum((1, 2)) / (pred | truth).sum((1, 2)).clamp(min=1)).mean()
            print(f"step {step:4d}  loss {loss.item():.4f}  batch IoU {iou.item():.3f}  codes used "
                  f"{int(used.sum())}", file=sys.stderr)  # fmt: skip
    return codec.eval()


def tiny_codec_path(steps: int = 500, seed: int = 0) -> Path:
    """The default tiny codec file, trained once and written atomically (a racing process finds it whole)."""
    path = cache_dir() / TINY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        train_codec(steps=steps, seed=seed).to_npz(tmp)
        os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pg_finetune.tasks.segment.train_codec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--out", help=f"where to write the .npz (default: {cache_dir() / TINY_FILE}, if absent)"
    )
    parser.add_argument("--steps", type=int, default=500, help="training steps (default: 500)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the shapes and the weights (default: 0)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="masks a step (default: 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.threads) < 1:
        parser.error("--steps, --batch-size and --threads must be at least 1")
    if args.out is None and (cache_dir() / TINY_FILE).exists():
        print(f"{cache_dir() / TINY_FILE} exists; nothing to do (give --out to write another)")
        return 0
    out = Path(args.out) if args.out else cache_dir() / TINY_FILE
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: --out {out}: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    codec = train_codec(steps=args.steps, seed=args.seed, batch_size=args.batch_size, threads=args.threads,
                        log_every=0 if args.quiet else 50)  # fmt: skip
    codec.to_npz(out)
    print(f"wrote {out} ({args.steps} steps, {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
