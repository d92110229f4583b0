"""`python -m eval.run`: scoring a predictions file, and a model run on the tiny model."""

from __future__ import annotations

import json

import pytest

from eval.run import main


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_scoring_a_predictions_file_counts_missing_as_wrong_and_reports_ids(tmp_path, capsys):
    refs = _write(tmp_path / "refs.jsonl", [
        {"id": "a", "answers": ["red"]},
        {"id": "b", "answers": ["yes"]},
        {"id": "c", "answers": ["circle"]},
        {"id": "d", "answers": ["no"]},
    ])
    preds = _write(tmp_path / "preds.jsonl", [
        {"id": "a", "prediction": "Red."},    # right after normalisation
        {"id": "b", "prediction": "no"},      # wrong
        {"id": "zz", "prediction": "blue"},   # unknown id
        {"id": "d"},                          # malformed: no prediction
    ])                                        # c: missing
    out = tmp_path / "out"
    assert main(["--benchmark", "easyvqa", "--predictions", preds, "--references", refs, "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["easyvqa/test/exact_match"] == pytest.approx(1 / 4)
    assert scores["easyvqa/test/exact_match_yes_no"] == pytest.approx(0 / 2)
    assert scores["easyvqa/test/exact_match_other"] == pytest.approx(1 / 2)
    err = capsys.readouterr().err
    assert "missing prediction ids: c, d" in err
    assert "unknown prediction ids: zz" in err
    assert "malformed prediction ids: d" in err


def test_unknown_benchmark_lists_the_valid_ones():
    with pytest.raises(SystemExit, match="valid: .*easyvqa"):
        main(["--benchmark", "easyvq", "--model", "tiny"])


def test_model_run_writes_predictions_and_namespaced_scores(tmp_path):
    out = tmp_path / "out"
    assert main(["--benchmark", "easyvqa", "--model", "tiny", "--limit", "6", "--batch-size", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["prefix"].startswith("answer en ") for r in rows)
    scores = json.loads((out / "scores.json").read_text())
    assert "easyvqa/test/exact_match" in scores
