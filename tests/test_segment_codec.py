"""The mask codec (tasks/segment/codec.py) against a plain-numpy transcription of big_vision's ops.

The reference below is written from big_vision's TF encoder (`pp/proj/paligemma/segmentation.py`:
`tf.nn.conv2d(padding="SAME")` on kernels `transpose(w, (2, 3, 1, 0))`) and flax decoder
(`evaluators/proj/paligemma/transfers/segmentation.py`: `nn.Conv(padding=1|0)`,
`nn.ConvTranspose(kernel 4, strides 2, padding=2, transpose_kernel=True)`), in NHWC, float64,
on random weights. Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pg_finetune.tasks.segment.codec import CodecShape, MaskCodec

# ---- numpy reference ------------------------------------------------------------------------------------


def _conv(x, kernel_hwio, bias, stride, pads):
    """Correlation of NHWC `x` with an HWIO kernel; pads = ((top, bottom), (left, right))."""
    x = np.pad(x, ((0, 0), *pads, (0, 0)))
    kh, kw = kernel_hwio.shape[:2]
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, kernel_hwio.shape[3]))
    for a in range(kh):
        for b in range(kw):
            patch = x[:, a : a + stride * (oh - 1) + 1 : stride, b : b + stride * (ow - 1) + 1 : stride]
            out += patch @ kernel_hwio[a, b]
    return out + bias


def _same_pads(size, k, s):
    """TensorFlow's SAME: output ceil(size / s), the odd padding pixel after."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return (total // 2, total - total // 2)


def _tf_conv_same(ckpt, x, name, stride):
    kernel = np.transpose(ckpt[name + ".weight"], (2, 3, 1, 0))  # as big_vision's _conv_tf
    pads = (_same_pads(x.shape[1], kernel.shape[0], stride), _same_pads(x.shape[2], kernel.shape[1], stride))
    return _conv(x, kernel, ckpt[name + ".bias"], stride, pads)


def _relu(x):
    return np.maximum(x, 0)


def _tf_resblock(ckpt, x, name):
    y = _relu(_tf_conv_same(ckpt, x, name + ".0", 1))
    y = _relu(_tf_conv_same(ckpt, y, name + ".2", 1))
    return _tf_conv_same(ckpt, y, name + ".4", 1) + x


def ref_encode(ckpt, masks):
    x = 2.0 * (masks[..., None].astype(np.float64) - 0.5)
    for n in range(4):
        x = _relu(_tf_conv_same(ckpt, x, f"encoder.{2 * n}", 2))
    for n in range(2):
        x = _tf_resblock(ckpt, x, f"encoder.{8 + n}.net")
    x = _tf_conv_same(ckpt, x, "encoder.10", 1)
    emb = ckpt["_vq_vae._embedding"].astype(np.float64)
    flat = x.reshape(-1, emb.shape[1])
    d = (flat**2).sum(1, keepdims=True) + (emb**2).sum(1) - 2 * flat @ emb.T
    return d.argmin(1).reshape(-1, 16)


def _flax_conv(ckpt, x, name, pad):
    kernel = np.transpose(ckpt[name + ".weight"], (2, 3, 1, 0))
    return _conv(x, kernel, ckpt[name + ".bias"], 1, ((pad, pad), (pad, pad)))


def _flax_conv_transpose(ckpt, x, name):
    """lax.conv_transpose(strides 2, padding ((2, 2), (2, 2)), transpose_kernel=True): dilate the input,
    pad, correlate with the kernel flipped in space and with its in/out axes swapped."""
    kernel = np.transpose(ckpt[name + ".weight"], (2, 3, 1, 0))  # (kh, kw, out, in), as flax stores it
    kernel = np.swapaxes(kernel, 2, 3)[::-1, ::-1]
    n, h, w, c = x.shape
    dilated = np.zeros((n, 2 * h - 1, 2 * w - 1, c))
    dilated[:, ::2, ::2] = x
    return _conv(dilated, kernel, ckpt[name + ".bias"], 1, ((2, 2), (2, 2)))


def _flax_resblock(ckpt, x, name):
    y = _relu(_flax_conv(ckpt, x, name + ".0", 1))
    y = _relu(_flax_conv(ckpt, y, name + ".2", 1))
    return _flax_conv(ckpt, y, name + ".4", 0) + x


def ref_decode(ckpt, codes):
    emb = ckpt["_vq_vae._embedding"].astype(np.float64)
    x = emb[codes.reshape(-1)].reshape(codes.shape[0], 4, 4, emb.shape[1])
    x = _relu(_flax_conv(ckpt, x, "decoder.0", 0))
    x = _flax_resblock(ckpt, x, "decoder.2.net")
    x = _flax_resblock(ckpt, x, "decoder.3.net")
    for name in ("decoder.4", "decoder.6", "decoder.8", "decoder.10"):
        x = _relu(_flax_conv_transpose(ckpt, x, name))
    return _flax_conv(ckpt, x, "decoder.12", 0)[..., 0]


# ---- helpers ---------------------------------------------------------------------------------------------

VAE_OID_KEYS = (
    [f"encoder.{i}.{p}" for i in (0, 2, 4, 6, 10) for p in ("weight", "bias")]
    + [f"{part}.{b}.net.{i}.{p}" for part, bs in (("encoder", (8, 9)), ("decoder", (2, 3)))
       for b in bs for i in (0, 2, 4) for p in ("weight", "bias")]
    + [f"decoder.{i}.{p}" for i in (0, 4, 6, 8, 10, 12) for p in ("weight", "bias")]
    + ["_vq_vae._embedding"]
)  # fmt: skip


def _random_checkpoint(shape: CodecShape, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    arrays = MaskCodec(shape).to_arrays()
    rng = np.random.default_rng(seed)
    # Larger biases and a spread codebook than torch's init, so every layer matters and codes differ.
    for k, v in arrays.items():
        if k.endswith(".bias"):
            arrays[k] = rng.normal(0, 0.1, v.shape).astype(np.float32)
    arrays["_vq_vae._embedding"] = rng.normal(0, 0.3, arrays["_vq_vae._embedding"].shape).astype(np.float32)
    return arrays


def _masks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    out = []
    for _ in range(n):
        cy, cx, ry, rx = rng.uniform(10, 54), rng.uniform(10, 54), rng.uniform(5, 30), rng.uniform(5, 30)
        ellipse = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        out.append(np.clip(ellipse + rng.uniform(0, 0.3, (64, 64)), 0, 1))  # soft edges, as resized masks are
    return np.stack(out).astype(np.float32)


# ---- tests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        CodecShape(),  # big_vision's widths
        CodecShape(channels=(4, 8, 8, 16), encoder_kernels=(3, 4, 5, 2), embedding_dim=8, codebook_size=32),
    ],
    ids=["vae-oid-widths", "narrow-odd-kernels"],
)
def test_encoder_codes_equal_the_numpy_transcription_of_big_vision(shape):
    ckpt = _random_checkpoint(shape, seed=0)
    # Codebook entries near real encoder outputs (of other masks), so the masks use many codes.
    with torch.no_grad():
        z = (
            MaskCodec.from_arrays(ckpt)
            .encode_continuous(torch.from_numpy(_masks(8, seed=9)))
            .reshape(-1, shape.embedding_dim)
        )
    rng = np.random.default_rng(0)
    picked = z.numpy()[rng.integers(0, len(z), shape.codebook_size)]
    # Noise keeps the entries distinct: equal entries would tie, and a tie may break either way in float.
    ckpt["_vq_vae._embedding"] = (picked + rng.normal(0, 0.05 * picked.std(), picked.shape)).astype(
        np.float32
    )
    codec = MaskCodec.from_arrays(ckpt)
    masks = _masks(6, seed=1)
    codes = codec.encode(masks)
    assert codes.shape == (6, 16) and codes.dtype == np.int64
    np.testing.assert_array_equal(codes, ref_encode(ckpt, masks))
    assert len(np.unique(codes)) > 8  # the comparison is not trivially all one code


@pytest.mark.parametrize(
    "shape", [CodecShape(), CodecShape(channels=(4, 8, 8, 16), embedding_dim=8, codebook_size=32)],
    ids=["vae-oid-widths", "narrow"],
)  # fmt: skip
def test_decoder_logits_match_the_numpy_transcription_of_big_vision(shape):
    ckpt = _random_checkpoint(shape, seed=2)
    codec = MaskCodec.from_arrays(ckpt)
    codes = np.random.default_rng(3).integers(0, shape.codebook_size, (5, 16))
    logits = codec.decode(codes)
    expected = ref_decode(ckpt, codes)
    assert logits.shape == (5, 64, 64) and logits.dtype == np.float32
    assert np.abs(expected).max() > 1e-2  # not a comparison of zeros
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-4)


def test_npz_round_trip_uses_the_vae_oid_key_layout(tmp_path):
    ckpt = _random_checkpoint(CodecShape(), seed=4)
    assert sorted(ckpt) == sorted(VAE_OID_KEYS)
    assert ckpt["_vq_vae._embedding"].shape == (128, 64)
    assert ckpt["decoder.4.weight"].shape == (128, 128, 4, 4)  # transposed conv: PyTorch (in, out, kh, kw)
    assert ckpt["decoder.10.weight"].shape == (32, 16, 4, 4)
    path = tmp_path / "codec.npz"
    MaskCodec.from_arrays(ckpt).to_npz(path)
    with np.load(path) as npz:
        assert sorted(npz.files) == sorted(VAE_OID_KEYS)
        for k in VAE_OID_KEYS:
            np.testing.assert_array_equal(npz[k], ckpt[k])
    codes = np.arange(32).reshape(2, 16) % 128
    np.testing.assert_array_equal(
        MaskCodec.from_npz(path).decode(codes), MaskCodec.from_arrays(ckpt).decode(codes)
    )


def test_a_file_that_is_not_a_codec_is_refused_naming_the_key(tmp_path):
    ckpt = _random_checkpoint(CodecShape(), seed=5)
    bad = dict(ckpt)
    bad["decoder.12.weight"] = np.zeros((1, 32, 1, 1), np.float32)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match=r"decoder\.12\.weight: shape \(1, 32, 1, 1\)"):
        MaskCodec.from_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a mask codec"):
        MaskCodec.from_npz(tmp_path / "other.npz")


def test_encode_and_decode_check_their_inputs():
    codec = MaskCodec(CodecShape(channels=(4, 8, 8, 16), embedding_dim=8, codebook_size=32))
    assert codec.encode(np.zeros((64, 64))).shape == (1, 16)
    with pytest.raises(ValueError, match="64"):
        codec.encode(np.zeros((2, 32, 32)))
    with pytest.raises(ValueError, match="0..31"):
        codec.decode(np.full((1, 16), 32))
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        codec.decode(np.zeros((1, 15), int))
