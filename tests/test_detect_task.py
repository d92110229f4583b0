"""The detect task: prompt/target builders, references, IoU matching and metrics computed by hand.

Images are 1023 x 1023 px so that a bin is a pixel (`<loc0010>` is x or y = 10), which
keeps the hand arithmetic readable.
"""

from __future__ import annotations

import json
import random

import pytest

from pg_finetune.metrics.boxes import box_iou, match_boxes
from pg_finetune.tasks.base import Task
from pg_finetune.tasks.detect import (
    DETECT,
    evaluate_detections,
    make_prefix,
    make_suffix,
    shuffle_objects,
)

S = 1023  # image side: bin == pixel


def record(boxes, labels, prefix=None):
    rec = {"boxes": boxes, "labels": labels, "width": S, "height": S}
    if prefix is not None:
        rec["prefix"] = prefix
    return rec


def score(pairs):
    """[(prediction text, record)] -> scores, through the task's own parse/references/score."""
    predictions = [DETECT.parse(text) for text, _ in pairs]
    references = [DETECT.reference(rec) for _, rec in pairs]
    return DETECT.score(predictions, references).metrics


def test_task_contract():
    assert isinstance(DETECT, Task)
    assert DETECT.name == "detect" and DETECT.default_prefix == "detect"
    assert (
        DETECT.parse("  <loc0001><loc0001><loc0002><loc0002> cat \n")
        == "<loc0001><loc0001><loc0002><loc0002> cat"
    )
    ref = DETECT.reference(record([[1, 2, 3, 4]], ["cat"], prefix="detect cat ; dog"))
    assert json.loads(json.dumps(ref)) == ref  # written as it is into predictions files
    assert ref["boxes"] == [[1.0, 2.0, 3.0, 4.0]] and ref["labels"] == ["cat"]
    assert (ref["width"], ref["height"]) == (S, S)
    assert ref["classes"] == ["cat", "dog"]
    with pytest.raises(KeyError, match="width"):
        DETECT.reference({"boxes": [], "labels": [], "height": 5})


def test_box_iou_by_hand():
    # Two 10x10 boxes overlapping by 5x10: 50 / (100 + 100 - 50) = 1/3.
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    # Box inside a box: 25 / 100.
    assert box_iou((0, 0, 10, 10), (0, 0, 5, 5)) == pytest.approx(0.25)
    # Touching edges share no area.
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0


def test_scores_on_three_images_by_hand():
    pairs = [
        # Image 1: cat GT x0..10, prediction x5..15 (IoU 1/3); dog predicted exactly (IoU 1).
        (
            "<loc0000><loc0005><loc0010><loc0015> cat ; <loc0100><loc0100><loc0200><loc0200> dog",
            record([[0, 0, 10, 10], [100, 100, 200, 200]], ["cat", "dog"]),
        ),
        # Image 2: cat GT 100x100, prediction x0..60 (IoU 6000 / 10000 = 0.6); one malformed segment.
        ("<loc0000><loc0000><loc0100><loc0060> cat ; <loc12> cat", record([[0, 0, 100, 100]], ["cat"])),
        # Image 3: nothing there, but the model finds a prompted bird: a valid false positive.
        ("<loc0000><loc0000><loc0010><loc0010> bird", record([], [], prefix="detect bird")),
    ]
    scores = score(pairs)
    assert list(scores)[0] == "miou"
    # 3 GT boxes, IoUs 1/3, 1, 0.6 -> (1/3 + 1 + 0.6) / 3 = 0.64444...
    assert scores["miou"] == pytest.approx((1 / 3 + 1 + 0.6) / 3)
    # Matched at IoU >= 0.5: dog (1) and image-2 cat (0.6) -> 2 of 3 GT boxes.
    assert scores["acc@0.5"] == pytest.approx(2 / 3)
    assert scores["recall@0.5"] == pytest.approx(2 / 3)
    # Only the dog (IoU 1) reaches 0.75.
    assert scores["acc@0.75"] == pytest.approx(1 / 3)
    # 4 valid predictions (2 + 1 + 1), 2 hits.
    assert scores["precision@0.5"] == pytest.approx(0.5)
    # 5 segments (2 + 2 + 1), 1 malformed.
    assert scores["invalid_rate"] == pytest.approx(0.2)


def test_unmatched_gt_counts_zero_and_labels_must_agree():
    # Right box, wrong label: the dog prediction cannot match the cat GT box.
    scores = score(
        [("<loc0000><loc0000><loc0010><loc0010> dog", record([[0, 0, 10, 10]], ["cat"], "detect cat ; dog"))]
    )
    assert scores["miou"] == 0.0 and scores["recall@0.5"] == 0.0 and scores["precision@0.5"] == 0.0
    assert scores["invalid_rate"] == 0.0  # dog is in the prompt, so it is a valid (wrong) answer
    # A label the prompt never asked for is malformed.
    scores = score([("<loc0000><loc0000><loc0010><loc0010> zebra", record([[0, 0, 10, 10]], ["cat"]))])
    assert scores["invalid_rate"] == 1.0 and scores["precision@0.5"] == 0.0
    # Empty output on an image with two cats: miou 0, nothing invalid.
    scores = score([("", record([[0, 0, 10, 10], [20, 20, 30, 30]], ["cat", "cat"]))])
    assert scores["miou"] == 0.0 and scores["invalid_rate"] == 0.0


def test_duplicate_predictions_match_once():
    # The same correct box twice: one true positive, one false positive.
    text = "<loc0000><loc0000><loc0010><loc0010> cat ; <loc0000><loc0000><loc0010><loc0010> cat"
    scores = score([(text, record([[0, 0, 10, 10]], ["cat"]))])
    assert scores["miou"] == pytest.approx(1.0)
    assert scores["recall@0.5"] == pytest.approx(1.0)
    assert scores["precision@0.5"] == pytest.approx(0.5)


def test_hungarian_beats_greedy():
    # All boxes span y 0..10, so IoU is interval IoU along x.
    # GT A = x0..10, B = x5..15; predictions P1 = x2..12, P2 = x0..6.
    # IoU(P1,A) = 8/12 = .667, IoU(P1,B) = 7/13 = .538, IoU(P2,A) = 6/10 = .6, IoU(P2,B) = 1/15 = .067.
    # Greedy takes P1-A first and is left with P2-B: one hit, IoUs (.667, .067).
    # Hungarian pairs P1-B and P2-A: two hits, IoUs (.6, .538).
    truth = [(0, 0, 10, 10), (5, 0, 15, 10)]
    predicted = [(2, 0, 12, 10), (0, 0, 6, 10)]
    assert match_boxes(predicted, truth) == pytest.approx([0.6, 7 / 13])
    text = "<loc0000><loc0002><loc0010><loc0012> cat ; <loc0000><loc0000><loc0010><loc0006> cat"
    scores = score([(text, record([list(b) for b in truth], ["cat", "cat"]))])
    assert scores["recall@0.5"] == pytest.approx(1.0)
    assert scores["miou"] == pytest.approx((0.6 + 7 / 13) / 2)


def test_a_hit_at_a_threshold_is_not_lost_to_the_largest_total_iou():
    # All boxes span y 0..10 (bin == pixel). GT G1 = x0..10, G2 = x10..20; P1 = x0..10, y0..4; P2 = x3..13.
    # IoU(P1,G1) = 40/100 = .4, IoU(P1,G2) = 0, IoU(P2,G1) = 70/130 = .538, IoU(P2,G2) = 30/170 = .176.
    # Largest total IoU: P1-G1 + P2-G2 = .576 > .538, so mIoU = (.4 + .176) / 2, with no pair >= .5;
    # but P2-G1 clears 0.5 on its own: one hit of two boxes, one of two predictions.
    text = "<loc0000><loc0000><loc0004><loc0010> cat ; <loc0000><loc0003><loc0010><loc0013> cat"
    scores = score([(text, record([[0, 0, 10, 10], [10, 0, 20, 10]], ["cat", "cat"]))])
    assert scores["miou"] == pytest.approx((40 / 100 + 30 / 170) / 2)
    assert scores["acc@0.5"] == pytest.approx(0.5)
    assert scores["recall@0.5"] == pytest.approx(0.5)
    assert scores["precision@0.5"] == pytest.approx(0.5)
    assert scores["acc@0.75"] == 0.0


def test_no_gt_no_prediction_is_perfect_and_empty_eval_is_zero():
    scores = score([("", record([], [], prefix="detect cat"))])
    assert scores["miou"] == 1.0 and scores["precision@0.5"] == 1.0 and scores["invalid_rate"] == 0.0
    assert evaluate_detections([], []).metrics == {
        "miou": 0.0,
        "acc@0.5": 0.0,
        "acc@0.75": 0.0,
        "precision@0.5": 0.0,
        "recall@0.5": 0.0,
        "invalid_rate": 0.0,
    }
    with pytest.raises(ValueError):
        evaluate_detections(["x"], [])


# ---- prompt and target builders ---------------------------------------------------------------------


BOXES = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
LABELS = ["cat", "dog", "cat"]
SEGMENTS = [
    "<loc0000><loc0000><loc0010><loc0010> cat",
    "<loc0020><loc0020><loc0030><loc0030> dog",
    "<loc0040><loc0040><loc0050><loc0050> cat",
]


def test_make_suffix_keeps_order_without_rng():
    assert make_suffix(BOXES, LABELS, S, S) == " ; ".join(SEGMENTS)
    assert make_suffix(BOXES, LABELS, S, S, max_objects=2) == " ; ".join(SEGMENTS[:2])
    with pytest.raises(ValueError):
        make_suffix(BOXES, LABELS[:2], S, S)


def test_make_suffix_shuffles_with_rng():
    suffixes = {make_suffix(BOXES, LABELS, S, S, rng=random.Random(seed)) for seed in range(30)}
    # Each is a permutation of the same three objects, and more than one order shows up.
    for suffix in suffixes:
        assert sorted(suffix.split(" ; ")) == sorted(SEGMENTS)
    assert len(suffixes) > 1
    # Same seed, same order (the pipeline reseeds per epoch for reproducibility).
    assert make_suffix(BOXES, LABELS, S, S, rng=random.Random(7)) == make_suffix(
        BOXES, LABELS, S, S, rng=random.Random(7)
    )


def test_shuffle_objects_copies():
    items = [1, 2, 3, 4]
    shuffled = shuffle_objects(items, random.Random(1))
    assert sorted(shuffled) == [1, 2, 3, 4] and items == [1, 2, 3, 4]
    assert shuffle_objects(items) == [1, 2, 3, 4]


def test_make_prefix_with_negatives():
    classes = ["cat", "dog", "bird", "fish"]
    assert make_prefix(["cat", "cat"]) == "detect cat"
    assert make_prefix(["dog", "cat"], classes, negatives=0) == "detect dog ; cat"
    # Without rng: the first absent classes, order kept.
    assert make_prefix(["dog"], classes, negatives=2) == "detect dog ; cat ; bird"
    # More negatives asked than there are absent classes: all of them.
    assert make_prefix(["dog"], classes, negatives=10) == "detect dog ; cat ; bird ; fish"
    with pytest.raises(ValueError):
        make_prefix(["dog"], classes, negatives=-1)


def test_make_prefix_rng_negatives_are_absent_and_not_in_suffix():
    classes = ["cat", "dog", "bird", "fish", "cow"]
    seen_negatives = set()
    for seed in range(30):
        prefix = make_prefix(["cat", "dog"], classes, negatives=2, rng=random.Random(seed))
        named = prefix.removeprefix("detect ").split(" ; ")
        assert len(named) == 4 and {"cat", "dog"} <= set(named)
        negatives = set(named) - {"cat", "dog"}
        assert negatives <= {"bird", "fish", "cow"}
        seen_negatives |= negatives
        suffix = make_suffix(BOXES, LABELS, S, S, rng=random.Random(seed))
        assert not any(f" {neg}" in suffix for neg in negatives)
    assert len(seen_negatives) == 3  # sampled, not always the same two


# ------------------------------------------------------------------------------------------ target grammar
TARGETS = [
    "<loc0001><loc0002><loc0003><loc0004> cat",
    "<loc0001><loc0002><loc0003><loc0004> cat ; <loc0000><loc0000><loc1023><loc1023> big dog",
    "<loc0001><loc0002><loc0003><loc0004> cat ;",  # a trailing separator, as the parser allows
    "<loc1024><loc0002><loc0003><loc0004> cat",
    "<loc0001><loc9999><loc0003><loc0004> cat",
    "<loc0001><loc0002><loc0003> cat",
    "<loc1><loc0002><loc0003><loc0004> cat",
    "cat",
    "<loc0003><loc0002><loc0001><loc0004> cat",
    "<loc0001><loc0004><loc0003><loc0002> cat",
    "<loc0001><loc0002><loc0001><loc0004> cat",
    "<loc0001><loc0002><loc0003><loc0004>",
    "<loc0001><loc0002><loc0003><loc0004> cat <loc0005>",
    " ; ",
]


@pytest.mark.parametrize("suffix", TARGETS)
def test_check_target_accepts_exactly_what_the_scorer_parses(suffix):
    from pg_finetune.loc import parse_detections

    parsed = parse_detections(suffix, S, S)
    scores = not parsed.malformed and parsed.detections
    assert DETECT.check_target is not None
    assert (DETECT.check_target(suffix) is None) == bool(scores), DETECT.check_target(suffix)


def test_only_detect_checks_its_targets_and_an_empty_suffix_is_left_to_the_reader():
    from pg_finetune.tasks import TASKS

    assert [name for name, task in TASKS.items() if getattr(task, "check_target", None)] == ["detect"]
    assert DETECT.check_target("") is None and DETECT.check_target("  ") is None


def test_make_suffix_of_boxes_a_bin_wide_or_more_passes_the_check():
    rng = random.Random(0)
    for _ in range(200):
        x1, y1 = rng.uniform(0, 900), rng.uniform(0, 900)
        box = [x1, y1, x1 + rng.uniform(1.5, 100), y1 + rng.uniform(1.5, 100)]
        assert DETECT.check_target(make_suffix([box], ["cat"], S, S)) is None
