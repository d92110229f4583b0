"""PaliGemma's mask codec: a VQ-VAE that writes a 64x64 mask as 16 codes of a 128-entry codebook.

    codec = MaskCodec.from_npz("vae-oid.npz")      # the published weights (big_vision `vae-oid.npz`)
    codes = codec.encode(masks64)                   # (N, 64, 64) in [0, 1] -> (N, 16) ints in 0..127
    logits = codec.decode(codes)                    # (N, 16) -> (N, 64, 64), about [-1, 1]; mask = logits > 0

Our own torch transcription of the model big_vision reads (`pp/proj/paligemma/segmentation.py`,
`encode_to_codebook_indices`; `evaluators/proj/paligemma/transfers/segmentation.py`,
`get_reconstruct_masks`), with the same layers, keys and arithmetic:

- encoder: input `2 * (mask - 0.5)`; four stride-2 convs with TF "SAME" padding, each + ReLU
  (64 -> 32 -> 16 -> 8 -> 4); two residual blocks (3x3, ReLU, 3x3, ReLU, 1x1, + input); a stride-1
  SAME conv to the codebook width; each of the 4 x 4 vectors (row-major) -> its nearest code
  (squared distance, first index on ties).
- decoder: codes -> codebook vectors (4 x 4); 1x1 conv + ReLU; two residual blocks; four 4x4
  stride-2 transposed convs (flax `ConvTranspose(padding=2, transpose_kernel=True)`, which is
  torch's `ConvTranspose2d(padding=1)`), each + ReLU; a 1x1 conv to one channel.

The .npz holds PyTorch-layout arrays (conv `(out, in, kh, kw)`, transposed conv `(in, out, kh, kw)`)
under the module names of the original PyTorch model: `encoder.{0,2,4,6,10}`, `encoder.{8,9}.net.{0,2,4}`,
`decoder.{0,4,6,8,10,12}`, `decoder.{2,3}.net.{0,2,4}` (`.weight`, `.bias`) and the codebook
`_vq_vae._embedding` (128 x 64). `from_npz` reads every width and encoder kernel size from the
arrays, so a narrower codec trained here (`train_codec`) uses the same layout and code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MASK_SIZE = 64  # codec input/output side
NUM_CODES = 16  # a 4 x 4 grid of codebook indices per mask
CODEBOOK_KEY = "_vq_vae._embedding"


@dataclass(frozen=True)
class CodecShape:
    """Widths of a mask codec. Defaults: big_vision's decoder (128 -> 128, 64, 32, 16) mirrored by the encoder.

    channels: outputs of the four strided encoder convs; the decoder's transposed convs output them
        in reverse order (its first 1x1 conv and residual blocks use the last).
    encoder_kernels: kernel side of each strided encoder conv (SAME padding whatever the size).
    embedding_dim, codebook_size: the codebook is `codebook_size x embedding_dim`.
    """

    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    encoder_kernels: tuple[int, int, int, int] = (4, 4, 4, 4)
    embedding_dim: int = 64
    codebook_size: int = 128


class SameConv2d(nn.Conv2d):
    """Conv with TensorFlow's "SAME" padding: output side ceil(n / stride), the odd pixel padded after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad wants (left, right, top, bottom)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride)


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(conv3x3(x))))); `net.{0,2,4}` as in the checkpoint."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            SameConv2d(channels, channels, 3),
            nn.ReLU(),
            SameConv2d(channels, channels, 3),
            nn.ReLU(),
            SameConv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class _Quantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self._embedding = nn.Parameter(torch.randn(codebook_size, dim) / dim**0.5)


class MaskCodec(nn.Module):
    """big_vision's mask VQ-VAE in torch; `state_dict()` keys are the .npz keys (`encoder.0.weight`, ...)."""

    def __init__(self, shape: CodecShape | None = None):
        super().__init__()
        self.shape = shape = shape or CodecShape()
        c1, c2, c3, c4 = shape.channels
        layers: list[nn.Module] = []
        for c_in, c_out, k in zip((1, c1, c2, c3), shape.channels, shape.encoder_kernels, strict=True):
            layers += [SameConv2d(c_in, c_out, k, stride=2), nn.ReLU()]
        layers += [ResBlock(c4), ResBlock(c4), SameConv2d(c4, shape.embedding_dim, 1)]
        self.encoder = nn.Sequential(*layers)
        up: list[nn.Module] = []
        for c_in, c_out in zip((c4, c4, c3, c2), (c4, c3, c2, c1), strict=True):
            up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        self.decoder = nn.Sequential(
            nn.Conv2d(shape.embedding_dim, c4, 1),
            nn.ReLU(),
            ResBlock(c4),
            ResBlock(c4),
            *up,
            nn.Conv2d(c1, 1, 1),
        )
        self._vq_vae = _Quantizer(shape.codebook_size, shape.embedding_dim)

    @property
    def codebook(self) -> torch.Tensor:
        return self._vq_vae._embedding

    # ---- the two halves ----------------------------------------------------------------------------

    def encode_continuous(self, masks64: torch.Tensor) -> torch.Tensor:
        """(N, 64, 64) masks in [0, 1] -> (N, 16, D) encoder outputs (4 x 4 grid, row-major)."""
        x = 2.0 * (masks64.to(self.codebook.dtype)[:, None] - 0.5)
        z = self.encoder(x)
        if z.shape[-2:] != (4, 4):
            raise ValueError(f"masks must be {MASK_SIZE}x{MASK_SIZE}, got {tuple(masks64.shape[-2:])}")
        return z.flatten(2).transpose(1, 2)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) vectors -> (...) index of the nearest codebook entry (|z|^2 + |e|^2 - 2 z.e, first minimum).

        Computed in float64 so a near-tie resolves the same way as a float64 reference would.
        """
        flat = z.reshape(-1, z.shape[-1]).double()
        codebook = self.codebook.double()
        distances = (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * flat @ codebook.T
        return distances.argmin(1).reshape(z.shape[:-1])

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, 16) ints -> (N, 64, 64) logits, differentiable in the weights."""
        vectors = self.codebook[codes]  # (N, 16, D)
        return self.decode_vectors(vectors)

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, 16, D) quantized vectors -> (N, 64, 64) logits."""
        n, _, d = vectors.shape
        grid = vectors.transpose(1, 2).reshape(n, d, 4, 4)
        return self.decoder(grid)[:, 0]

    # ---- numpy in, numpy out -----------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, masks64: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, 64, 64) or (64, 64) masks in [0, 1] -> (N, 16) int64 codes in 0..codebook_size-1."""
        x = torch.as_tensor(np.asarray(masks64, dtype=np.float32))
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or tuple(x.shape[1:]) != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"masks must be (N, {MASK_SIZE}, {MASK_SIZE}), got {tuple(x.shape)}")
        return self.nearest_codes(self.encode_continuous(x)).numpy()

    @torch.no_grad()
    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, 16) codes -> (N, 64, 64) float32 logits, about [-1, 1]; the mask is `logits > 0`."""
        idx = torch.as_tensor(np.asarray(codes, dtype=np.int64))
        if idx.ndim != 2 or idx.shape[1] != NUM_CODES:
            raise ValueError(f"codes must be (N, {NUM_CODES}), got {tuple(idx.shape)}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.shape.codebook_size):
            raise ValueError(f"codes must be in 0..{self.shape.codebook_size - 1}")
        return self.decode_codes(idx).float().numpy()

    # ---- files -------------------------------------------------------------------------------------

    @classmethod
    def from_npz(cls, path: str | Path) -> MaskCodec:
        """Load big_vision's `vae-oid.npz` (or one written by `to_npz`); widths come from the arrays."""
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls.from_arrays(arrays, where=str(path))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], where: str = "arrays") -> MaskCodec:
        try:
            shape = CodecShape(
                channels=tuple(int(arrays[f"encoder.{i}.weight"].shape[0]) for i in (0, 2, 4, 6)),
                encoder_kernels=tuple(int(arrays[f"encoder.{i}.weight"].shape[-1]) for i in (0, 2, 4, 6)),
                embedding_dim=int(arrays[CODEBOOK_KEY].shape[1]),
                codebook_size=int(arrays[CODEBOOK_KEY].shape[0]),
            )  # type: ignore[arg-type]
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"{where}: not a mask codec (.npz of vae-oid layout): missing or bad {err}"
            ) from None
        codec = cls(shape)
        expected = codec.state_dict()
        problems = [f"missing {k}" for k in expected if k not in arrays]
        problems += [f"unexpected {k}" for k in arrays if k not in expected]
        problems += [
            f"{k}: shape {tuple(arrays[k].shape)}, expected {tuple(v.shape)}"
            for k, v in expected.items()
            if k in arrays and tuple(arrays[k].shape) != tuple(v.shape)
        ]
        if problems:
            raise ValueError(f"{where}: not a mask codec of vae-oid layout: " + "; ".join(problems[:8]))
        codec.load_state_dict(
            {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
        )
        return codec.eval()

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().float().numpy() for k, v in self.state_dict().items()}

    def to_npz(self, path: str | Path) -> None:
        """Write the weights in the vae-oid.npz layout (PyTorch-layout float32 arrays, same keys)."""
        with open(path, "wb") as f:
            np.savez(f, **self.to_arrays())
