"""data_prep/create_vqa_dataset.py on tiny stand-ins of the official TextVQA, DocVQA, ChartQA, AI2D and
ScienceQA releases, built here with PIL.

Expected prompts are transcribed from big_vision (configs/proj/paligemma/transfers/ai2d.py:
PREFIX 'answer en ' + ' ' + question + ' choose from: ' + options joined by ' \\t '; science_qa.py's
QCM -> A format over datasets/science_qa/science_qa.py's `indexed_choices` / `indexed_answer`, an
empty hint written 'N/A'), and every other value is worked out by hand from the stand-in files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # data_prep/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(REPO))

from data_prep.create_vqa_dataset import main  # noqa: E402

COLOR = (120, 30, 200)


def _image(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOR).save(path)
    return path


def _json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _opens(out: Path, record: dict) -> tuple[int, int]:
    with Image.open(out / record["image"]) as image:
        return image.size


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------ TextVQA
TEXTVQA_ANSWERS = ["phone", "nokia", "Nokia", "nokia", "Nokia", "nokia", "Nokia", "phone", "x", "y"]


def _textvqa(root: Path) -> None:
    _json(root / "TextVQA_0.5.1_train.json", {"data": [
        {"question_id": 7, "question": "what brand?", "image_id": "aa01", "answers": TEXTVQA_ANSWERS},
    ]})  # fmt: skip
    _json(root / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 34602, "question": "what is written?", "image_id": "bb02", "answers": ["stop"] * 10},
    ]})  # fmt: skip
    _json(root / "TextVQA_0.5.1_test.json", {"data": [
        {"question_id": 99, "question": "what time?", "image_id": "cc03"},
    ]})  # fmt: skip
    _image(root / "train_images" / "aa01.jpg")
    _image(root / "train_images" / "bb02.jpg")
    _image(root / "test_images" / "cc03.jpg")


def test_textvqa_suffix_tie_first_given_splits_and_paths(tmp_path, capsys):
    root, out = tmp_path / "textvqa", tmp_path / "out"
    _textvqa(root)
    code, _, err = _run(capsys, "--format", "textvqa", "--root", root, "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    (train,) = _lines(out / "train.jsonl")
    # nokia 3, Nokia 3, phone 2: the tie goes to "nokia", given before "Nokia" (alphabetical would pick
    # "Nokia"; "the first answer" would pick "phone")
    assert train["suffix"] == "nokia"
    assert train["answers"] == TEXTVQA_ANSWERS
    assert train["question"] == "what brand?" and "prefix" not in train  # the recipe's template fills it
    assert train["id"] == 7 and train["image_id"] == "aa01"
    assert train["image"] == "../textvqa/train_images/aa01.jpg"  # relative to the JSONL, as od_dataset
    (val,) = _lines(out / "validation.jsonl")
    assert val["image"] == "../textvqa/train_images/bb02.jpg"  # val shares train_images
    assert _opens(out, val) == (40, 30)
    (test,) = _lines(out / "test.jsonl")
    assert test["image"] == "../textvqa/test_images/cc03.jpg"
    assert "suffix" not in test and "answers" not in test
    assert json.loads((out / "test_summary.json").read_text())["unlabelled"] == 1


def test_textvqa_rotation_csv_turns_images_counter_clockwise(tmp_path, capsys):
    root, out = tmp_path / "textvqa", tmp_path / "out"
    _textvqa(root)
    # 64 x 32, four flat quadrants (flat 16 px blocks survive JPEG): red green / blue white
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:16, :32], pixels[:16, 32:] = (255, 0, 0), (0, 255, 0)
    pixels[16:, :32], pixels[16:, 32:] = (0, 0, 255), (255, 255, 255)
    Image.fromarray(pixels).save(root / "train_images" / "aa01.jpg", quality=100)
    (root / "train_images" / "rotation.csv").write_text(
        "ImageID,Subset,Rotation\naa01,train,90.0\nbb02,train,\n", encoding="utf-8"
    )
    code, _, err = _run(capsys, "--format", "textvqa", "--root", root, "--out", out, "--splits", "train,validation")
    assert code == 0, err
    (train,) = _lines(out / "train.jsonl")
    assert train["image"] == "images/textvqa-rotated/aa01.jpg"
    (val,) = _lines(out / "validation.jsonl")
    assert val["image"] == "../textvqa/train_images/bb02.jpg"  # blank Rotation: as stored
    assert not (out / "test.jsonl").exists()  # --splits left it out
    with Image.open(out / train["image"]) as image:
        turned = np.asarray(image.convert("RGB")).astype(int)
    expected = np.rot90(pixels, 1).astype(int)  # tf.image.rot90(image, 1): counter-clockwise, as np.rot90
    assert turned.shape == (64, 32, 3)
    for y, x in ((8, 8), (8, 24), (40, 8), (40, 24), (56, 24)):
        assert np.abs(turned[y, x] - expected[y, x]).max() < 16, (y, x)
    assert json.loads((out / "train_summary.json").read_text())["rotated"] == 1


# ------------------------------------------------------------------------------------------ DocVQA
def _docvqa(root: Path) -> None:
    _json(root / "val" / "val_v1.0_withQT.json", {"dataset_split": "val", "data": [
        {"questionId": 49153, "question": "What is the date?", "image": "documents/ab12.png", "docId": 14465,
         "answers": ["1/8/93", "January 8, 1993"], "question_types": ["others"]},
        {"questionId": 49154, "question": "Who signed?", "image": "documents/missing.png", "docId": 14466,
         "answers": ["J. Doe"]},
    ]})  # fmt: skip
    _image(root / "val" / "documents" / "ab12.png")
    _json(root / "test" / "test_v1.0.json", {"dataset_split": "test", "data": [
        {"questionId": 57344, "question": "What is the total?", "image": "documents/cd34.png", "docId": 1},
    ]})  # fmt: skip
    _image(root / "test" / "documents" / "cd34.png")


def test_docvqa_prefix_is_the_question_first_answer_and_missing_image_listed(tmp_path, capsys):
    root, out = tmp_path / "docvqa", tmp_path / "out"
    _docvqa(root)
    code, _, err = _run(capsys, "--format", "docvqa", "--root", root, "--out", out)
    assert code == 0, err
    (val,) = _lines(out / "validation.jsonl")
    assert val == {
        "image": "../docvqa/val/documents/ab12.png", "prefix": "What is the date?", "question": "What is the date?",
        "suffix": "1/8/93", "answers": ["1/8/93", "January 8, 1993"], "id": 49153, "doc_id": 14465,
    }  # fmt: skip
    summary = json.loads((out / "validation_summary.json").read_text())
    assert summary["records_read"] == 2 and summary["records_written"] == 1
    assert summary["missing_image"] == 1
    assert summary["missing_images"] == [str(root / "val" / "documents" / "missing.png")]
    (test,) = _lines(out / "test.jsonl")
    assert "suffix" not in test and test["prefix"] == "What is the total?" and _opens(out, test) == (40, 30)


def test_docvqa_printed_summary_names_the_skips(tmp_path, capsys):
    root, out = tmp_path / "docvqa", tmp_path / "out"
    _docvqa(root)
    assert main(["--format", "docvqa", "--root", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "validation: 1/2 questions written" in printed
    assert "missing_image: 1" in printed and "missing.png" in printed


# ------------------------------------------------------------------------------------------ ChartQA
def _chartqa(root: Path) -> None:
    _json(root / "train" / "train_human.json", [
        {"imgname": "h1.png", "query": "Which year is highest?", "label": "2014"},
        {"imgname": "h2.png", "query": "What is the gap?", "label": "3.5"},
    ])  # fmt: skip
    _json(root / "train" / "train_augmented.json", [{"imgname": "a1.png", "query": "What is the max?", "label": "12"}])
    _json(root / "test" / "test_human.json", [{"imgname": "t1.png", "query": "How many bars?", "label": "4"}])
    _json(root / "test" / "test_augmented.json", [{"imgname": "t2.png", "query": "Value of A?", "label": 17}])
    for split, names in (("train", ("h1", "h2", "a1")), ("test", ("t1", "t2"))):
        for name in names:
            _image(root / split / "png" / f"{name}.png")


def test_chartqa_union_and_subset_files(tmp_path, capsys):
    root, out = tmp_path / "ChartQA Dataset", tmp_path / "out"
    _chartqa(root)
    code, _, err = _run(capsys, "--format", "chartqa", "--root", root, "--out", out)
    assert code == 0, err
    train = _lines(out / "train.jsonl")
    assert [(r["question"], r["suffix"], r["subset"]) for r in train] == [
        ("Which year is highest?", "2014", "human"), ("What is the gap?", "3.5", "human"),
        ("What is the max?", "12", "augmented"),
    ]  # fmt: skip
    assert train[0]["prefix"] == "Which year is highest?"  # big_vision: the bare question
    assert train[0]["answers"] == ["2014"] and train[0]["id"] == "train_human-0"
    assert train[0]["image"] == "../ChartQA Dataset/train/png/h1.png"
    assert [r["id"] for r in _lines(out / "train_human.jsonl")] == ["train_human-0", "train_human-1"]
    assert [r["suffix"] for r in _lines(out / "test_augmented.jsonl")] == ["17"]  # a number label as text
    assert [r["suffix"] for r in _lines(out / "test_human.jsonl")] == ["4"]
    assert len(_lines(out / "test.jsonl")) == 2
    assert json.loads((out / "test_summary.json").read_text())["subset_files"] == {
        "test_human": 1, "test_augmented": 1
    }  # fmt: skip


def test_chartqa_copy_images(tmp_path, capsys):
    root, out = tmp_path / "chartqa", tmp_path / "out"
    _chartqa(root)
    code, _, err = _run(capsys, "--format", "chartqa", "--root", root, "--out", out, "--copy-images")
    assert code == 0, err
    first = _lines(out / "train.jsonl")[0]
    assert first["image"] == "images/train/png/h1.png" and _opens(out, first) == (40, 30)


# ------------------------------------------------------------------------------------------ AI2D
def _ai2d(root: Path, correct: object = 2) -> None:
    ai2d = root / "ai2d"
    _json(ai2d / "questions" / "1005.png.json", {"imageName": "1005.png", "questions": {
        "which is the planet?": {"answerTexts": ["sun", "moon", "earth", "star"], "correctAnswer": correct,
                                 "abcLabel": False, "questionId": "1005.png-0"},
        "which label shows the sun?": {"answerTexts": ["A", "B", "C", "D"], "correctAnswer": "1",
                                       "abcLabel": True, "questionId": "1005.png-1"},
    }})  # fmt: skip
    _json(ai2d / "annotations" / "1005.png.json", {"text": {
        "T1": {"rectangle": [[4, 4], [36, 20]], "replacementText": "B", "value": "sun"},
    }})  # fmt: skip
    _image(ai2d / "images" / "1005.png", (60, 40))
    _json(ai2d / "questions" / "2000.png.json", {"imageName": "2000.png", "questions": {
        "what eats grass?": {"answerTexts": ["cow", "lion"], "correctAnswer": 0, "abcLabel": False,
                             "questionId": "2000.png-0"},
    }})  # fmt: skip
    _image(ai2d / "images" / "2000.png")
    (root / "ai2d_test_ids.csv").write_text("2000\n", encoding="utf-8")


def test_ai2d_prefix_exactly_big_vision_and_test_ids(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    _ai2d(root)
    code, _, err = _run(capsys, "--format", "ai2d", "--root", root, "--out", out)
    assert code == 0, err
    plain, abc = _lines(out / "train.jsonl")
    assert plain["prefix"] == "answer en  which is the planet? choose from: sun \t moon \t earth \t star"
    assert plain["suffix"] == "earth"
    assert plain["choices"] == ["sun", "moon", "earth", "star"] and plain["abc_label"] is False
    assert plain["id"] == "1005.png-0" and plain["image"] == "../data/ai2d/images/1005.png"
    assert abc["prefix"] == "answer en  which label shows the sun? choose from: A \t B \t C \t D"
    assert abc["suffix"] == "B"  # correctAnswer "1" (a string, as big_vision's int() reads it)
    (test,) = _lines(out / "test.jsonl")
    assert test["prefix"] == "answer en  what eats grass? choose from: cow \t lion" and test["suffix"] == "cow"


def test_ai2d_abc_image_has_the_text_box_painted_over(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    _ai2d(root)
    code, _, err = _run(capsys, "--format", "ai2d", "--root", root, "--out", out)
    assert code == 0, err
    _, abc = _lines(out / "train.jsonl")
    assert abc["image"] == "images/ai2d-abc/1005.png"
    with Image.open(out / abc["image"]) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape == (40, 60, 3)
    inside = pixels[4:21, 4:37].reshape(-1, 3)
    outside = np.concatenate([pixels[:, 40:].reshape(-1, 3), pixels[25:].reshape(-1, 3)])
    assert (outside == COLOR).all()  # untouched beyond the text box
    assert not (inside == COLOR).all(axis=1).any()  # the box is painted over...
    assert (inside == 255).all(axis=1).sum() > inside.shape[0] // 2  # ...white
    assert (inside.max(axis=1) < 100).any()  # with dark letter pixels on it
    assert json.loads((out / "train_summary.json").read_text())["abc_images"] == 1


def test_ai2d_without_test_ids_all_in_one_split(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    _ai2d(root)
    (root / "ai2d_test_ids.csv").unlink()
    code, _, err = _run(capsys, "--format", "ai2d", "--root", root / "ai2d", "--out", out, "--split", "all")
    assert code == 0, err
    assert [p.name for p in out.glob("*.jsonl")] == ["all.jsonl"]
    assert len(_lines(out / "all.jsonl")) == 3


def test_ai2d_answer_index_out_of_range_names_file_and_question(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    _ai2d(root, correct=4)
    code, _, err = _run(capsys, "--format", "ai2d", "--root", root, "--out", out)
    assert code == 2
    assert "1005.png.json" in err and "questionId 1005.png-0" in err
    assert "'correctAnswer' is 4, out of range for 4 choices" in err
    assert not out.exists()  # checked before anything is written


# ------------------------------------------------------------------------------------------ ScienceQA
def _scienceqa(root: Path, **changes) -> None:
    problems = {
        "12": {"question": "Which is a mammal?", "choices": ["frog", "cat"], "answer": 1, "hint": "",
               "image": "image.png", "split": "train", "lecture": "", "solution": "", "subject": "natural science"},
        "13": {"question": "Which word is a noun?", "choices": ["run", "dog"], "answer": 1, "hint": "",
               "image": None, "split": "train", "lecture": "", "solution": ""},
        "14": {"question": "Which is warmer?", "choices": ["ice", "tea", "snow"], "answer": 1,
               "hint": "Look at the picture.", "image": "image.png", "split": "val", "lecture": "", "solution": ""},
    }  # fmt: skip
    for pid, change in changes.items():
        problems[pid].update(change)
        problems[pid] = {k: v for k, v in problems[pid].items() if v is not ...}
    _json(root / "problems.json", problems)
    _json(root / "pid_splits.json", {"train": ["12", "13"], "val": ["14"], "test": []})
    _image(root / "images" / "train" / "12" / "image.png")
    _image(root / "images" / "val" / "14" / "image.png")


def test_scienceqa_prompt_exactly_big_vision_image_subset_only(tmp_path, capsys):
    root, out = tmp_path / "scienceqa", tmp_path / "out"
    _scienceqa(root)
    code, _, err = _run(capsys, "--format", "scienceqa", "--root", root, "--out", out)
    assert code == 0, err
    (train,) = _lines(out / "train.jsonl")  # pid 13 has no image
    assert train["prefix"] == "Question: Which is a mammal?\nContext: N/A\nOptions: (A) frog, (B) cat\nAnswer:"
    assert train["suffix"] == "The answer is B."
    assert train["id"] == "12" and train["choices"] == ["frog", "cat"]
    assert train["image"] == "../scienceqa/images/train/12/image.png" and _opens(out, train) == (40, 30)
    assert json.loads((out / "train_summary.json").read_text())["no_image"] == 1
    (val,) = _lines(out / "validation.jsonl")
    assert val["prefix"] == (
        "Question: Which is warmer?\nContext: Look at the picture.\nOptions: (A) ice, (B) tea, (C) snow\nAnswer:"
    )
    assert val["suffix"] == "The answer is B."


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"choices": ...}, "pid 12: missing required field 'choices'"),
        ({"answer": 2}, "pid 12: 'answer' is 2, out of range for 2 choices"),
        ({"question": 5}, "pid 12: 'question' must be str, got 5"),
    ],
)
def test_scienceqa_bad_problem_names_file_and_pid(tmp_path, capsys, change, message):
    root, out = tmp_path / "scienceqa", tmp_path / "out"
    _scienceqa(root, **{"12": change})
    code, _, err = _run(capsys, "--format", "scienceqa", "--root", root, "--out", out)
    assert code == 2
    assert str(root / "problems.json") in err and message in err
    assert not out.exists()  # checked before anything is written


# ------------------------------------------------------------------------------------------ bad input
def test_unreadable_json_and_missing_field_name_file_and_record(tmp_path, capsys):
    root, out = tmp_path / "textvqa", tmp_path / "out"
    _textvqa(root)
    (root / "TextVQA_0.5.1_val.json").write_text('{"data": [\n{"question_id": 1,}\n]}', encoding="utf-8")
    code, _, err = _run(capsys, "--format", "textvqa", "--root", root, "--out", out)
    assert code == 2 and "TextVQA_0.5.1_val.json: invalid JSON at line 2" in err
    _json(root / "TextVQA_0.5.1_val.json", {"data": [{"question_id": 34602, "image_id": "bb02", "answers": ["a"]}]})
    code, _, err = _run(capsys, "--format", "textvqa", "--root", root, "--out", out)
    assert code == 2
    assert "TextVQA_0.5.1_val.json: data[0] (question_id 34602): missing required field 'question'" in err


def test_unreadable_image_skipped_and_all_skipped_is_an_error(tmp_path, capsys):
    root, out = tmp_path / "docvqa", tmp_path / "out"
    _docvqa(root)
    (root / "test" / "documents" / "cd34.png").write_bytes(b"not a png")
    code, _, err = _run(capsys, "--format", "docvqa", "--root", root, "--out", out, "--splits", "test")
    assert code == 2 and "no question was written" in err
    summary = json.loads((out / "test_summary.json").read_text())
    assert summary["unreadable_image"] == 1 and summary["unreadable_images"] == [str(root / "test/documents/cd34.png")]
    assert not (out / "test.jsonl").exists()  # no empty file left to train on
    code, _, err = _run(capsys, "--format", "docvqa", "--root", root, "--out", out, "--splits", "train")
    assert code == 2 and "--splits train: not in the input (found: test, validation)" in err


def test_help_explains_each_format(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("TextVQA_0.5.1_{train,val,test}.json", "{split}_v1.0*.json", "{split}_human.json",
                   "ai2d_test_ids.csv", "problems.json", "--split test_human", "sci_qa_choices_shuffle"):  # fmt: skip
        assert needle in text, needle


# ------------------------------------------------------------------------------------------ training and eval read it
def test_records_load_and_score_a_perfect_prediction(tmp_path, capsys):
    from pg_finetune.benchmarks import get_benchmark
    from pg_finetune.data import load_records
    from pg_finetune.evaluate import main as eval_main

    root, out = tmp_path / "scienceqa", tmp_path / "out"
    _scienceqa(root)
    assert main(["--quiet", "--format", "scienceqa", "--root", str(root), "--out", str(out)]) == 0
    records = load_records(str(out), "validation")
    assert len(records) == 1
    record = records[0]
    assert record["prefix"].startswith("Question: Which is warmer?\n") and record["image"].size == (40, 30)
    bench = get_benchmark("scienceqa")
    task, metric = bench.get_task(), bench.get_metric()
    references = [metric.reference(records.rows_meta(0))]
    for prediction, expected in (("The answer is B.", 1.0), ("The answer is A.", 0.0)):
        scored = metric.score([task.parse(prediction)], references, None)
        assert scored.metrics["accuracy"] == expected

    # TextVQA: the recipe's template gives big_vision's prompt
    _textvqa(tmp_path / "textvqa")
    assert main(["--quiet", "--format", "textvqa", "--root", str(tmp_path / "textvqa"), "--out", str(out)]) == 0
    val = load_records(str(out), "validation", default_prefix="answer en {question}")
    assert val.rows_meta(0)["prefix"] == "answer en what is written?" and val.rows_meta(0)["suffix"] == "stop"

    # ChartQA through eval.run's predictions mode, on one test subset file
    chart = tmp_path / "chart_out"
    _chartqa(tmp_path / "chartqa")
    assert main(["--quiet", "--format", "chartqa", "--root", str(tmp_path / "chartqa"), "--out", str(chart)]) == 0
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(json.dumps({"id": "test_augmented-0", "prediction": "17.5"}) + "\n", encoding="utf-8")
    code = eval_main(["--benchmark", "chartqa", "--predictions", str(predictions), "--references",
                      str(chart / "test_augmented.jsonl"), "--split", "test_augmented", "--out", str(tmp_path / "ev"),
                      "--quiet"])  # fmt: skip
    assert code == 0
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert scores["chartqa/test_augmented/relaxed_accuracy"] == 1.0  # 17.5 is within 5% of 17
    assert scores["chartqa/test_augmented/exact_match"] == 0.0
