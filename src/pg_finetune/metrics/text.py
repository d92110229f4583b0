"""Text metrics for OCR-like tasks: character and word error rate, exact match, ANLS.

- Edit distance is Levenshtein's (insertions, deletions, substitutions cost 1), on characters
  for CER and on whitespace-separated words for WER.
- `cer`, `wer` are corpus rates, as jiwer and the OCR literature compute them: total edits over
  total reference length (not a mean of per-example rates, which over-weights short lines).
  With several references an example is measured against the closest one (fewest edits). Texts
  are stripped first, as jiwer's default transform does; inner whitespace counts.
- `anls`: Average Normalized Levenshtein Similarity (DocVQA, Biten et al. 2019): per question the
  best over references of 1 - d(p, r) / max(len p, len r), set to 0 when that normalized distance
  is >= 0.5 (the threshold tau); both strings lower-cased and stripped, as the official script.
"""

from __future__ import annotations

from collections.abc import Sequence

ANLS_THRESHOLD = 0.5


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance between two sequences (strings or token lists), O(len a x len b) time, O(len b) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _closest(prediction: Sequence, references: Sequence[Sequence]) -> tuple[int, int]:
    """(edits, reference length) against the reference needing the fewest edits."""
    return min((levenshtein(prediction, ref), len(ref)) for ref in references)


def error_rate(predictions: Sequence[str], references: Sequence[Sequence[str]], *, words: bool) -> float:
    """Corpus CER (`words=False`) or WER: sum of edits / sum of reference lengths (0 when both are 0)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    def split(text: str) -> list[str]:
        return text.split() if words else list(text.strip())

    edits = length = 0
    for prediction, refs in zip(predictions, references, strict=True):
        if not refs:
            raise ValueError("every example needs at least one reference text")
        e, n = _closest(split(prediction), [split(r) for r in refs])
        edits, length = edits + e, length + n
    return edits / length if length else float(edits > 0)


def anls_each(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-example ANLS (see the module docstring)."""
    scores = []
    for prediction, refs in zip(predictions, references, strict=True):
        p = prediction.strip().lower()
        best = 0.0
        for ref in refs:
            r = ref.strip().lower()
            longest = max(len(p), len(r))
            distance = levenshtein(p, r) / longest if longest else 0.0
            best = max(best, 1.0 - distance if distance < ANLS_THRESHOLD else 0.0)
        scores.append(best)
    return scores


def text_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "cer", "wer", "anls"}: exact match on stripped text (whitespace runs collapsed)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"exact_match": 0.0, "cer": 0.0, "wer": 0.0, "anls": 0.0}

    def norm(text: str) -> str:
        return " ".join(text.split())

    exact = [norm(p) in {norm(r) for r in refs} for p, refs in zip(predictions, references, strict=True)]
    anls = anls_each(predictions, references)
    return {
        "exact_match": sum(exact) / len(exact),
        "cer": error_rate(predictions, references, words=False),
        "wer": error_rate(predictions, references, words=True),
        "anls": sum(anls) / len(anls),
    }
