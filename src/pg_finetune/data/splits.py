"""Split names with an optional slice, the same for every source: `train`, `train[:100]`,
`train[10:20]`, `train[:10%]`, `train[90%:]` (percent bounds round as `datasets` does).

    name, part = parse_split("train[:10%]")      # ("train", slice(None, "10%"))
    split_indices(part, 38575)                   # range(0, 3858)
"""

from __future__ import annotations

import re

_SPLIT_RE = re.compile(r"^\s*(?P<name>[\w.\-]+)\s*(?:\[(?P<start>[^\]:]*):(?P<stop>[^\]:]*)\])?\s*$")
_BOUND_RE = re.compile(r"^\d+%?$")


def parse_split(split: str) -> tuple[str, slice]:
    """`"train[:10%]"` -> `("train", slice(None, "10%"))`.

    Bounds are None, an int (row count) or a string `"N%"` (percent of the split); resolve them
    against a split's size with `split_indices`. Negative or malformed bounds raise ValueError.
    """
    match = _SPLIT_RE.match(split) if isinstance(split, str) else None
    if not match:
        raise ValueError(
            f"malformed split {split!r}: expected a name with an optional slice, "
            "e.g. 'train', 'train[:100]', 'train[10:20]', 'train[:10%]', 'train[90%:]'"
        )
    bounds: list[int | str | None] = []
    for text in (match["start"], match["stop"]):
        text = (text or "").strip()
        if not text:
            bounds.append(None)
            continue
        if not _BOUND_RE.match(text):
            raise ValueError(
                f"bad slice bound {text!r} in split {split!r}: use a non-negative row number "
                "or a percentage like '10%' (negative bounds are not supported)"
            )
        if text.endswith("%"):
            if int(text[:-1]) > 100:
                raise ValueError(f"bad slice bound {text!r} in split {split!r}: a percentage must be 0..100")
            bounds.append(text)
        else:
            bounds.append(int(text))
    return match["name"], slice(bounds[0], bounds[1])


def split_indices(part: slice, num_rows: int) -> range:
    """The rows a parsed slice selects from a split of `num_rows` rows (clipped like a Python slice)."""

    def resolve(bound: int | str | None, default: int) -> int:
        if bound is None:
            return default
        if isinstance(bound, str):
            # datasets' ReadInstruction rounds percent boundaries to the closest row ("closest")
            return int(round(int(bound[:-1]) * num_rows / 100.0))
        return min(bound, num_rows)

    start, stop = resolve(part.start, 0), resolve(part.stop, num_rows)
    return range(start, max(start, stop))
