"""Reading JSONL files line by line, with the problem of each bad line named instead of raised.

Callers decide what a bad line means: eval scoring lists it as malformed, the references reader
reports it, the run report stops on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator


def jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object, None) for each non-blank line holding a JSON object, else (number, None, problem)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
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
