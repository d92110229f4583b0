"""The OCR task (added as one module + one registry line): metrics against jiwer and values worked by hand."""

from __future__ import annotations

import json
import random

import jiwer
import pytest

from eval.run import main as eval_main
from pg_finetune.metrics.text import anls_each, error_rate, levenshtein, text_scores
from pg_finetune.tasks import TASKS, get_task


def test_levenshtein_by_hand():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein(["a", "b"], ["a", "c", "b"]) == 1


def test_corpus_cer_and_wer_equal_jiwer():
    rng = random.Random(0)
    alphabet = "ab c"
    for _ in range(200):
        refs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).strip() or "a" for _ in range(4)]
        preds = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(4)]
        assert error_rate(preds, [[r] for r in refs], words=False) == pytest.approx(jiwer.cer(refs, preds))
        word_refs = [" ".join(r.split()) or "a" for r in refs]
        word_preds = [" ".join(p.split()) for p in preds]
        assert error_rate(word_preds, [[r] for r in word_refs], words=True) == pytest.approx(
            jiwer.wer(word_refs, word_preds)
        )


def test_anls_by_hand():
    # d("helo", "hello") = 1, max len 5 -> NL 0.2 -> 0.8; "xyz" vs "hello": NL 1 >= 0.5 -> 0;
    # case and surrounding spaces are ignored; the best reference counts.
    assert anls_each(["helo", "xyz", " HELLO ", "hallo"], [["hello"], ["hello"], ["hello"], ["world", "hello"]]) == (
        pytest.approx([0.8, 0.0, 1.0, 0.8])
    )
    # NL exactly 0.5 is cut to 0 (the threshold is strict: similarity only when NL < 0.5)
    assert anls_each(["ab"], [["cd"]]) == [0.0] and anls_each(["abcd"], [["abxy"]]) == [0.0]


def test_text_scores_by_hand():
    # "the cat" vs "the cat": exact; "a dgo" vs "a dog": 2 char edits of 5, 1 word edit of 2
    scores = text_scores(["the  cat", "a dgo"], [["the cat"], ["a dog"]])
    assert scores["exact_match"] == 0.5
    assert scores["cer"] == pytest.approx((1 + 2) / (7 + 5))  # "the  cat" has one extra space
    assert scores["wer"] == pytest.approx(1 / 4)
    assert scores["anls"] == pytest.approx((1 - 1 / 8 + 1 - 2 / 5) / 2)


def test_task_is_registered_and_scores_through_eval_run(tmp_path):
    assert TASKS["ocr"] is get_task("ocr") and get_task("ocr").default_prefix == "ocr"
    refs = [{"id": 1, "texts": ["STOP"]}, {"id": 2, "suffix": "ONE WAY"}, {"id": 3, "texts": []}]
    preds = [{"id": 1, "prediction": "STOP"}, {"id": 2, "prediction": "ONE WAV"}]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    out = tmp_path / "out"
    assert eval_main(["--benchmark", "ocr", "--predictions", str(tmp_path / "preds.jsonl"),
                      "--references", str(tmp_path / "refs.jsonl"), "--out", str(out), "--quiet"]) == 0  # fmt: skip
    scores = json.loads((out / "scores.json").read_text())
    assert scores["ocr/validation/exact_match"] == 0.5
    assert scores["ocr/validation/cer"] == pytest.approx(1 / 11)
    report = json.loads((out / "report.json").read_text())
    assert report["bad_references"][0]["id"] == "3"
