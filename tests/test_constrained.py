"""Constrained detection decoding: the state machine on hand-written tokens, then on the tiny model.

The tiny tokenizer's pieces used below (checked in `test_label_tokens_are_those_of_the_training_suffix`):
` cat` is `▁ c at`, ` cat ; ` is `▁ c a t▁ ;▁`, ` cat food` is `▁ c a t▁ fo o d`, ` cat food ; ` ends
`d▁ ;▁`, ` circle` is `▁ ci r c l e` and ` circle ; ` is `▁ circle▁ ;▁`.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image

from pg_finetune.collator import PaliGemmaCollator
from pg_finetune.generate import GenerationSettings, evaluate_task, generate
from pg_finetune.loc import format_detections, loc_token, parse_detections
from pg_finetune.tasks.detect.constrained import (
    DONE_STATE,
    DetectionConstraint,
    _label_token_ids,
    build_label_trie,
)
from pg_finetune.tasks.detect.targets import prompt_classes as detect_labels
from pg_finetune.tiny import build_processor, build_tiny, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_processor().tokenizer


def _ids(tokenizer, *pieces: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(pieces))
    assert tokenizer.unk_token_id not in ids, f"not single tokens: {pieces}"
    return ids


def _loc(tokenizer, b: int) -> int:
    return tokenizer.convert_tokens_to_ids(loc_token(b))


def _constraint(tokenizer, prefixes, max_new_tokens=None, prompt_length=0) -> DetectionConstraint:
    return DetectionConstraint.for_records(
        tokenizer, prefixes, prompt_length=prompt_length, max_new_tokens=max_new_tokens
    )


def _allowed_after(constraint: DetectionConstraint, tokens: list[int], max_new_tokens: int | None = None) -> set[int]:
    trie = constraint.tries[0]
    remaining = None if max_new_tokens is None else max_new_tokens - len(tokens)
    return set(constraint.allowed(trie, constraint.state_of(trie, tokens), remaining).tolist())


# ---- the state machine on hand-written token sequences -------------------------------------------


def test_detect_labels_reads_the_prompt():
    assert detect_labels("detect cat ; cat  food ; cat") == ["cat", "cat food"]
    assert detect_labels("detect circle") == ["circle"]
    assert detect_labels("caption en") == []
    assert detect_labels("detect") == []


def test_label_tokens_are_those_of_the_training_suffix(tokenizer):
    t = tokenizer
    assert _label_token_ids(t, "circle") == (_ids(t, "▁", "ci", "r", "c", "l", "e"), _ids(t, "▁", "circle▁", ";▁"))
    assert _label_token_ids(t, "cat") == (_ids(t, "▁", "c", "at"), _ids(t, "▁", "c", "a", "t▁", ";▁"))
    end, sep = _label_token_ids(t, "cat food")
    assert end == _ids(t, "▁", "c", "a", "t▁", "fo", "o", "d")
    assert sep == _ids(t, "▁", "c", "a", "t▁", "fo", "o", "d▁", ";▁")
    # Exactly what the collator puts in the labels of a training suffix.
    suffix = format_detections([((0, 0, 10, 10), "cat food"), ((5, 5, 20, 20), "cat")], 64, 64)
    batch = PaliGemmaCollator(build_processor(), max_length=64)(
        [{"image": Image.new("RGB", (64, 64)), "prefix": "detect cat ; cat food", "suffix": suffix}]
    )
    target = [i for i in batch["labels"][0].tolist() if i != -100]
    box1 = [_loc(t, b) for b in (0, 0, 160, 160)]
    box2 = [_loc(t, b) for b in (80, 80, 320, 320)]
    assert target == box1 + sep + box2 + _label_token_ids(t, "cat")[0] + [t.eos_token_id]


def test_trie_shares_the_common_start_of_cat_and_cat_food(tokenizer):
    t = tokenizer
    trie = build_label_trie(t, ["cat", "cat food", "cat"])
    assert trie.labels == ("cat", "cat food")
    node = 0
    for token in _ids(t, "▁", "c"):
        node = trie.children[node][token]
    assert set(trie.children[node]) == set(_ids(t, "at", "a"))  # ` cat` ends, or ` cat ; ` / ` cat food` go on
    for token in _ids(t, "a", "t▁"):
        node = trie.children[node][token]
    assert set(trie.children[node]) == set(_ids(t, ";▁", "fo"))
    assert not trie.ends[node] and not trie.seps[node]
    assert trie.seps[trie.children[node][_ids(t, ";▁")[0]]]
    # 12 nodes: root, ▁, c, at, a, t▁, ;▁, fo, o, d, d▁, ;▁ (hand-counted from the token lists above)
    assert len(trie.children) == 12 and sum(trie.ends) == 2 and sum(trie.seps) == 2
    # Shortest ` label` + eos is ` cat` + eos = 4; a ` ; ` leaf then needs 4 locations + 4.
    assert trie.dist[0] == 4 and {trie.dist[n] for n, s in enumerate(trie.seps) if s} == {8}


def test_state_machine_walks_hand_written_sequences(tokenizer):
    t = tokenizer
    c = _constraint(t, ["detect cat ; cat food"])
    locs = [_loc(t, b) for b in range(1024)]
    eos, pad = t.eos_token_id, t.pad_token_id
    box = [locs[5], locs[7], locs[9], locs[11]]
    # y1 and x1 stop short of 1023: a box needs y2 > y1 and x2 > x1 (big_vision's evaluator)
    assert _allowed_after(c, []) == set(locs[:1023]) | {eos}  # a box, or the empty answer
    assert _allowed_after(c, box[:1]) == set(locs[:1023])
    assert _allowed_after(c, box[:2]) == set(locs[6:])  # y2 > y1
    assert _allowed_after(c, box[:3]) == set(locs[8:])  # x2 > x1
    assert _allowed_after(c, box) == set(_ids(t, "▁"))
    walk = {
        ("▁",): {"c"}, ("▁", "c"): {"at", "a"}, ("▁", "c", "at"): {"<eos>"},
        ("▁", "c", "a"): {"t▁"}, ("▁", "c", "a", "t▁"): {";▁", "fo"},
        ("▁", "c", "a", "t▁", "fo", "o"): {"d", "d▁"}, ("▁", "c", "a", "t▁", "fo", "o", "d"): {"<eos>"},
        ("▁", "c", "a", "t▁", "fo", "o", "d▁"): {";▁"},
    }
    for pieces, expected in walk.items():
        assert _allowed_after(c, box + _ids(t, *pieces)) == set(_ids(t, *expected)), pieces
    after_separator = box + _ids(t, "▁", "c", "a", "t▁", ";▁")
    assert _allowed_after(c, after_separator) == set(locs[:1023])  # no eos after ` ; `
    assert _allowed_after(c, after_separator + box[:2]) == set(locs[6:])  # the second box is checked too
    # Forbidden tokens (inverted box, text where a box must be) end the row: only eos/pad follow.
    trie = c.tries[0]
    assert c.state_of(trie, [locs[9], locs[7], locs[5]]) == DONE_STATE
    assert c.state_of(trie, [locs[9], locs[7], locs[9]]) == DONE_STATE  # zero height
    assert c.state_of(trie, [locs[9], locs[7], locs[10], locs[7]]) == DONE_STATE  # zero width
    assert c.state_of(trie, [locs[1023]]) == DONE_STATE  # no y2 can exceed it
    assert c.state_of(trie, _ids(t, "▁")) == DONE_STATE
    assert _allowed_after(c, [eos]) == {eos, pad}


@pytest.mark.parametrize("labels", [["cat", "cat food"], ["circle", "red circle", "triangle"], ["gray square"]])
def test_every_training_suffix_is_accepted(tokenizer, labels):
    c = _constraint(tokenizer, ["detect " + " ; ".join(labels)])
    boxes = [(0, 0, 64, 64), (3, 5, 40, 33), (10, 10, 10.5, 10.5)]  # the last: 8 bins wide
    for n in range(1, 4):
        for chosen in itertools.product(labels, repeat=n):
            suffix = format_detections(list(zip(boxes, chosen, strict=False)), 64, 64)
            tokens = tokenizer(suffix, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for i, token in enumerate(tokens):
                assert token in _allowed_after(c, tokens[:i]), (suffix, i)


def test_length_budget_leaves_room_to_finish(tokenizer):
    t = tokenizer
    locs = [_loc(t, b) for b in range(1024)]
    c = _constraint(t, ["detect cat ; cat food"])
    # One object is 4 locations + ` cat` (3 tokens) + eos = 8 tokens.
    assert _allowed_after(c, [], max_new_tokens=7) == {t.eos_token_id}
    assert _allowed_after(c, [], max_new_tokens=8) == set(locs[:1023]) | {t.eos_token_id}
    # After 4 locs + `▁ c a t▁` (8 tokens): `fo o d eos` needs 4 more, `;▁` + a whole ` cat` object 9.
    prefix = locs[:4] + _ids(t, "▁", "c", "a", "t▁")
    assert _allowed_after(c, prefix, max_new_tokens=16) == set(_ids(t, "fo"))
    assert _allowed_after(c, prefix, max_new_tokens=17) == set(_ids(t, "fo", ";▁"))
    # After 4 locs + `▁ c` (6 tokens): `at eos` needs 2, `a t▁ fo o d eos` needs 6.
    prefix = locs[:4] + _ids(t, "▁", "c")
    assert _allowed_after(c, prefix, max_new_tokens=11) == set(_ids(t, "at"))
    assert _allowed_after(c, prefix, max_new_tokens=12) == set(_ids(t, "at", "a"))


@pytest.mark.parametrize("max_new_tokens", [7, 12, 23, 60])
def test_random_logits_always_decode_to_parseable_detections(tokenizer, max_new_tokens):
    """A random walk through the grammar: greedy on random scores, 2 beams per record, eos always in time."""
    prefixes = ["detect cat ; cat food", "detect circle ; red circle ; triangle", "caption en"] * 8
    beams = 2
    c = _constraint(tokenizer, prefixes, max_new_tokens=max_new_tokens, prompt_length=3)
    generator = torch.Generator().manual_seed(max_new_tokens)
    rows = len(prefixes) * beams
    ids = torch.full((rows, 3), 7)  # a 3-token "prompt"; only the generated part counts
    done = torch.zeros(rows, dtype=torch.bool)
    for _ in range(max_new_tokens):
        scores = torch.randn(rows, len(tokenizer), generator=generator)
        masked = c(ids, scores)
        free = torch.arange(rows) % (3 * beams) >= 2 * beams  # the caption rows
        assert torch.equal(masked[free], scores[free])
        assert torch.isfinite(masked).any(-1).all()
        nxt = torch.where(done, tokenizer.pad_token_id, masked.argmax(-1))
        done |= nxt == tokenizer.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
    texts = tokenizer.batch_decode(ids[:, 3:], skip_special_tokens=True)
    seen = set()
    for row, text in enumerate(texts):
        labels = detect_labels(prefixes[row // beams])
        if not labels:
            continue
        parsed = parse_detections(text, 64, 64, allowed_labels=labels)
        assert parsed.malformed == 0, (text, parsed.problems)
        assert done[row], f"row {row} did not finish with eos within {max_new_tokens} tokens: {text!r}"
        seen.update(d.label for d in parsed.detections)
    if max_new_tokens == 60:  # long enough for every label to come up somewhere
        assert seen == {"cat", "cat food", "circle", "red circle", "triangle"}
    if max_new_tokens == 7:  # no room for a whole object: every answer is empty
        assert seen == set()


def test_bad_input_is_named(tokenizer):
    with pytest.raises(ValueError, match="contain ';'"):
        build_label_trie(tokenizer, ["a;b"])
    with pytest.raises(ValueError, match="location tokens"):
        build_label_trie(build_tokenizer(), ["circle"])  # no <locNNNN> tokens in this one
    c = _constraint(tokenizer, ["detect circle", "detect cat"])
    with pytest.raises(ValueError, match="whole number of beams"):
        c(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, len(tokenizer)))


# ---- on the tiny model -----------------------------------------------------------------------------

PROMPTS = [
    "detect cat ; cat food", "detect circle", "detect red circle ; triangle ; square",
    "caption en", "detect gray square ; teal triangle", "detect cat food",
]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]


@pytest.fixture(scope="module")
def garbage_model():
    """Tiny random PaliGemma with an untied random head, so its output depends on the input (and is garbage)."""
    model, processor = build_tiny(seed=3)
    torch.manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model, processor


def _records():
    return [{"image": Image.new("RGB", (64, 64), c), "prefix": p} for c, p in zip(COLORS, PROMPTS, strict=True)]


def _invalid(outputs: list[str]) -> tuple[int, int, list[str]]:
    """(malformed segments, segments, labels found) over the detect rows."""
    malformed = segments = 0
    labels: list[str] = []
    for prompt, text in zip(PROMPTS, outputs, strict=True):
        if allowed := detect_labels(prompt):
            parsed = parse_detections(text, 64, 64, allowed_labels=allowed)
            malformed += parsed.malformed
            segments += parsed.segments
            labels += [d.label for d in parsed.detections]
    return malformed, segments, labels


@pytest.mark.parametrize("num_beams", [1, 3])
def test_constrained_outputs_parse_on_the_tiny_model(garbage_model, num_beams):
    model, processor = garbage_model
    records = _records()

    def run(constrain: bool, batch_size: int = len(records)) -> list[str]:
        settings = GenerationSettings(
            max_new_tokens=40, num_beams=num_beams, batch_size=batch_size, constrain_detection=constrain
        )
        return generate(model, processor, records, settings, progress=False)

    free, constrained = run(False), run(True)
    bad_free, segments_free, _ = _invalid(free)
    bad, segments, labels = _invalid(constrained)
    print(f"\ninvalid rate, tiny model, {num_beams} beam(s): unconstrained {bad_free}/{segments_free}, "
          f"constrained {bad}/{segments}")
    assert bad_free > 0  # the garbage model needs the constraint
    assert bad == 0 and segments > 0
    assert len(set(labels)) >= 3  # several prompts' labels, multi-token ones included
    caption = PROMPTS.index("caption en")
    assert constrained[caption] == free[caption]  # rows that are no detect prompt are left alone
    assert run(True, batch_size=1) == constrained  # batching (left padding) does not change the answers


def test_sampling_under_the_constraint_parses(garbage_model):
    model, processor = garbage_model
    torch.manual_seed(0)
    settings = GenerationSettings(max_new_tokens=40, do_sample=True, temperature=3.0, constrain_detection=True)
    bad, segments, _ = _invalid(generate(model, processor, _records(), settings, progress=False))
    assert bad == 0 and segments > 0


def test_max_new_tokens_stops_after_a_whole_object(garbage_model):
    """` circle` is 6 tokens: one object + eos needs 11, so 10 tokens leave only the empty answer."""
    model, processor = garbage_model
    records = [{"image": Image.new("RGB", (64, 64), c), "prefix": "detect circle"} for c in COLORS]
    short = generate(model, processor, records, GenerationSettings(max_new_tokens=10, constrain_detection=True),
                     progress=False)
    assert short == [""] * len(records)
    one = generate(model, processor, records, GenerationSettings(max_new_tokens=11, constrain_detection=True),
                   progress=False)
    counts = [len(parse_detections(text, 64, 64, allowed_labels=["circle"]).detections) for text in one]
    assert all(parse_detections(text, 64, 64).malformed == 0 for text in one)
    assert max(counts) == 1


def test_invalid_rate_on_easyvqa_detect(garbage_model):
    from pg_finetune.data import load_records
    from pg_finetune.tasks import get_task

    model, processor = garbage_model
    records = [dict(r) for r in load_records("builtin:easyvqa-detect", "test", limit=16)]
    rates = {}
    for constrain in (False, True):
        settings = GenerationSettings(max_new_tokens=32, constrain_detection=constrain)
        scores, _ = evaluate_task(model, processor, get_task("detect"), records, settings, progress=False)
        rates[constrain] = scores["invalid_rate"]
    print(f"\nbuiltin:easyvqa-detect test[:16], tiny model: invalid_rate unconstrained {rates[False]:.3f}, "
          f"constrained {rates[True]:.3f}")
    assert rates[False] > 0
    assert rates[True] == 0


def test_gemma2_variant_reaches_the_longer_of_two_labels_sharing_a_prefix():
    """Stock tiny PaliGemma 2 (seed 0) picks `cat food` over `cat` here: the trie lets it go past ` cat`."""
    model, processor = build_tiny(variant="paligemma2", seed=0)
    records = [{"image": Image.new("RGB", (64, 64), c), "prefix": "detect cat ; cat food"} for c in ("red", "blue")]
    outputs = generate(model, processor, records, GenerationSettings(max_new_tokens=20, constrain_detection=True),
                       progress=False)
    parsed = [parse_detections(text, 64, 64, allowed_labels=["cat", "cat food"]) for text in outputs]
    assert all(p.malformed == 0 for p in parsed), outputs
    assert "cat food" in {d.label for p in parsed for d in p.detections}, outputs


def test_a_row_is_never_left_without_a_token(tokenizer):
    """Past the announced max_new_tokens (a caller's longer limit) a row mid-label may only stop."""
    t = tokenizer
    c = _constraint(t, ["detect circle"], max_new_tokens=6, prompt_length=0)
    tokens = [_loc(t, b) for b in (1, 1, 2, 2)] + _ids(t, "▁", "ci", "r")  # 7 tokens: one more than announced
    masked = c(torch.tensor([tokens]), torch.zeros(1, len(t)))
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [t.eos_token_id]
    with pytest.raises(ValueError, match="1024 distinct"):
        DetectionConstraint([None], prompt_length=0, loc_ids=[5] * 1024, eos_token_id=1)
