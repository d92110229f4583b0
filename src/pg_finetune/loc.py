"""PaliGemma location tokens: pixel boxes <-> `<locY1><locX1><locY2><locX2> label` strings.

Conventions fixed by the model (see big_vision `pp/proj/paligemma/segmentation.py` and
`evaluators/proj/paligemma/transfers/segmentation.py`):

- 1024 bins per axis, a coordinate v in an image of side `size` is binned as
  `round(v / size * 1023)` (halves to even, as `tf.round`) clipped to 0..1023 and decoded as
  `bin / 1023 * size`. A box must have y1 < y2 and x1 < x2 to be valid: big_vision's evaluator
  refuses a zero height or width.
  Multiplying by 1024 (as some community code does) can emit `<loc1024>`, which is
  not in the vocabulary.
- y comes before x inside a box; objects are joined with ` ; `; the prompt is `detect a ; b`.

    >>> format_detections([((0, 0, 640, 480), "cat")], 640, 480)
    '<loc0000><loc0000><loc1023><loc1023> cat'
    >>> parse_detections("<loc0000><loc0000><loc1023><loc1023> cat ; <loc12> dog", 640, 480).malformed
    1
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

NUM_BINS = 1024
_MAX_BIN = NUM_BINS - 1
OBJECT_SEPARATOR = " ; "
DETECT_PREFIX = "detect"

_LEADING_LOC = re.compile(r"\s*<loc([^>]*)>")


def _check_size(size: float) -> None:
    if not size > 0:
        raise ValueError(f"image size must be positive, got {size!r}")


def encode_value(v: float, size: float) -> int:
    """Bin a pixel coordinate: `round(v / size * 1023)`, clipped to 0..1023.

    Exact halves round to even, as big_vision's `tf.round` does in `refcoco_mask2str`
    (`pp/proj/paligemma/segmentation.py`): 511.5 -> 512, 510.5 -> 510. A coordinate equal
    to `size` gives 1023, never 1024.
    """
    _check_size(size)
    return min(max(round(v / size * _MAX_BIN), 0), _MAX_BIN)


def decode_value(b: int, size: float) -> float:
    """Pixel coordinate of bin `b`: `b / 1023 * size` (the bin is clipped to 0..1023 first)."""
    _check_size(size)
    return min(max(b, 0), _MAX_BIN) / _MAX_BIN * size


def loc_token(b: int) -> str:
    if not 0 <= b <= _MAX_BIN:
        raise ValueError(f"location bin {b} outside 0..{_MAX_BIN}")
    return f"<loc{b:04d}>"


def encode_box(box_xyxy: Sequence[float], width: float, height: float) -> str:
    """Pixel (x1, y1, x2, y2) -> `<locY1><locX1><locY2><locX2>` (y before x, as PaliGemma)."""
    x1, y1, x2, y2 = box_xyxy
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {tuple(box_xyxy)} is not x1, y1, x2, y2 with x1 <= x2 and y1 <= y2")
    bins = (
        encode_value(y1, height),
        encode_value(x1, width),
        encode_value(y2, height),
        encode_value(x2, width),
    )
    return "".join(loc_token(b) for b in bins)


def decode_box(locs: Sequence[int], width: float, height: float) -> tuple[float, float, float, float]:
    """(y1, x1, y2, x2) bins -> pixel (x1, y1, x2, y2), inside the image."""
    y1, x1, y2, x2 = locs
    return (
        decode_value(x1, width),
        decode_value(y1, height),
        decode_value(x2, width),
        decode_value(y2, height),
    )


def _clean_label(label: str) -> str:
    return " ".join(label.split())


def label_problem(label: str) -> str | None:
    """Why `label` cannot be a detection label (None if it can): it must survive ` ; `-joining and parsing."""
    cleaned = _clean_label(label)
    if not cleaned:
        return "it is empty"
    if ";" in cleaned:
        return "it contains ';', which separates objects in PaliGemma's detection format"
    if "<loc" in cleaned:
        return "it contains '<loc', which starts a location token"
    return None


def format_detections(objects: Sequence[tuple[Sequence[float], str]], width: float, height: float) -> str:
    """[(pixel xyxy, label), ...] -> `<loc..>x4 label ; <loc..>x4 label` (empty string for no objects)."""
    parts = []
    for box, label in objects:
        problem = label_problem(label)
        if problem:
            raise ValueError(f"label {label!r} cannot be used: {problem}")
        label = _clean_label(label)
        parts.append(f"{encode_box(box, width, height)} {label}")
    return OBJECT_SEPARATOR.join(parts)


def detect_prefix(labels: Sequence[str]) -> str:
    """`detect a ; b`: labels de-duplicated, first occurrence order kept."""
    unique = list(dict.fromkeys(_clean_label(label) for label in labels))
    if not unique or not all(unique):
        raise ValueError(f"a detect prefix needs at least one non-empty label, got {list(labels)!r}")
    return f"{DETECT_PREFIX} {OBJECT_SEPARATOR.join(unique)}"


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # pixel x1, y1, x2, y2
    label: str
    bins: tuple[int, int, int, int]  # y1, x1, y2, x2 as the model wrote them


@dataclass
class ParseResult:
    detections: list[Detection] = field(default_factory=list)
    malformed: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def segments(self) -> int:
        """Non-empty `;`-separated segments seen: well-formed plus malformed."""
        return len(self.detections) + self.malformed


def _parse_segment(
    segment: str, width: float, height: float, allowed: set[str] | None
) -> tuple[Detection | None, str | None]:
    raw_bins: list[str] = []
    pos = 0
    while match := _LEADING_LOC.match(segment, pos):
        raw_bins.append(match.group(1))
        pos = match.end()
    label = _clean_label(segment[pos:])
    if not raw_bins:
        return None, f"no location tokens in {segment!r}"
    for raw in raw_bins:
        if not re.fullmatch(r"\d{4}", raw):
            return None, f"<loc{raw}> is not a 4-digit location token"
        if int(raw) > _MAX_BIN:
            return None, f"<loc{raw}> is outside 0..{_MAX_BIN}"
    if len(raw_bins) != 4:
        return None, f"{len(raw_bins)} location tokens, expected 4"
    if not label:
        return None, "missing label"
    if "<loc" in label:
        return None, f"location token inside label {label!r}"
    y1, x1, y2, x2 = bins = tuple(int(raw) for raw in raw_bins)
    if y2 < y1 or x2 < x1:
        return None, f"inverted box y1={y1} x1={x1} y2={y2} x2={x2}"
    if y2 == y1 or x2 == x1:  # big_vision's evaluator: valid only when y2 > y1 and x2 > x1
        return None, f"zero-size box y1={y1} x1={x1} y2={y2} x2={x2}"
    if allowed is not None and label not in allowed:
        return None, f"label {label!r} not among {sorted(allowed)}"
    return Detection(box=decode_box(bins, width, height), label=label, bins=bins), None


def parse_detections(
    text: str, width: float, height: float, allowed_labels: Collection[str] | None = None
) -> ParseResult:
    """Tolerantly parse model output into detections, counting what does not parse.

    A well-formed `;`-separated segment is exactly four `<locNNNN>` tokens (four digits,
    0..1023, y1 < y2 and x1 < x2) followed by a non-empty label (in `allowed_labels`
    when given). Anything else is counted in `malformed`, with a reason in `problems`,
    instead of raising: a model's output is data, not a contract. Empty segments (an
    empty output, a trailing ` ;`) are skipped and not counted.
    """
    allowed = {_clean_label(label) for label in allowed_labels} if allowed_labels is not None else None
    result = ParseResult()
    for segment in text.split(";"):
        if not segment.strip():
            continue
        detection, problem = _parse_segment(segment, width, height, allowed)
        if detection is not None:
            result.detections.append(detection)
        else:
            result.malformed += 1
            result.problems.append(problem or "malformed")
    return result
