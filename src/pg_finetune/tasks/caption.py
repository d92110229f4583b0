"""Image captioning: prefix `caption en`, suffix the caption.

Records may carry several reference captions in `captions`; the headline metric
is CIDEr-D through pycocoevalcap's scorer (pure Python, no java needed), with
BLEU-4 and ROUGE-L beside it. Tokenisation is a documented fallback for the PTB
tokenizer (which needs java): lower case, punctuation split off, as PTB does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pg_finetune.tasks.base import Task

_PUNCT = re.compile(r"""[.,!?;:"'()\[\]{}]""")


def simple_tokenize(text: str) -> str:
    """Lower-case and drop punctuation, the way PTBTokenizer's output looks for captions."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"cider": 0.0, "bleu4": 0.0, "rouge_l": 0.0}
    res = {i: [simple_tokenize(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "rouge_l": float(rouge)}


CAPTION = Task(
    name="caption",
    default_prefix="caption en",
    reference_field="captions",
    parse=str.strip,
    score=caption_scores,
    max_new_tokens=64,
)
