"""Reading a segmentation output: `<locY1><locX1><locY2><locX2>` then 16 `<segNNN>`, the rest ignored.

Validity as big_vision's segmentation evaluator (`evaluators/proj/paligemma/transfers/segmentation.py`),
which reads the first 4 + 16 tokens of the output and ignores the rest (a label, more objects):
the first four tokens are location tokens in 0..1023, the next sixteen are seg tokens in 0..127,
and y1 < y2, x1 < x2. Whitespace between tokens is allowed (as `pg_finetune.loc`'s parser).

    >>> parse_segmentation("<loc0010><loc0020><loc0500><loc0600>" + "<seg005>" * 16 + " cat").bins
    (10, 20, 500, 600)
    >>> parse_segmentation("<loc0010><loc0020><loc0500><loc0600>" + "<seg005>" * 15).problem
    '15 seg tokens after the box, expected 16'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(r"\s*<(loc|seg)([^<>]*)>")
_DIGITS = {"loc": 4, "seg": 3}
_MAX = {"loc": 1023, "seg": 127}


@dataclass
class ParsedSegmentation:
    """bins: (y1, x1, y2, x2) as written; codes: 16 codebook indices; problem: why invalid (None: valid);
    notes: what was ignored (extra seg tokens)."""

    bins: tuple[int, ...] = ()
    codes: tuple[int, ...] = ()
    problem: str | None = None
    notes: list[str] = field(default_factory=list)


def parse_segmentation(text: str) -> ParsedSegmentation:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while len(tokens) < 21 and (match := _TOKEN.match(text, pos)):
        tokens.append((match.group(1), match.group(2)))
        pos = match.end()
    kinds = [kind for kind, _ in tokens]
    n_loc = next((i for i, k in enumerate(kinds) if k != "loc"), len(kinds))
    if n_loc != 4:
        return ParsedSegmentation(
            problem=f"{n_loc} location tokens at the start, expected 4 (then 16 seg tokens)"
        )
    n_seg = next((i for i, k in enumerate(kinds[4:]) if k != "seg"), len(kinds) - 4)
    if n_seg < 16:
        return ParsedSegmentation(problem=f"{n_seg} seg tokens after the box, expected 16")
    values = []
    for kind, raw in tokens[:20]:
        if not re.fullmatch(rf"\d{{{_DIGITS[kind]}}}", raw):
            return ParsedSegmentation(problem=f"<{kind}{raw}> is not a {_DIGITS[kind]}-digit {kind} token")
        if int(raw) > _MAX[kind]:
            return ParsedSegmentation(problem=f"<{kind}{raw}> is outside 0..{_MAX[kind]}")
        values.append(int(raw))
    bins, codes = tuple(values[:4]), tuple(values[4:])
    y1, x1, y2, x2 = bins
    if not (y1 < y2 and x1 < x2):  # big_vision: valid only when y2 > y1 and x2 > x1
        return ParsedSegmentation(
            bins, codes, problem=f"empty or inverted box y1={y1} x1={x1} y2={y2} x2={x2}"
        )
    notes = ["more than 16 seg tokens; the first 16 are scored (as big_vision)"] if n_seg > 16 else []
    return ParsedSegmentation(bins, codes, notes=notes)
