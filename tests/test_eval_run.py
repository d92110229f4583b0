"""`python -m eval.run`: scoring a predictions file, and a model run on the tiny model."""

from __future__ import annotations

import json
import re

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


def test_unknown_benchmark_lists_the_valid_ones(capsys):
    assert main(["--benchmark", "easyvq", "--model", "tiny"]) == 2
    assert re.search("valid: .*easyvqa", capsys.readouterr().err)


def test_model_run_writes_predictions_and_namespaced_scores(tmp_path):
    out = tmp_path / "out"
    assert main(["--benchmark", "easyvqa", "--model", "tiny", "--limit", "6", "--batch-size", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["prefix"].startswith("answer en ") for r in rows)
    scores = json.loads((out / "scores.json").read_text())
    assert "easyvqa/test/exact_match" in scores


def test_scoring_writes_a_report_and_needs_both_files(tmp_path):
    refs = _write(tmp_path / "refs.jsonl", [{"id": "a", "answers": ["red"]}])
    preds = _write(tmp_path / "preds.jsonl", [{"id": "a", "prediction": "red"}])
    out = tmp_path / "out"
    assert main(["--benchmark", "vqa", "--predictions", preds, "--references", refs, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scored"] == 1 and report["benchmark"] == "vqa" and report["missing"] == []
    assert json.loads((out / "scores.json").read_text()) == {"vqa/validation/exact_match": 1.0, "vqa/validation/exact_match_other": 1.0}
    with pytest.raises(SystemExit):
        main(["--benchmark", "vqa", "--predictions", preds, "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["--benchmark", "vqa", "--predictions", str(tmp_path / "nope.jsonl"), "--references", refs])


def test_benchmark_without_default_data_asks_for_data(tmp_path, capsys):
    assert main(["--benchmark", "detection", "--model", "tiny", "--out", str(tmp_path)]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_constrained_detection_flag_reaches_generation(tmp_path):
    out = tmp_path / "out"
    argv = ["--benchmark", "detection", "--data", "builtin:easyvqa-detect", "--split", "test", "--limit", "2",
            "--model", "tiny", "--max-new-tokens", "10", "--constrained-detection", "--html-samples", "0",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # Under the grammar the tiny model's output starts with four location tokens and the label.
    assert all(r["raw"].startswith("<loc") and r["prefix"].split()[-1] in r["raw"] for r in rows)
    assert "detection/test/map" in json.loads((out / "scores.json").read_text())
    assert not (out / "detections.html").exists()


def test_an_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a directory")
    for out in (tmp_path / "taken", tmp_path / "taken" / "below"):
        assert main(["--benchmark", "easyvqa", "--model", "tiny", "--limit", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and "Traceback" not in err


def test_config_picks_a_configuration_of_the_data_and_is_refused_where_there_is_none(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "shape.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    repo = tmp_path / "shapes"
    for config, answers in (("one", ["red"]), ("three", ["red", "blue", "green"])):
        (repo / config).mkdir(parents=True)
        _write(repo / config / "test.jsonl", [{"id": f"{config}{k}", "image": str(image), "question": "what colour?",
                                               "answers": [a]} for k, a in enumerate(answers)])  # fmt: skip
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: one\n  default: true\n  data_files:\n  - split: test\n    path: one/test.jsonl\n"
        "- config_name: three\n  data_files:\n  - split: test\n    path: three/test.jsonl\n---\n"
    )
    out = tmp_path / "out"
    common = ["--benchmark", "vqa", "--data", str(repo), "--split", "test", "--model", "tiny", "--prompt",
              "answer en {question}", "--max-new-tokens", "2", "--out", str(out), "--quiet"]  # fmt: skip
    assert main([*common, "--config", "three"]) == 0
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert ids == ["three0", "three1", "three2"]
    assert main(common) == 0  # the README's default configuration
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert ids == ["one0"]
    jsonl = repo / "one" / "test.jsonl"
    assert main([*common[:3], str(jsonl), *common[4:], "--config", "three"]) == 2
    assert "configuration 'three' was asked for" in capsys.readouterr().err
