"""Open any image a dataset may hold and return it as a fully loaded 8-bit RGB PIL image.

Sources: a path (str / Path), raw bytes, the `{"bytes": ..., "path": ...}` dict that a Hugging
Face `datasets.Image(decode=False)` column yields, or a PIL image. Modes that a plain
`img.convert("RGB")` gets wrong are handled on purpose:

- transparency (RGBA, LA, PA, P with a transparent index, a tRNS colour key) is composited on
  white, because `convert("RGB")` drops alpha and leaves whatever colour the hidden pixels held
  (often black);
- 16-bit grayscale ("I;16*", and "I" holding 16-bit values) is divided by 257 so 65535 -> 255,
  where `convert` clips everything above 255 to white;
- 32-bit int and float images are scaled from their value range, not clipped.

Pixels are loaded here (`img.load()`), so a truncated or corrupt file fails at this call with a
`BadRecordError` that names the record and the file, not later inside a collator.
EXIF orientation is applied, as `datasets.Image` does when it decodes, so both paths agree.
"""

from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SKIP_HINT = "fix or remove the record, or set data.skip_bad_records: true"

# PIL refuses images above ~179M pixels (DecompressionBombError) to guard servers against
# hostile uploads. Training data is ours, and scans or aerial tiles can be that big, so we
# allow up to 16k x 16k and refuse only beyond that, with our own message.
MAX_PIXELS = 16384 * 16384
_PIL_LIMIT_LOCK = threading.Lock()


class BadRecordError(ValueError):
    """A record that cannot be used: names where it is, which field, and what is wrong.

    `reason` is a short kind ("image cannot be decoded", "missing suffix") used as the key of
    `RecordDataset.skipped`; `problems` lists every `(where, field, problem)` when one error
    reports several records.
    """

    def __init__(
        self,
        where: str,
        field: str,
        problem: str,
        *,
        reason: str | None = None,
        problems: list[tuple[str, str, str]] | None = None,
    ):
        self.where = where
        self.field = field
        self.problem = problem
        self.reason = reason or problem  # short, for counting skipped records by kind
        self.problems = problems if problems is not None else [(where, field, problem)]
        if len(self.problems) == 1:
            message = f"{where}: {problem}; {SKIP_HINT}" if where else f"{problem}"
        else:
            lines = [f"  {w}: {p}" for w, _, p in self.problems[:20]]
            if len(self.problems) > 20:
                lines.append(f"  ... and {len(self.problems) - 20} more")
            message = f"{len(self.problems)} bad records ({SKIP_HINT}):\n" + "\n".join(lines)
        super().__init__(message)


@contextmanager
def _allow_large_images():
    # MAX_IMAGE_PIXELS is a module global that Image.open reads; change it only for the
    # duration of the header parse, under a lock so concurrent threads restore it correctly.
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def describe_image_source(src: Any) -> str:
    """A short human description of an image source for error messages."""
    if isinstance(src, str | os.PathLike):
        return f"image {os.fspath(src)!r}"
    if isinstance(src, dict):
        if src.get("path") and src.get("bytes") is None:
            return f"image {src['path']!r}"
        if src.get("path"):
            return f"image {src['path']!r} (embedded bytes)"
        return f"image ({len(src['bytes'] or b'')} embedded bytes)"
    if isinstance(src, bytes | bytearray | memoryview):
        return f"image ({len(src)} bytes)"
    return "image"


def _decode_reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "cannot identify image file"
    text = str(err).split(" <_io.")[0].strip()
    return text or type(err).__name__


def _open_raw(src: Any, where: str) -> Image.Image:
    """Image.open the source (header only); path/bytes/dict handled here."""
    if isinstance(src, dict):
        if src.get("bytes") is not None:
            src = src["bytes"]
        elif src.get("path"):
            src = src["path"]
        else:
            raise BadRecordError(
                where, "image", "image is empty (neither bytes nor path)", reason="missing image"
            )
    if isinstance(src, bytes | bytearray | memoryview):
        fp: Any = io.BytesIO(bytes(src))
    elif isinstance(src, str | os.PathLike):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise BadRecordError(
                where, "image", f"image file not found: {path}", reason="image file not found"
            )
        fp = path
    else:
        raise BadRecordError(
            where,
            "image",
            f"image has unsupported type {type(src).__name__}",
            reason="unsupported image type",
        )
    with _allow_large_images():
        return Image.open(fp)


def open_image(src: Any, where: str = "") -> Image.Image:
    """Open `src` and return a fully loaded RGB image; raise BadRecordError naming `where` if it cannot."""
    what = describe_image_source(src)
    try:
        if isinstance(src, Image.Image):
            img = src
        else:
            img = _open_raw(src, where)
            if img.width * img.height > MAX_PIXELS:
                raise BadRecordError(
                    where,
                    "image",
                    f"{what} is {img.width} x {img.height} pixels, more than the {MAX_PIXELS} "
                    "(16384 x 16384) we decode; downscale it",
                    reason="image too large",
                )
        img.load()
        if img is src:  # the caller's image: leave it as it is
            img = ImageOps.exif_transpose(img)
        else:  # ours, just decoded: turn it upright without exif_transpose's copy of every image
            ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)
    except BadRecordError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        # PIL reports truncated/corrupt data as OSError, broken headers as SyntaxError/ValueError.
        raise BadRecordError(
            where,
            "image",
            f"{what} cannot be decoded ({_decode_reason(err)})",
            reason="image cannot be decoded",
        ) from err


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _scale_to_uint8(values: np.ndarray, *, sixteen_bit: bool) -> np.ndarray:
    """Map a single-channel integer/float array to 0..255 without clipping away its range."""
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    if sixteen_bit or (lo >= 0 and hi <= 65535 and hi > 255):
        # 16-bit data: 65535 / 257 == 255 exactly, so the full range maps onto 0..255.
        scaled = values / 257.0
    elif lo >= 0 and hi <= 1.0:
        scaled = values * 255.0  # float images in [0, 1]
    elif lo >= 0 and hi <= 255:
        scaled = values
    elif hi > lo:
        scaled = (values - lo) / (hi - lo) * 255.0
    else:
        scaled = np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit RGB (see the module docstring)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(img)
        gray = _scale_to_uint8(values, sixteen_bit=mode.startswith("I;16"))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _composite_on_white(img.convert("RGBA"))
    # L, 1, P, CMYK, YCbCr, LAB, HSV, ...: PIL's own conversion is right for these.
    return img.convert("RGB")


def image_path(src: Any) -> str | None:
    """The file path behind a path-like or `{"path": ...}` source, if any (for cheap existence checks)."""
    if isinstance(src, str | os.PathLike):
        return os.fspath(src)
    if isinstance(src, dict) and src.get("bytes") is None and src.get("path"):
        return str(src["path"])
    return None


__all__ = ["MAX_PIXELS", "BadRecordError", "describe_image_source", "image_path", "open_image", "to_rgb"]
