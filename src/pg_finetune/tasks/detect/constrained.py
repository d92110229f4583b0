"""Constrained decoding for detection: every output parses as `<loc>x4 label ( ; <loc>x4 label )*`.

The grammar is PaliGemma's detection target (`pg_finetune.loc`): four `<locNNNN>` tokens
(y1, x1, y2, x2 with y1 < y2 and x1 < x2: big_vision's evaluator refuses a zero-size box), a space and one of the labels the prompt
`detect a ; b` names, then either ` ; ` and the next object, or `<eos>`; `<eos>` straight
away is the empty answer. A `transformers.LogitsProcessor` walks a small state machine
per generated row and sets every token the grammar forbids to -inf:

    start --loc<1023--> loc1 --loc<1023--> loc2 --loc>y1--> loc3 --loc>x1--> label trie root
    start --eos--> done
    trie node --child token--> trie node;  end of " label" --eos--> done
    end of " label ; " --> loc0 (a location token must follow; no <eos> after " ; ")

Label tokens must be the ones the model was trained on, so each label's continuation is
taken from tokenizing the training suffix itself (as `format_detections` writes it and the
collator encodes it): the text between location tokens is tokenized on its own, and a
label tokenizes differently before ` ; ` than at the end (the tiny tokenizer writes
` circle` as `▁ ci r c l e` but ` circle ; ` as `▁ circle▁ ;▁`), so both forms go in
one token trie, which also shares the common start of labels like "cat" and "cat food".

With `max_new_tokens` the processor also plans ahead: it only allows a token when the
grammar can still be finished in the tokens left, so an output cut by the length limit
still parses (it ends after a complete object, never mid-box or mid-label).

    >>> processor = DetectionConstraint.for_records(tokenizer, ["detect cat ; cat food"], prompt_length=20)
    >>> model.generate(**batch, logits_processor=LogitsProcessorList([processor]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

from pg_finetune.loc import NUM_BINS, OBJECT_SEPARATOR, loc_token
from pg_finetune.tasks.detect.targets import prompt_classes

BOX_TOKENS = 4  # y1, x1, y2, x2
_LAST_BIN = NUM_BINS - 1

# Row states: (phase, step, y1, x1). step is the loc tokens read (LOC) or the trie node (LABEL).
START, LOC, LABEL, DONE = 0, 1, 2, 3
State = tuple[int, int, int, int]
START_STATE: State = (START, 0, 0, 0)
DONE_STATE: State = (DONE, 0, 0, 0)


@dataclass
class LabelTrie:
    """Token trie of every allowed label continuation after the 4th location token.

    Node 0 is the root. `ends[n]`: the path to n spells ` label` (eos may follow);
    `seps[n]`: it spells ` label ; ` (a location token must follow). `dist[n]` is the
    fewest tokens from n to a point where the output may stop (eos included), counting
    a whole next object after a separator.
    """

    labels: tuple[str, ...]
    children: list[dict[int, int]] = field(default_factory=lambda: [{}])
    ends: list[bool] = field(default_factory=lambda: [False])
    seps: list[bool] = field(default_factory=lambda: [False])
    dist: list[int] = field(default_factory=list)
    child_ids: list[torch.Tensor] = field(default_factory=list)
    child_dist: list[torch.Tensor] = field(default_factory=list)

    def insert(self, token_ids: Sequence[int]) -> int:
        node = 0
        for token in token_ids:
            nxt = self.children[node].get(token)
            if nxt is None:
                nxt = len(self.children)
                self.children[node][token] = nxt
                self.children.append({})
                self.ends.append(False)
                self.seps.append(False)
            node = nxt
        return node

    def finish(self, root_dist: int) -> None:
        """Compute `dist` bottom-up and the per-node tensors the processor indexes.

        `root_dist` is the shortest ` label` plus eos: what a whole further object costs
        after its four location tokens, hence what a ` ; ` leaf costs on top of them.
        """
        dist = [0] * len(self.children)
        for node in reversed(range(len(self.children))):  # children have larger ids than parents
            if self.seps[node]:
                dist[node] = BOX_TOKENS + root_dist
                continue
            options = [1 + dist[c] for c in self.children[node].values()]
            if self.ends[node]:
                options.append(1)  # eos
            dist[node] = min(options)
        self.dist = dist
        self.child_ids = [torch.tensor(list(ch.keys()), dtype=torch.long) for ch in self.children]
        self.child_dist = [torch.tensor([dist[c] for c in ch.values()], dtype=torch.long) for ch in self.children]


def _label_token_ids(tokenizer, label: str) -> tuple[list[int], list[int]]:
    """Token ids of ` label` at the end of a suffix, and of ` label ; ` before the next box."""
    box = loc_token(0) * BOX_TOKENS
    box_ids = tokenizer(box, add_special_tokens=False)["input_ids"]
    end_ids = tokenizer(f"{box} {label}", add_special_tokens=False)["input_ids"]
    sep_ids = tokenizer(f"{box} {label}{OBJECT_SEPARATOR}{box}", add_special_tokens=False)["input_ids"]
    if (
        len(box_ids) != BOX_TOKENS
        or end_ids[:BOX_TOKENS] != box_ids
        or sep_ids[:BOX_TOKENS] != box_ids
        or sep_ids[-BOX_TOKENS:] != box_ids
    ):
        raise ValueError(
            f"label {label!r}: the tokenizer does not keep <locNNNN> as single tokens around it; "
            "constrained detection needs a PaliGemma tokenizer (with the 1024 location tokens)"
        )
    return end_ids[BOX_TOKENS:], sep_ids[BOX_TOKENS:-BOX_TOKENS]


def build_label_trie(tokenizer, labels: Sequence[str]) -> LabelTrie:
    """Trie over the token sequences of ` label` (then eos) and ` label ; ` (then a box) for each label."""
    labels = tuple(dict.fromkeys(" ".join(label.split()) for label in labels))
    if not labels or not all(labels):
        raise ValueError(f"constrained detection needs at least one non-empty label, got {list(labels)!r}")
    bad = [label for label in labels if ";" in label or "<loc" in label]
    if bad:
        raise ValueError(f"detect labels {bad!r} contain ';' or '<loc'; a label cannot hold either")
    trie = LabelTrie(labels=labels)
    shortest = 10**9
    for label in labels:
        end_ids, sep_ids = _label_token_ids(tokenizer, label)
        trie.ends[trie.insert(end_ids)] = True
        trie.seps[trie.insert(sep_ids)] = True
        shortest = min(shortest, len(end_ids) + 1)
    for node, is_sep in enumerate(trie.seps):
        # Cannot happen with labels free of ';', but a trie that did it would be ambiguous.
        if is_sep and (trie.children[node] or trie.ends[node]):
            raise ValueError(f"labels {list(labels)!r} tokenize ambiguously around ' ; '")
    trie.finish(root_dist=shortest)
    return trie


class DetectionConstraint(LogitsProcessor):
    """Mask logits so that each constrained row's generated text follows the detection grammar.

    `tries[i]` is the label trie of record i (None: leave that record's rows alone). Rows
    are `len(tries) * num_beams`, beams of a record adjacent (as `generate` expands them).
    `prompt_length` is the padded prompt width: prompts are left-padded, so every row's
    generated tokens start at that column. State is computed from the generated tokens
    only and cached by their sequence, so beams that reorder rows between steps are fine.
    """

    def __init__(
        self,
        tries: Sequence[LabelTrie | None],
        *,
        prompt_length: int,
        loc_ids: Sequence[int],
        eos_token_id: int,
        pad_token_id: int | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        if len(set(loc_ids)) != NUM_BINS:
            raise ValueError(
                f"expected {NUM_BINS} distinct <locNNNN> token ids, got {len(set(loc_ids))}; "
                "constrained detection needs a PaliGemma tokenizer (with the 1024 location tokens)"
            )
        self.tries = list(tries)
        self.prompt_length = prompt_length
        self.loc_ids = torch.as_tensor(list(loc_ids), dtype=torch.long)
        self.bin_of = {int(t): b for b, t in enumerate(loc_ids)}
        self.eos_token_id = int(eos_token_id)
        self.eos_ids = torch.tensor([self.eos_token_id], dtype=torch.long)
        stop = [self.eos_token_id] + ([int(pad_token_id)] if pad_token_id is not None else [])
        self.stop_ids = torch.tensor(sorted(set(stop)), dtype=torch.long)
        self.max_new_tokens = max_new_tokens
        self._cache: dict[tuple[int, ...], State] = {}

    @classmethod
    def for_records(
        cls, tokenizer, prefixes: Sequence[str], *, prompt_length: int, max_new_tokens: int | None = None,
        tries: dict[tuple[str, ...], LabelTrie] | None = None,
    ) -> DetectionConstraint:
        """One processor for a batch: detect prompts get their labels' trie, other prompts none."""
        cache = tries if tries is not None else {}
        per_record: list[LabelTrie | None] = []
        for prefix in prefixes:
            labels = tuple(prompt_classes(prefix))
            if labels and labels not in cache:
                cache[labels] = build_label_trie(tokenizer, labels)
            per_record.append(cache[labels] if labels else None)
        return cls(
            per_record,
            prompt_length=prompt_length,
            loc_ids=tokenizer.convert_tokens_to_ids([loc_token(b) for b in range(NUM_BINS)]),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=max_new_tokens,
        )

    # -- the state machine ----------------------------------------------------------------------
    def advance(self, trie: LabelTrie, state: State, token: int) -> State:
        """The state after `token`; a token the grammar forbids (or anything after eos) gives DONE."""
        phase, step, y1, x1 = state
        if phase == DONE:
            return DONE_STATE
        if phase in (START, LOC):
            b = self.bin_of.get(token)
            if b is None:
                return DONE_STATE  # eos from START, or a forbidden token
            if step == 0:
                return (LOC, 1, b, 0) if b < _LAST_BIN else DONE_STATE
            if step == 1:
                return (LOC, 2, y1, b) if b < _LAST_BIN else DONE_STATE
            if step == 2:
                return (LOC, 3, y1, x1) if b > y1 else DONE_STATE
            return (LABEL, 0, 0, 0) if b > x1 else DONE_STATE
        child = trie.children[step].get(token)
        if child is None:
            return DONE_STATE  # eos after a label, or a forbidden token
        if trie.seps[child]:
            return (LOC, 0, 0, 0)
        return (LABEL, child, 0, 0)

    def state_of(self, trie: LabelTrie, generated: Sequence[int]) -> State:
        state = START_STATE
        for token in generated:
            state = self.advance(trie, state, token)
        return state

    def allowed(self, trie: LabelTrie, state: State, remaining: int | None) -> torch.Tensor:
        """Token ids allowed next; `remaining` counts this token too (None: no length limit)."""
        phase, step, y1, x1 = state
        budget = 10**9 if remaining is None else remaining - 1  # tokens left after this one
        if phase == DONE:
            return self.stop_ids
        if phase == LABEL:
            ids = trie.child_ids[step][trie.child_dist[step] <= budget]
            if trie.ends[step]:
                ids = torch.cat([ids, self.eos_ids])
            return ids
        # START or LOC: after this loc token, BOX_TOKENS - step - 1 locs and a label are still due.
        locs_fit = BOX_TOKENS - step - 1 + trie.dist[0] <= budget
        # y1 and x1 leave room for a larger y2 and x2; y2 > y1 and x2 > x1 (no zero-size box)
        lower, upper = (y1 + 1, NUM_BINS) if step == 2 else (x1 + 1, NUM_BINS) if step == 3 else (0, _LAST_BIN)
        ids = self.loc_ids[lower:upper] if locs_fit else self.loc_ids[:0]
        if phase == START:
            ids = torch.cat([ids, self.eos_ids])
        return ids

    # -- the processor --------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.shape[0]
        if rows % len(self.tries):
            raise ValueError(f"{rows} rows are not a whole number of beams for {len(self.tries)} records")
        beams = rows // len(self.tries)
        generated = input_ids[:, self.prompt_length :].tolist()
        remaining = None if self.max_new_tokens is None else self.max_new_tokens - len(generated[0])
        cache: dict[tuple[int, ...], State] = {}
        row_index, token_index, free_rows = [], [], []
        for row, tokens in enumerate(generated):
            trie = self.tries[row // beams]
            if trie is None:
                free_rows.append(row)
                continue
            key = (row // beams, *tokens)
            parent = self._cache.get(key[:-1]) if tokens else None  # this row's sequence one step ago
            state = self.advance(trie, parent, tokens[-1]) if parent is not None else self.state_of(trie, tokens)
            cache[key] = state
            ids = self.allowed(trie, state, remaining)
            if not len(ids):  # only past the length the processor was told of: stop rather than mask all
                ids = self.eos_ids
            row_index.append(torch.full_like(ids, row))
            token_index.append(ids)
        self._cache = cache
        if not row_index:
            return scores
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        allowed[free_rows] = True
        rows_t = torch.cat(row_index).to(scores.device)
        tokens_t = torch.cat(token_index).to(scores.device)
        allowed[rows_t, tokens_t] = True
        return scores.masked_fill(~allowed, float("-inf"))
