"""Caption metrics: CIDEr-D, BLEU-4 and ROUGE-L through pycocoevalcap's own scorers.

The COCO caption evaluation (pycocoevalcap `eval.py`) first runs every caption through the
Stanford PTB tokenizer (java, `-preserveLines -lowerCase`) and drops punctuation tokens, then
scores. We do the same when `java` is on the PATH (`tokenizer="auto"` or `"ptb"`), calling the
jar that ships with pycocoevalcap with a temporary file of our own (pycocoevalcap's wrapper
writes into its installed package directory, which may be read-only).

Without java, `tokenizer="simple"` (the fallback of `"auto"`) lower-cases and splits off the
same punctuation with a regex: `"A man's hat."` -> `"a man s hat"` where PTB gives
`"a man 's hat"`. Scores are close to, not equal to, the official ones; which tokenizer ran is
returned by `resolve_tokenizer` so reports can say so.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence

logger = logging.getLogger(__name__)

TOKENIZERS = ("auto", "ptb", "simple")
_PUNCT = re.compile(r"""[.,!?;:"'()\[\]{}]""")
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")


def simple_tokenize(text: str) -> str:
    """Lower-case and drop punctuation, the way PTBTokenizer's output looks for captions."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def java_available() -> bool:
    return shutil.which("java") is not None


def resolve_tokenizer(tokenizer: str = "auto") -> str:
    """"ptb" or "simple": what `tokenizer` ("auto", "ptb", "simple") means on this machine."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}; valid: {', '.join(TOKENIZERS)}")
    if tokenizer == "auto":
        return "ptb" if java_available() else "simple"
    if tokenizer == "ptb" and not java_available():
        raise RuntimeError("the PTB caption tokenizer needs `java` on the PATH; install a JRE or use 'simple'")
    return tokenizer


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Stanford PTBTokenizer as pycocoevalcap runs it: lower-cased tokens, punctuation tokens dropped."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not texts:
        return []
    jar = os.path.join(os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    # One caption a line (-preserveLines): a line break inside a caption would shift every later one.
    lines = [_LINE_BREAKS.sub(" ", t) for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    out = done.stdout.decode("utf-8").split("\n")
    out += [""] * (len(lines) - len(out))  # trailing empty captions print no line at all
    if len(out) > len(lines) and not any(out[len(lines) :]):
        out = out[: len(lines)]
    if len(out) != len(lines):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in punctuation) for line in out]


def tokenize(captions: Mapping[Hashable, Sequence[str]], tokenizer: str = "auto") -> dict[Hashable, list[str]]:
    """{key: [caption, ...]} -> the same with each caption tokenized (one java call for all of them)."""
    kind = resolve_tokenizer(tokenizer)
    if kind == "simple":
        return {k: [simple_tokenize(c) for c in caps] for k, caps in captions.items()}
    flat = [c for caps in captions.values() for c in caps]
    tokens = iter(ptb_tokenize(flat))
    return {k: [next(tokens) for _ in caps] for k, caps in captions.items()}


def _scorer_inputs(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(gts, res) as pycocoevalcap's scorers take them, tokenized; callers handle the empty case.

    An empty prediction stays the empty string, as pycocoevalcap's own pipeline leaves it after
    PTB tokenization: BLEU scores it as a zero-length hypothesis (it adds to the corpus brevity
    penalty), CIDEr-D and ROUGE-L as 0.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"examples {empty[:10]} have no reference caption")
    n = len(predictions)
    # One tokenizer call for predictions and references together: java starts once.
    both = tokenize({**{("res", i): [p] for i, p in enumerate(predictions)},
                     **{("gts", i): list(r) for i, r in enumerate(references)}}, tokenizer)  # fmt: skip
    res = {i: [both[("res", i)][0]] for i in range(n)}
    gts = {i: both[("gts", i)] for i in range(n)}
    return gts, res


def cider_each(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str = "auto") -> list[float]:
    """Per-example CIDEr-D from the corpus computation (document frequencies over all examples):
    the mean is `caption_scores(...)["cider"]` with the same tokenizer."""
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        return []
    gts, res = _scorer_inputs(predictions, references, tokenizer)
    _, each = Cider().compute_score(gts, res)
    return [float(s) for s in each]


def caption_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str = "auto"
) -> dict[str, float]:
    """{"cider", "bleu4", "rouge_l"} of predictions against one or more references each (corpus level)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"cider": 0.0, "bleu4": 0.0, "rouge_l": 0.0}
    gts, res = _scorer_inputs(predictions, references, tokenizer)
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "rouge_l": float(rouge)}
