"""Every eval benchmark: predictions-file scoring with missing, unknown, empty and malformed input
(hand-computed scores, every problem reported by id), and model runs on the tiny model."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from eval.run import main
from pg_finetune.benchmarks import BENCHMARKS
from pg_finetune.loc import format_detections
from pg_finetune.metrics.captions import caption_scores


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _score(tmp_path, benchmark, refs, preds, *extra, refs_name="refs.jsonl"):
    refs_path = refs if isinstance(refs, str) else _write(tmp_path / refs_name, refs)
    preds_path = _write(tmp_path / "preds.jsonl", preds)
    out = tmp_path / "out"
    argv = ["--benchmark", benchmark, "--predictions", preds_path, "--references", refs_path, "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "scores.json").read_text()), json.loads((out / "report.json").read_text())


def test_registry_holds_every_benchmark():
    # the documented ones (docs/evaluation.md); more may be added with one line each
    assert {
        "cococap", "caption", "detection", "refexp", "vqav2", "count_intersections", "easyvqa", "vqa",
    } <= set(BENCHMARKS)  # fmt: skip


def test_vqav2_official_accuracy_with_missing_unknown_empty_and_malformed(tmp_path, capsys):
    ten = ["2", "2", "3", "4", "4", "4", "4", "4", "4", "4"]
    refs = [
        {"id": 1, "answers": [{"answer": a, "answer_id": k} for k, a in enumerate(ten)], "answer_type": "number"},
        {"id": 2, "answers": ["yes"] * 10, "answer_type": "yes/no"},
        {"id": 3, "answers": ["red"] * 10, "answer_type": "other"},   # missing prediction
        {"id": 4, "answers": ["blue"] * 10, "answer_type": "other"},  # empty prediction
        {"id": 5, "question": "no answers here"},                      # cannot be scored
        "{not json",
    ]
    preds = [
        {"id": 1, "prediction": "Two."},   # 0.6 (see test_metrics)
        {"id": 2, "prediction": "yes"},    # 1
        {"id": 4, "prediction": ""},       # 0
        {"id": 99, "prediction": "cat"},   # unknown
        {"id": 5, "prediction": 3},        # malformed (not a string)
        "garbage",
    ]
    scores, report = _score(tmp_path, "vqav2", refs, preds)
    assert scores["vqav2/validation/accuracy"] == pytest.approx((0.6 + 1 + 0 + 0) / 4)
    assert scores["vqav2/validation/accuracy/number"] == pytest.approx(0.6)
    assert scores["vqav2/validation/accuracy/yes_no"] == pytest.approx(1.0)
    assert scores["vqav2/validation/accuracy/other"] == pytest.approx(0.0)
    assert report["scored"] == 4
    assert report["missing"] == ["3"] and report["empty"] == ["4"] and report["unknown"] == ["99"]
    assert report["malformed"] == ["5", f"{tmp_path / 'preds.jsonl'}:6"]
    bad = {b.get("id", b["line"]): b["problem"] for b in report["bad_references"]}
    assert "answers" in bad["5"] and any("invalid JSON" in p for p in bad.values()) and len(bad) == 2
    err = capsys.readouterr().err
    assert "1 missing prediction ids: 3 (scored as wrong)" in err and "unknown prediction ids: 99" in err


def test_vqav2_refuses_records_with_fewer_than_three_answers(tmp_path, capsys):
    # Under min(#matches / 3, 1) a correct answer against one reference scores 0 (worked by hand:
    # leave the only answer out, 0 matches remain), against two at most 1/3. Such records are refused,
    # by record, with the reason and the way out; the rest are scored as usual.
    refs = [
        {"id": 1, "answers": ["yes"] * 10},
        {"id": 2, "answers": ["cat"]},
        {"id": 3, "answers": ["dog", "dog"]},
        {"id": 4, "answers": ["red", "red", "blue"]},  # three: scored (by hand below)
    ]
    preds = [{"id": k, "prediction": p} for k, p in ((1, "yes"), (2, "cat"), (3, "dog"), (4, "red"))]
    scores, report = _score(tmp_path, "vqav2", refs, preds)
    # id 4 by hand: leave out red -> 1 red left (1/3); again (1/3); leave out blue -> 2 reds (2/3): mean 4/9.
    assert scores["vqav2/validation/accuracy"] == pytest.approx((1 + 4 / 9) / 2)
    assert report["scored"] == 2
    refused = {b["id"]: b["problem"] for b in report["bad_references"]}
    assert set(refused) == {"2", "3"}
    assert all("at least 3" in p and "--benchmark vqa" in p for p in refused.values())
    assert "1 human answer:" in refused["2"] and "2 human answers" in refused["3"]
    assert "--benchmark vqa" in capsys.readouterr().err
    # The same file under exact match scores the single-answer records as right.
    scores, report = _score(tmp_path, "vqa", refs, preds)
    assert report["scored"] == 4 and report["bad_references"] == []


def _karpathy(tmp_path, with_images=False):
    images = []
    captions = {
        "val": [["A man riding a horse.", "a person on a horse"], ["a red ball", "the red ball on grass"],
                ["two dogs playing", "dogs play in the park"]],
        "test": [["a cat on a mat"]],
    }  # fmt: skip
    for split, caps in captions.items():
        for k, sentences in enumerate(caps):
            name = f"COCO_{split}_{k}.png"
            if with_images:
                (tmp_path / "val2014").mkdir(exist_ok=True)
                Image.new("RGB", (40, 30), (40 * k, 90, 200)).save(tmp_path / "val2014" / name)
            images.append({"filepath": "val2014", "filename": name, "split": split, "cocoid": 100 * (split == "val") + k,
                           "sentences": [{"raw": s} for s in sentences]})  # fmt: skip
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return str(path), captions


def test_cococap_scores_a_karpathy_json_as_pycocoevalcap_would(tmp_path):
    refs, captions = _karpathy(tmp_path)
    preds = [{"id": 100, "prediction": "a man riding a horse"}, {"id": 101, "prediction": ""}, {"id": 7, "prediction": "x"}]
    scores, report = _score(tmp_path, "cococap", refs, preds, "--caption-tokenizer", "simple")
    expected = caption_scores(["a man riding a horse", "", ""], captions["val"], tokenizer="simple")
    assert scores == pytest.approx({f"cococap/val/{k}": v for k, v in expected.items()})
    assert list(scores)[0] == "cococap/val/cider"
    assert report["missing"] == ["102"] and report["empty"] == ["101"] and report["unknown"] == ["7"]
    assert report["caption_tokenizer"] == "simple"
    # The test split of the same file, and the JSONL form of references.
    scores, _ = _score(tmp_path, "cococap", refs, [{"id": 0, "prediction": "a cat on a mat"}], "--split", "test")
    assert scores["cococap/test/bleu4"] == pytest.approx(1.0, abs=1e-6)
    jsonl = [{"id": "a", "captions": ["a cat on a mat"]}, {"id": "b", "captions": 5}]
    scores, report = _score(tmp_path, "cococap", jsonl, [{"id": "a", "prediction": "a cat on a mat"}])
    assert scores["cococap/val/rouge_l"] == pytest.approx(1.0) and report["scored"] == 1
    assert report["bad_references"][0]["id"] == "b" and "list of strings" in report["bad_references"][0]["problem"]


def test_caption_accepts_captions_or_suffix_and_reports_bad_references(tmp_path):
    refs = [
        {"id": "a", "captions": ["a blue circle", "blue circle"]},
        {"id": "b", "suffix": "a red square"},
        {"id": "c", "captions": []},            # empty: reported, not scored
        {"id": "d", "captions": [{"x": 1}]},    # not strings
        {"captions": ["no id"]},
    ]
    preds = [{"id": "a", "prediction": "a blue circle"}, {"id": "b", "prediction": "a red square"}]
    scores, report = _score(tmp_path, "caption", refs, preds, "--caption-tokenizer", "simple")
    assert scores["caption/validation/rouge_l"] == pytest.approx(1.0)
    assert report["scored"] == 2 and report["missing"] == []
    assert [b.get("id") for b in report["bad_references"]] == ["c", "d", None]
    assert report["bad_references"][2] == {"line": 5, "problem": "no 'id' field"}


S = 1023  # bin == pixel


def _det(boxes, labels):
    return format_detections(list(zip(boxes, labels, strict=True)), S, S)


def test_detection_scores_malformed_outputs_and_missing_predictions(tmp_path):
    refs = [
        {"id": "i1", "boxes": [[0, 0, 10, 10], [100, 100, 200, 200]], "labels": ["cat", "dog"], "width": S, "height": S},
        {"id": "i2", "boxes": [[0, 0, 100, 100]], "labels": ["cat"], "width": S, "height": S},
        {"id": "i3", "boxes": [[0, 0, 50, 50]], "labels": ["cat"], "width": S, "height": S},          # missing
        {"id": "i4", "boxes": [[0, 0, 5, 5]], "labels": ["cat", "dog"], "width": S, "height": S},     # bad
        {"id": "i5", "boxes": [[0, 0, 5]], "labels": ["cat"], "width": S, "height": S},               # bad
        {"id": "i6", "boxes": [], "labels": [], "height": S},                                         # bad
    ]
    preds = [
        # i1: cat at x5..15 (IoU 1/3), dog exact (IoU 1).
        {"id": "i1", "prediction": "<loc0000><loc0005><loc0010><loc0015> cat ; " + _det([[100, 100, 200, 200]], ["dog"])},
        # i2: cat x0..60 (IoU 0.6) and a malformed segment.
        {"id": "i2", "prediction": "<loc0000><loc0000><loc0100><loc0060> cat ; <loc12> cat"},
    ]
    scores, report = _score(tmp_path, "detection", refs, preds)
    ns = "detection/validation/"
    # GT boxes of i1, i2, i3 have IoUs 1/3, 1, 0.6, 0 (i3's prediction is missing).
    assert scores[ns + "miou"] == pytest.approx((1 / 3 + 1 + 0.6 + 0) / 4)
    assert scores[ns + "acc@0.5"] == pytest.approx(2 / 4)
    assert scores[ns + "acc@0.75"] == pytest.approx(1 / 4)
    assert scores[ns + "precision@0.5"] == pytest.approx(2 / 3)
    assert scores[ns + "invalid_rate"] == pytest.approx(1 / 4)  # 4 segments, 1 malformed
    # mAP by pycocotools: the three boxes are hits only at thresholds their IoU reaches.
    assert 0 < scores[ns + "map"] < scores[ns + "map50"] <= 1
    assert report["missing"] == ["i3"]
    assert list(report["problems"]) == ["i2"] and "malformed detection" in report["problems"]["i2"][0]
    bad = {b["id"]: b["problem"] for b in report["bad_references"]}
    assert set(bad) == {"i4", "i5", "i6"}
    assert "1 boxes but 2 labels" in bad["i4"] and "x1 <= x2" in bad["i5"] and "width" in bad["i6"]
    # No image paths in these references: nothing to draw, and the page is not written.
    assert not (tmp_path / "out" / "detections.html").exists()


def test_detection_page_from_a_predictions_file_with_images(tmp_path):
    Image.new("RGB", (64, 48), "white").save(tmp_path / "a.png")
    refs = [{"id": "a", "image": "a.png", "boxes": [[8, 8, 40, 40]], "labels": ["cat"], "width": 64, "height": 48}]
    text = format_detections([([8, 8, 40, 40], "cat")], 64, 48)
    scores, report = _score(tmp_path, "detection", refs, [{"id": "a", "prediction": text}])
    assert scores["detection/validation/map"] == pytest.approx(1.0)
    page = (tmp_path / "out" / "detections.html").read_text()
    assert 'src="detections/000_a.png"' in page and "cat" in page
    assert (tmp_path / "out" / "detections" / "000_a.png").is_file()


def test_refexp_scores_the_first_box(tmp_path):
    refs = [
        {"id": 1, "box": [0, 0, 100, 100], "width": S, "height": S},
        {"id": 2, "boxes": [[0, 0, 10, 10]], "width": S, "height": S},
        {"id": 3, "box": [0, 0, 10, 10], "width": S, "height": S},       # empty prediction
        {"id": 4, "boxes": [[0, 0, 1, 1], [2, 2, 3, 3]], "width": S, "height": S},  # two boxes: bad
    ]
    preds = [
        # first box x0..60 (IoU 0.6), the second (exact) is ignored
        {"id": 1, "prediction": "<loc0000><loc0000><loc0100><loc0060> the man ; <loc0000><loc0000><loc0100><loc0100> x"},
        {"id": 2, "prediction": "<loc0000><loc0000><loc0010><loc0010> the dog on the left"},
        {"id": 3, "prediction": ""},
    ]
    scores, report = _score(tmp_path, "refexp", refs, preds)
    assert scores == pytest.approx({"refexp/validation/miou": (0.6 + 1 + 0) / 3, "refexp/validation/acc@0.5": 2 / 3,
                                    "refexp/validation/acc@0.75": 1 / 3, "refexp/validation/invalid_rate": 1 / 3})  # fmt: skip
    assert report["empty"] == ["3"] and "no valid box" in report["problems"]["3"][0]
    assert "first is scored" in report["problems"]["1"][0]
    assert [b["id"] for b in report["bad_references"]] == ["4"]


def test_count_intersections_accuracy_per_class(tmp_path):
    refs = [{"id": "a", "count": 0}, {"id": "b", "count": 1}, {"id": "c", "suffix": "1"}, {"id": "d", "count": 2},
            {"id": "e", "count": "many"}]  # fmt: skip
    preds = [{"id": "a", "prediction": "zero"}, {"id": "b", "prediction": "1"}, {"id": "c", "prediction": "two"},
             {"id": "x", "prediction": "2"}]  # fmt: skip
    scores, report = _score(tmp_path, "count_intersections", refs, preds)
    ns = "count_intersections/test/"
    assert scores == pytest.approx({ns + "accuracy": 2 / 4, ns + "accuracy/0": 1.0, ns + "accuracy/1": 0.5,
                                    ns + "accuracy/2": 0.0, ns + "invalid_rate": 1 / 4})  # fmt: skip
    assert report["missing"] == ["d"] and report["unknown"] == ["x"] and report["bad_references"][0]["id"] == "e"


# ---- model runs on the tiny model ----------------------------------------------------------------------


def test_model_run_cococap_from_a_karpathy_json(tmp_path):
    refs, _ = _karpathy(tmp_path, with_images=True)
    out = tmp_path / "out"
    argv = ["--benchmark", "cococap", "--model", "tiny", "--data", refs, "--limit", "2", "--max-new-tokens", "4",
            "--batch-size", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["100", "101"] and all(r["prefix"] == "caption en" for r in rows)
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) == {"cococap/val/cider", "cococap/val/bleu4", "cococap/val/rouge_l"}
    report = json.loads((out / "report.json").read_text())
    assert report["scored"] == 2 and report["missing"] == [] and report["examples_per_second"] > 0
    # predictions.jsonl scores again as a predictions file, to the same numbers.
    rescored, _ = _score(tmp_path, "cococap", refs, rows, "--split", "val[:2]")
    assert rescored == pytest.approx(scores)


def test_model_run_detection_writes_html_with_boxes(tmp_path):
    colours = ["red", "blue", "green"]
    records = []
    for k, colour in enumerate(colours):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{k}.png")
        records.append({"image": f"{k}.png", "boxes": [[4, 4, 30, 30]], "labels": ["square"], "width": 64, "height": 64})
    records[2]["prefix"] = "detect square ; circle"
    data = _write(tmp_path / "det.jsonl", records)
    out = tmp_path / "out"
    argv = ["--benchmark", "detection", "--model", "tiny", "--data", data, "--max-new-tokens", "6", "--out", str(out),
            "--html-samples", "2"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prefix"] for r in rows] == ["detect square", "detect square", "detect square ; circle"]
    scores = json.loads((out / "scores.json").read_text())
    for key in ("miou", "acc@0.5", "acc@0.75", "precision@0.5", "recall@0.5", "invalid_rate", "map", "map50"):
        assert f"detection/validation/{key}" in scores
    page = (out / "detections.html").read_text()
    pngs = sorted(p.name for p in (out / "detections").iterdir())
    assert len(pngs) == 2 and all(f'src="detections/{name}"' in page for name in pngs)
    drawn = Image.open(out / "detections" / pngs[0]).convert("RGB")
    assert drawn.size == (320, 320)  # enlarged 5x; the true box's edge is drawn in green at x = 4 * 5
    assert drawn.getpixel((20, 60)) == (30, 170, 60)


@pytest.mark.parametrize(
    ("benchmark", "refs", "preds", "expected"),
    [
        # references of another benchmark: captions given to the detection benchmark
        ("detection", [{"id": 1, "captions": ["a cat"]}, {"id": 2, "captions": ["a dog"]}],
         [{"id": 1, "prediction": "a cat"}], "no reference row could be scored"),
        # count references given to vqav2 (no answers)
        ("vqav2", [{"id": 1, "count": 2}], [{"id": 1, "prediction": "2"}], "no reference row could be scored"),
        # an empty predictions file
        ("vqa", [{"id": 1, "answers": ["yes"]}], [], "holds no prediction"),
        # predictions of other ids (another split's)
        ("count_intersections", [{"id": "a", "count": 1}], [{"id": "z", "prediction": "1"}], "has no id of the references"),
    ],
)  # fmt: skip
def test_nothing_to_score_is_refused_not_scored_zero(tmp_path, capsys, benchmark, refs, preds, expected):
    argv = ["--benchmark", benchmark, "--predictions", _write(tmp_path / "preds.jsonl", preds),
            "--references", _write(tmp_path / "refs.jsonl", refs), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out" / "scores.json").exists()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert expected in report["refused"]


def test_non_utf8_prediction_and_reference_lines_are_reported_by_line(tmp_path):
    (tmp_path / "preds.jsonl").write_bytes(b'{"id": 1, "prediction": "yes"}\n{"id": 2, "prediction": "n\xffo"}\n')
    (tmp_path / "refs.jsonl").write_bytes(b'{"id": 1, "answers": ["yes"]}\n{"id": 2, "answers": ["\xc3"]}\n')
    out = tmp_path / "out"
    argv = ["--benchmark", "vqa", "--predictions", str(tmp_path / "preds.jsonl"), "--references",
            str(tmp_path / "refs.jsonl"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["malformed"] == [f"{tmp_path / 'preds.jsonl'}:2"]
    assert report["bad_references"] == [{"line": 2, "problem": "not UTF-8 (byte 0xc3 at column 24)"}]
