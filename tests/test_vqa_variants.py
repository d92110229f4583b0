"""The VQA task's document, chart and multiple-choice metrics (ANLS, ChartQA relaxed accuracy,
AI2D/ScienceQA multiple-choice accuracy): values worked by hand, and each new benchmark scored
from a predictions file through `eval.run`."""

from __future__ import annotations

import json

import pytest

from eval.run import main
from pg_finetune.benchmarks import BENCHMARKS
from pg_finetune.metrics.vqa_variants import (
    anls_scores,
    multiple_choice_scores,
    relaxed_accuracy_each,
    relaxed_match,
    relaxed_scores,
    to_float,
)
from pg_finetune.tasks import get_task
from pg_finetune.tasks.base import ScoreOptions


def test_to_float_reads_numbers_as_big_vision_chartqa_does():
    assert to_float("12.5") == 12.5
    assert to_float("50%") == 0.5
    assert to_float(" 7 ") == 7.0  # float() itself ignores surrounding whitespace
    assert to_float("1,000") is None  # the comma is refused, so "1,000" is matched as text
    assert to_float("abc") is None and to_float("%") is None


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [
        ("12", "12.5", True),     # |12 - 12.5| / 12.5 = 0.04 <= 0.05
        ("12.5", "12", True),     # 0.5 / 12 = 0.042
        ("10", "12", False),      # 2 / 12 = 0.167
        ("105", "100", True),     # 5 / 100 = 0.05: the bound is inclusive
        ("106", "100", False),    # 0.06
        ("-98", "-100", True),    # relative to |target|
        ("50%", "0.5", True),     # a percentage is divided by 100
        ("0.5", "50%", True),
        ("50", "50%", False),     # 50 against 0.5
        ("1,000", "1,000", True), # no number: exact text match
        ("1000", "1,000", False), # the reference is no number: text differs
        ("0.0", "0", False),      # a target of 0 always needs an exact match
        ("0", "0", True),
        (" Yes ", "yes", True),   # lower-cased (ChartQA's to_lower=True) and stripped
        ("no", "yes", False),
        ("12", "twelve", False),
    ],
)  # fmt: skip
def test_relaxed_match_by_hand(prediction, reference, correct):
    assert relaxed_match(prediction, reference) is correct


def test_relaxed_scores_take_the_best_reference_and_report_exact_match():
    preds = ["12", "10", "Paris"]
    refs = [["11", "12.3"], ["12"], ["paris"]]
    assert relaxed_accuracy_each(preds, refs) == [1.0, 0.0, 1.0]  # 12 vs 12.3: 0.024
    scores = relaxed_scores(preds, refs)
    assert list(scores) == ["relaxed_accuracy", "exact_match"]  # headline first
    assert scores["relaxed_accuracy"] == pytest.approx(2 / 3)
    assert scores["exact_match"] == pytest.approx(1 / 3)  # only "paris"
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        relaxed_scores(["a", "b"], [["a"]])


def test_anls_by_hand():
    preds = ["hallo", "abd", "ab", "ab", " Hello ", "hallo", ""]
    refs = [["hello"], ["abc"], ["cd"], ["ac"], ["HELLO"], ["xyz", "hello"], [""]]
    # 1 - 1/5; 1 - 1/3; NL 1 -> 0; NL 0.5 is not < 0.5 -> 0; case and spaces ignored -> 1; best of two;
    # empty against empty -> 1
    each = [0.8, 2 / 3, 0.0, 0.0, 1.0, 0.8, 1.0]
    assert anls_scores(preds, refs)["anls"] == pytest.approx(sum(each) / len(each))
    metric = get_task("vqa").get_metric("anls")
    assert metric.scores_each(preds, refs, ScoreOptions()) == pytest.approx(each)
    assert anls_scores([], []) == {"anls": 0.0}


def test_multiple_choice_by_hand_with_question_types():
    preds = [
        "The answer is B.",                   # ScienceQA letter form: b == b
        "the answer is b. BECAUSE: plants",   # read at the start, lower-cased: b
        "B",                                  # not in the reference's form: wrong
        "The answer is C.",                   # c != b
        "Mouse",                              # AI2D option text, lower-cased: right
        "cat",                                # wrong option
    ]  # fmt: skip
    refs = [["The answer is B."]] * 4 + [["mouse"], ["mouse"]]
    types = ["biology", "biology", "physics", None, "yes/no", "yes/no"]
    scores = multiple_choice_scores(preds, refs, types)
    assert scores == pytest.approx(
        {"accuracy": 3 / 6, "accuracy/biology": 1.0, "accuracy/physics": 0.0, "accuracy/yes_no": 0.5}
    )
    assert list(scores)[0] == "accuracy"
    assert multiple_choice_scores(preds, refs) == pytest.approx({"accuracy": 0.5})
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        multiple_choice_scores(["a"], [["a"], ["b"]])


def test_vqa_task_offers_the_new_metrics_and_benchmarks_use_them():
    task = get_task("vqa")
    assert {"exact_match", "vqav2_accuracy", "anls", "relaxed_accuracy", "multiple_choice_accuracy"} <= set(
        task.metrics
    )
    for name, metric, split in [
        ("docvqa", "anls", "validation"),
        ("chartqa", "relaxed_accuracy", "test"),
        ("ai2d", "multiple_choice_accuracy", "test"),
        ("scienceqa", "multiple_choice_accuracy", "test"),
    ]:
        bench = BENCHMARKS[name]
        assert (bench.task, bench.split, bench.source) == ("vqa", split, None)
        assert bench.get_metric().name == metric and bench.get_metric().references_help
    assert BENCHMARKS["docvqa"].prefix == "answer en {question}"


def test_multiple_choice_reference_passes_the_type_and_refuses_a_bad_one():
    metric = get_task("vqa").get_metric("multiple_choice_accuracy")
    assert metric.reference({"suffix": "mouse", "question_type": "parts"}) == {
        "answers": ["mouse"], "question_type": "parts",
    }  # fmt: skip
    assert metric.reference({"answers": ["a"]}) == {"answers": ["a"], "question_type": None}
    with pytest.raises(ValueError, match="question_type"):
        metric.reference({"answers": ["a"], "question_type": 3})
    with pytest.raises(KeyError):
        metric.reference({"question": "no answer"})


# ---- eval.run with --predictions / --references --------------------------------------------------


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _score(tmp_path, benchmark, refs, preds):
    out = tmp_path / "out"
    argv = ["--benchmark", benchmark, "--predictions", _write(tmp_path / "preds.jsonl", preds),
            "--references", _write(tmp_path / "refs.jsonl", refs), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "scores.json").read_text()), json.loads((out / "report.json").read_text())


def test_eval_run_docvqa_anls(tmp_path):
    refs = [{"id": 1, "answers": ["hello", "hi"]}, {"id": 2, "answers": ["abc"]}, {"id": 3, "suffix": "cd"}]
    preds = [{"id": 1, "prediction": "Hallo"}, {"id": 2, "prediction": "abc"}, {"id": 3, "prediction": "ab"}]
    scores, report = _score(tmp_path, "docvqa", refs, preds)
    assert scores["docvqa/validation/anls"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    assert report["scored"] == 3 and report["bad_references"] == []


def test_eval_run_chartqa_relaxed_accuracy(tmp_path):
    refs = [{"id": "a", "answers": ["12.5"]}, {"id": "b", "answers": ["12"]},
            {"id": "c", "answers": ["1,000"]}, {"id": "d", "answers": ["Yes"]}]  # fmt: skip
    preds = [{"id": "a", "prediction": "12"}, {"id": "b", "prediction": "10"},
             {"id": "c", "prediction": "1000"}, {"id": "d", "prediction": "yes"}]  # fmt: skip
    scores, _ = _score(tmp_path, "chartqa", refs, preds)
    assert scores["chartqa/test/relaxed_accuracy"] == pytest.approx(2 / 4)  # a, d
    assert scores["chartqa/test/exact_match"] == pytest.approx(1 / 4)  # d


def test_eval_run_ai2d_and_scienceqa_multiple_choice(tmp_path):
    refs = [{"id": 1, "answers": ["mouse"], "question_type": "parts"},
            {"id": 2, "answers": ["stage b"], "question_type": "life cycle"},
            {"id": 3, "answers": ["leaf"], "question_type": "parts"}]  # fmt: skip
    preds = [
        {"id": 1, "prediction": "mouse"},
        {"id": 2, "prediction": "stage c"},
        {"id": 3, "prediction": "Leaf"},
    ]
    scores, _ = _score(tmp_path, "ai2d", refs, preds)
    assert scores["ai2d/test/accuracy"] == pytest.approx(2 / 3)
    assert scores["ai2d/test/accuracy/parts"] == pytest.approx(1.0)
    assert scores["ai2d/test/accuracy/life_cycle"] == pytest.approx(0.0)

    refs = [{"id": 1, "suffix": "The answer is A."}, {"id": 2, "suffix": "The answer is C."}]
    preds = [{"id": 1, "prediction": "The answer is A."}, {"id": 2, "prediction": "C"}]
    (tmp_path / "sqa").mkdir()
    scores, _ = _score(tmp_path / "sqa", "scienceqa", refs, preds)
    assert scores["scienceqa/test/accuracy"] == pytest.approx(1 / 2)
    assert not any(key.startswith("scienceqa/test/accuracy/") for key in scores)
