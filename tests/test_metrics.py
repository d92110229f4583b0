"""pg_finetune.metrics: values worked by hand, and agreement with the reference implementations
(the official VQA loop, pycocotools run the usual file-based way, pycocoevalcap's own pipeline)."""

from __future__ import annotations

import itertools
import json
import random
import shutil

import numpy as np
import pytest

from pg_finetune.metrics.boxes import (
    ImageBoxes,
    accuracy_at,
    box_iou,
    coco_map,
    greedy_match,
    hits_at,
    iou_matrix,
    match_boxes,
)
from pg_finetune.metrics.captions import (
    caption_scores,
    cider_each,
    java_available,
    ptb_tokenize,
    resolve_tokenizer,
    simple_tokenize,
)
from pg_finetune.metrics.vqa import (
    normalize_prediction,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_scores,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs java")


# ---- VQA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Yes!", "yes"),                  # '!' not next to a space: becomes a space, then split away
        ("a dog.", "dog"),                # final period dropped, article dropped
        ("The Two", "2"),                 # lower case, number word -> digit, article dropped
        ("none", "0"),
        ("3.5", "3.5"),                   # a period before a digit stays
        ("1,000", "1000"),                # digit,digit: every mark is deleted, not spaced
        ("hello , world", "hello world"),  # a mark next to a space is deleted
        ("t-shirt", "t shirt"),           # '-' inside a word becomes a space
        ("dont know", "don't know"),      # contractions restored
        ("  red\tcar\n", "red car"),
        ("an apple's core", "apple's core"),  # "'" is not in the official punctuation list
    ],
)  # fmt: skip
def test_answer_normalisation_cases(raw, normalised):
    assert normalize_prediction(raw) == normalised


def test_processing_steps_separately():
    assert process_punctuation("what?") == "what "
    assert process_punctuation("what ?") == "what "
    assert process_digit_article("An Orange") == "orange"


def test_vqa_accuracy_on_a_hand_worked_ten_answer_example():
    answers = ["2", "2", "3", "4", "4", "4", "4", "4", "4", "4"]
    # "Two." -> "2": two humans said 2. Leaving out one of those two leaves 1 match (1/3);
    # leaving out any of the 8 others leaves 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.6)
    # "4": seven matches; every subset keeps >= 6 -> 1.
    assert vqa_accuracy("four", answers) == pytest.approx(1.0)
    # "3": one match; leaving it out gives 0, the 9 others give 1/3: 9 / 30 = 0.3.
    assert vqa_accuracy("3", answers) == pytest.approx(0.3)
    assert vqa_accuracy("5", answers) == 0.0
    # Dict answers (VQAv2's {"answer", "answer_confidence", "answer_id"}) read the same.
    dicts = [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]
    assert vqa_accuracy("two", dicts) == pytest.approx(0.6)


def test_reference_answers_get_punctuation_processing_only_when_they_differ():
    # All ten the same: the official code leaves them untouched, so "t-shirt" never equals the
    # processed prediction "t shirt" (a quirk kept on purpose so numbers agree with the official tool).
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    # Not all the same: punctuation is processed, "t-shirt" -> "t shirt", and nine humans match.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == pytest.approx(1.0)
    # References are not lower-cased (the annotation files already are).
    assert vqa_accuracy("red", ["Red"] * 10) == 0.0


def _official_accuracy(prediction: str, answers: list[str]) -> float:
    """The official evaluate() loop, transcribed with its dict-based leave-one-out."""
    gts = [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)]
    res = normalize_prediction(prediction)
    if len({a["answer"] for a in gts}) > 1:
        for a in gts:
            a["answer"] = process_punctuation(a["answer"])
    accs = []
    for datum in gts:
        others = [item for item in gts if item != datum]
        accs.append(min(1, len([item for item in others if item["answer"] == res]) / 3))
    return sum(accs) / len(accs)


def test_vqa_accuracy_equals_the_official_loop_on_random_cases():
    rng = random.Random(0)
    pool = ["yes", "no", "2", "two", "red", "a red car", "red car", "t-shirt", "3.5", "none", "0"]
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool + ["Yes.", "The Two", "RED CAR!"])
        assert vqa_accuracy(prediction, answers) == pytest.approx(_official_accuracy(prediction, answers))


def test_vqa_scores_mean_and_answer_types():
    answers = [["yes"] * 10, ["2", "2", "3", "4", "4", "4", "4", "4", "4", "4"], ["cat"] * 10]
    scores = vqa_scores(["yes", "two", "dog"], answers, ["yes/no", "number", "other"])
    assert scores == pytest.approx(
        {"accuracy": (1 + 0.6 + 0) / 3, "accuracy/number": 0.6, "accuracy/other": 0.0, "accuracy/yes_no": 1.0}
    )
    assert vqa_scores([], []) == {"accuracy": 0.0}
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])
    for answers in (["cat"], ["cat", "cat"]):  # a correct answer would score 0 and 1/3: refused
        with pytest.raises(ValueError, match="at least 3.*--benchmark vqa"):
            vqa_accuracy("cat", answers)
    assert vqa_accuracy("cat", ["cat"] * 3) == pytest.approx(2 / 3)  # by hand: 2 of 3 left each time


# ---- boxes -----------------------------------------------------------------------------------------


def test_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (0, 0, 5, 5)) == pytest.approx(0.25)
    assert box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert box_iou((2, 2, 2, 2), (2, 2, 2, 2)) == 0.0
    assert iou_matrix([(0, 0, 10, 10)], []).shape == (1, 0)
    assert accuracy_at([1.0, 0.6, 0.2], 0.5) == pytest.approx(2 / 3)
    assert accuracy_at([1.0, 0.6, 0.2], 0.75) == pytest.approx(1 / 3)


def test_hungarian_matching_beats_greedy():
    # Boxes span y 0..10, so IoU is interval IoU along x.  GT A = x0..10, B = x5..15;
    # P1 = x2..12: IoU(P1, A) = 8/12, IoU(P1, B) = 7/13;  P2 = x0..6: IoU(P2, A) = 6/10, IoU(P2, B) = 1/15.
    truth = [(0, 0, 10, 10), (5, 0, 15, 10)]
    predicted = [(2, 0, 12, 10), (0, 0, 6, 10)]
    # Greedy takes P1-A (the largest IoU) and is left with P2-B: one hit at 0.5.
    assert greedy_match(predicted, truth) == pytest.approx([8 / 12, 1 / 15])
    # Hungarian maximises the total: P2-A and P1-B, two hits.
    assert match_boxes(predicted, truth) == pytest.approx([6 / 10, 7 / 13])
    assert accuracy_at(greedy_match(predicted, truth), 0.5) == 0.5
    assert accuracy_at(match_boxes(predicted, truth), 0.5) == 1.0
    # More truth than predictions: the unmatched box scores 0.
    assert match_boxes([(0, 0, 10, 10)], truth) == pytest.approx([1.0, 0.0])


def _max_matching_brute_force(predicted, truth, threshold) -> int:
    """Largest number of disjoint (prediction, truth) pairs with IoU >= threshold, by trying every
    injection of the smaller side into the larger (IoU by hand, not through our code)."""
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union if union > 0 else 0.0

    small, large = (predicted, truth) if len(predicted) <= len(truth) else (truth, predicted)
    best = 0
    for picked in itertools.permutations(range(len(large)), len(small)):
        best = max(best, sum(iou(small[i], large[j]) >= threshold for i, j in enumerate(picked)))
    return best


def test_hits_at_is_a_maximum_matching_among_pairs_over_the_threshold():
    # By hand (y 0..10 everywhere): IoU(P1,G1) = .4, IoU(P2,G1) = 70/130 = .538, IoU(P2,G2) = 30/170.
    truth = [(0, 0, 10, 10), (10, 0, 20, 10)]
    predicted = [(0, 0, 10, 4), (3, 0, 13, 10)]
    assert match_boxes(predicted, truth) == pytest.approx([0.4, 30 / 170])  # the largest total IoU
    assert hits_at(predicted, truth, 0.5) == 1  # ... holds no pair >= .5, yet P2-G1 is a hit
    assert hits_at(predicted, truth, 0.3) == 1  # P1 and P2 both want G1 at .3: still one
    assert hits_at(predicted, truth, 0.1) == 2
    assert hits_at([], truth, 0.5) == hits_at(predicted, [], 0.5) == 0
    # Random scenes against a brute-force maximum matching.
    rng = random.Random(0)
    for _ in range(300):
        def box():
            x, y = rng.uniform(0, 20), rng.uniform(0, 20)
            return (x, y, x + rng.uniform(1, 10), y + rng.uniform(1, 10))

        preds = [box() for _ in range(rng.randint(0, 4))]
        gts = [box() for _ in range(rng.randint(0, 4))]
        for t in (0.1, 0.3, 0.5):
            assert hits_at(preds, gts, t) == _max_matching_brute_force(preds, gts, t)


def test_coco_map_by_hand():
    # One image, two cats; outputs in order: a hit, a miss, a hit. Scores 1, 1/2, 1/3 (output order).
    # Precision at each detection 1, 1/2, 2/3 with recall .5, .5, 1; the interpolated precision is
    # 1 for recall <= .5 (51 of COCO's 101 recall points) and 2/3 above (50 points), at every IoU
    # threshold because the hits are exact: AP = (51 + 50 * 2/3) / 101.
    image = ImageBoxes(
        truth_boxes=[(0, 0, 10, 10), (20, 20, 40, 40)], truth_labels=["cat", "cat"],
        predicted_boxes=[(0, 0, 10, 10), (60, 60, 70, 70), (20, 20, 40, 40)], predicted_labels=["cat"] * 3,
        scores=[1.0, 0.5, 1 / 3],
    )  # fmt: skip
    expected = (51 + 50 * 2 / 3) / 101
    assert coco_map([image]) == pytest.approx({"map": expected, "map50": expected, "map75": expected})
    # The miss ranked last instead: precision 1 up to recall 1 -> AP 1.
    image.scores = [1.0, 0.1, 0.5]
    assert coco_map([image])["map"] == pytest.approx(1.0)
    # A box with IoU 0.6 counts at 0.50..0.60 (3 of the 10 thresholds), not above.
    one = ImageBoxes([(0, 0, 100, 100)], ["cat"], [(0, 0, 60, 100)], ["cat"], [1.0])
    assert coco_map([one]) == pytest.approx({"map": 0.3, "map50": 1.0, "map75": 0.0})
    # Degenerate inputs: nothing predicted, nothing to find.
    assert coco_map([ImageBoxes([(0, 0, 1, 1)], ["cat"])])["map"] == 0.0
    assert coco_map([ImageBoxes()])["map"] == 1.0


def test_coco_map_equals_pycocotools_run_from_files(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    labels = ["cat", "dog", "bird"]
    images = []
    for _ in range(12):
        truth = [tuple(rng.uniform(0, 50, 2)) for _ in range(rng.integers(0, 4))]
        truth = [(x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40)) for x, y in truth]
        truth_labels = [labels[rng.integers(0, 3)] for _ in truth]
        predicted = [tuple(v + rng.normal(0, 4) for v in box) for box in truth if rng.random() < 0.8]
        predicted = [(x1, y1, max(x1, x2), max(y1, y2)) for x1, y1, x2, y2 in predicted]
        predicted += [(10.0, 10.0, 30.0, 35.0)] * int(rng.integers(0, 2))
        predicted_labels = [labels[rng.integers(0, 3)] if rng.random() < 0.2 else "cat" for _ in predicted]
        for k, lab in enumerate(truth_labels[: len(predicted)]):
            if rng.random() < 0.8:
                predicted_labels[k] = lab
        images.append(ImageBoxes(truth, truth_labels, predicted, predicted_labels, list(rng.uniform(0, 1, len(predicted)))))
    ours = coco_map(images)

    category = {lab: k + 1 for k, lab in enumerate(sorted(labels))}
    gt = {"images": [{"id": i + 1} for i in range(len(images))], "categories": [{"id": v, "name": k} for k, v in category.items()],
          "annotations": []}  # fmt: skip
    results = []
    for i, im in enumerate(images, start=1):
        for (x1, y1, x2, y2), lab in zip(im.truth_boxes, im.truth_labels, strict=True):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": category[lab],
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})  # fmt: skip
        for (x1, y1, x2, y2), lab, s in zip(im.predicted_boxes, im.predicted_labels, im.scores, strict=True):
            results.append({"image_id": i, "category_id": category[lab], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    truth = COCO(str(tmp_path / "gt.json"))
    evaluator = COCOeval(truth, truth.loadRes(str(tmp_path / "res.json")), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert 0.05 < ours["map"] < 0.95  # a non-trivial case
    assert ours == pytest.approx({"map": evaluator.stats[0], "map50": evaluator.stats[1], "map75": evaluator.stats[2]})


# ---- captions --------------------------------------------------------------------------------------

CAPTIONS = ["A man riding a horse.", "a dog's (red) ball", "", "Two people, walking; on the t-shirt beach!"]
REFERENCES = [
    ["A man rides a horse on a beach.", "a person riding a brown horse"],
    ["the red ball of a dog", "a dog with a red ball"],
    ["a cat sitting on a mat"],
    ["two people walk on the beach", "people walking on a beach"],
]


@needs_java
def test_ptb_tokenizer_equals_pycocoevalcaps():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    theirs = PTBTokenizer().tokenize({k: [{"caption": c}] for k, c in enumerate(CAPTIONS)})
    assert ptb_tokenize(CAPTIONS) == [theirs[k][0] for k in range(len(CAPTIONS))]
    assert ptb_tokenize(["A man's hat."]) == ["a man 's hat"]
    assert simple_tokenize("A man's hat.") == "a man s hat"  # the documented fallback differs here


@needs_java
def test_caption_scores_equal_pycocoevalcaps_own_pipeline():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The empty caption stays in: pycocoevalcap scores it as a zero-length hypothesis (BLEU's
    # brevity penalty sees it), so replacing it by a placeholder token changes corpus BLEU-4.
    predictions, references = CAPTIONS, REFERENCES
    assert "" in predictions
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in refs] for k, refs in enumerate(references)})
    res = tokenizer.tokenize({k: [{"caption": p}] for k, p in enumerate(predictions)})
    expected = {
        "cider": Cider().compute_score(gts, res)[0],
        "bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "rouge_l": Rouge().compute_score(gts, res)[0],
    }
    assert caption_scores(predictions, references, tokenizer="ptb") == pytest.approx(expected)
    assert resolve_tokenizer("auto") == "ptb"


def test_an_empty_caption_is_a_zero_length_hypothesis_for_bleu():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # Twelve captions, one empty, already lower-case without punctuation (both tokenizers leave them).
    predictions = ["a man riding a horse", "a dog with a ball", "two people on a beach", "a red car",
                   "a cat on a mat", "", "a plate of food", "a bus on a street", "a man with a kite",
                   "a bird on a branch", "a woman holding an umbrella", "a train at a station"]  # fmt: skip
    references = [[p + " today", "the " + p] if p else ["a group of sheep in a field"] for p in predictions]
    gts = dict(enumerate(references))
    res = {k: [p] for k, p in enumerate(predictions)}  # pycocoevalcap keeps '' as it is
    expected = {
        "cider": Cider().compute_score(gts, res)[0],
        "bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "rouge_l": Rouge().compute_score(gts, res)[0],
    }
    assert caption_scores(predictions, references, tokenizer="simple") == pytest.approx(expected)
    # The old placeholder token is a 1-token hypothesis: a longer candidate corpus, a milder brevity
    # penalty, a higher BLEU-4.
    placeholder = {**res, 5: ["<empty>"]}
    assert Bleu(4).compute_score(gts, placeholder, verbose=0)[0][3] > expected["bleu4"]


def test_caption_scores_by_hand_and_simple_tokenizer():
    # A prediction equal to its only reference: BLEU-4 and ROUGE-L are 1.
    same = caption_scores(["a man riding a brown horse"], [["A man riding a brown horse."]], tokenizer="simple")
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6) and same["rouge_l"] == pytest.approx(1.0)
    # ROUGE-L by hand: prediction "a dog runs" vs reference "a big dog" -> LCS "a dog" = 2 words,
    # P = 2/3, R = 2/3, F (beta 1.2) = 2/3.
    assert caption_scores(["a dog runs"], [["a big dog"]], tokenizer="simple")["rouge_l"] == pytest.approx(2 / 3)
    assert caption_scores([], []) == {"cider": 0.0, "bleu4": 0.0, "rouge_l": 0.0}
    with pytest.raises(ValueError, match="unknown caption tokenizer"):
        caption_scores(["a"], [["a"]], tokenizer="nltk")
    with pytest.raises(ValueError, match="no reference"):
        caption_scores(["a"], [[]], tokenizer="simple")


@pytest.mark.parametrize("tokenizer", ["simple", "ptb"])
def test_per_example_cider_means_to_the_corpus_cider_with_the_same_tokenizer(tokenizer):
    if tokenizer == "ptb" and not java_available():
        pytest.skip("the PTB tokenizer needs java")
    # "3.5" is one PTB token but "3 5" for the regex fallback: the two tokenizers score this differently,
    # so per-example scores tokenized one way cannot average to a corpus score tokenized the other way
    predictions = ["a sign that reads 3.5 miles", "a red car on a road", "two birds"]
    references = [["a sign that reads 3 5 miles"], ["a red car on the road"], ["two small birds"]]
    each = cider_each(predictions, references, tokenizer=tokenizer)
    assert len(each) == 3
    assert sum(each) / 3 == pytest.approx(caption_scores(predictions, references, tokenizer=tokenizer)["cider"])
    other = "ptb" if tokenizer == "simple" else "simple"
    assert each[0] != pytest.approx(cider_each(predictions, references, tokenizer=other)[0])
