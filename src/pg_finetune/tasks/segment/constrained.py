"""Constrained decoding for segmentation: every output parses as `<loc>x4 <seg>x16` then `<eos>`.

The grammar is the training target (`masks.mask_to_suffix`, big_vision's `refcoco_mask2str`) and
what the parser and big_vision's evaluator read (`parse.parse_segmentation`: the first 4 + 16 tokens;
y1 < y2 and x1 < x2, else the output is invalid). The target is one object and a fixed length, so
the state of a row is its position:

    0, 1: a location token 0..1022 (y1, x1 leave room for a larger y2, x2)
    2: a location token > y1;  3: a location token > x1
    4..19: a seg token <seg000>..<seg127>
    20 and after: <eos> (then padding)

Rows whose prompt is not `segment ...` are left alone, so one batch may mix tasks. A
`max_new_tokens` below 21 cannot hold an answer; the output is then cut, and invalid.

    >>> processor = SegmentationConstraint.for_records(tokenizer, ["segment cat"], prompt_length=20)
    >>> model.generate(**batch, logits_processor=LogitsProcessorList([processor]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from pg_finetune.loc import NUM_BINS, loc_token

BOX_TOKENS = 4
SEG_TOKENS = 16
NUM_CODES = 128
ANSWER_TOKENS = BOX_TOKENS + SEG_TOKENS
_LAST_BIN = NUM_BINS - 1


def is_segment_prompt(prefix: str) -> bool:
    """`segment` or `segment <expression>` (the task's prompt); other prompts are not constrained."""
    words = prefix.split()
    return bool(words) and words[0] == "segment"


class SegmentationConstraint(LogitsProcessor):
    """Mask logits so that each constrained row writes 4 loc tokens (a non-empty box), 16 seg tokens, eos.

    `constrained[i]`: whether record i's rows follow the grammar. Rows are `len(constrained) * num_beams`,
    beams of a record adjacent (as `generate` expands them). `prompt_length` is the padded prompt width
    (prompts are left-padded: every row's generated tokens start at that column).
    """

    def __init__(
        self, constrained: Sequence[bool], *, prompt_length: int, loc_ids: Sequence[int], seg_ids: Sequence[int],
        eos_token_id: int, pad_token_id: int | None = None,
    ) -> None:  # fmt: skip
        if len(set(loc_ids)) != NUM_BINS or len(set(seg_ids)) != NUM_CODES:
            raise ValueError(
                f"expected {NUM_BINS} distinct <locNNNN> and {NUM_CODES} distinct <segNNN> token ids, got "
                f"{len(set(loc_ids))} and {len(set(seg_ids))}; constrained segmentation needs a PaliGemma tokenizer"
            )
        self.constrained = list(constrained)
        self.prompt_length = prompt_length
        self.loc_ids = torch.as_tensor(list(loc_ids), dtype=torch.long)
        self.seg_ids = torch.as_tensor(list(seg_ids), dtype=torch.long)
        self.bin_of = {int(t): b for b, t in enumerate(loc_ids)}
        stop = [int(eos_token_id)] + ([int(pad_token_id)] if pad_token_id is not None else [])
        self.stop_ids = torch.tensor(sorted(set(stop)), dtype=torch.long)

    @classmethod
    def for_records(cls, tokenizer, prefixes: Sequence[str], *, prompt_length: int) -> SegmentationConstraint | None:
        """One processor for a batch whose `segment ...` prompts it constrains; None when there is none."""
        constrained = [is_segment_prompt(p) for p in prefixes]
        if not any(constrained):
            return None
        return cls(
            constrained,
            prompt_length=prompt_length,
            loc_ids=tokenizer.convert_tokens_to_ids([loc_token(b) for b in range(NUM_BINS)]),
            seg_ids=tokenizer.convert_tokens_to_ids([f"<seg{c:03d}>" for c in range(NUM_CODES)]),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    def allowed(self, generated: Sequence[int]) -> torch.Tensor:
        """Token ids allowed after `generated` (the row's tokens so far, assumed to follow the grammar)."""
        step = len(generated)
        if step < 2:
            return self.loc_ids[:_LAST_BIN]
        if step < BOX_TOKENS:
            lower = self.bin_of.get(int(generated[step - 2]), _LAST_BIN - 1) + 1  # y2 > y1, x2 > x1
            return self.loc_ids[lower:]
        if step < ANSWER_TOKENS:
            return self.seg_ids
        return self.stop_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.shape[0]
        if rows % len(self.constrained):
            raise ValueError(f"{rows} rows are not a whole number of beams for {len(self.constrained)} records")
        beams = rows // len(self.constrained)
        generated = input_ids[:, self.prompt_length :].tolist()
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for row, tokens in enumerate(generated):
            if self.constrained[row // beams]:
                allowed[row, self.allowed(tokens).to(scores.device)] = True
            else:
                allowed[row] = True
        return scores.masked_fill(~allowed, float("-inf"))
