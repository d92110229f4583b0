"""Reading JSONL files line by line, with the problem of each bad line named instead of raised.

Callers decide what a bad line means: eval scoring lists it as malformed, the references reader
reports it, the run report stops on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator


def jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, None) for each non-blank line, or (number, None, problem) for a line that
    is not UTF-8: one bad byte costs its line, not the file (and names where it is)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, None, f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                continue
            if text.strip():
                yield number, text, None


def jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object, None) for each non-blank line holding a JSON object, else (number, None, problem)."""
    for number, line, problem in jsonl_lines(path):
        if line is None:
            yield number, None, problem
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, None, f"invalid JSON ({err.msg})"
            continue
        if not isinstance(obj, dict):
            yield number, None, f"not a JSON object ({type(obj).__name__})"
            continue
        yield number, obj, None
