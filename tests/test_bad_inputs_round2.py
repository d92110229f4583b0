"""Bad inputs, round 2 (issue #14): each pushed through the real command line, exit code and message checked.

- detection targets are checked when records are read (`Task.check_target`, the scorer's parser);
- a recipe key or section written twice, a numeric field out of range, a recipe that is not UTF-8;
- `data.truncation: error` names the record and the fix; a NaN box in COCO / VOC / YOLO input.

Entry points: `pg_finetune.train.main` (recipes/tiny/*.yaml plus overrides) and
`pg_finetune.prep.od_dataset.main`. Every error exits 2 with a message naming file:line, the
record or the key, and never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pg_finetune.prep.od_dataset import main as od_main

ROOT = Path(__file__).resolve().parents[1]
LORA = ROOT / "recipes/tiny/easyvqa_lora.yaml"
DETECT = ROOT / "recipes/tiny/easyvqa_detect.yaml"
GOOD_TARGET = "<loc0100><loc0200><loc0600><loc0700> circle"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(tmp_path: Path, recipe: Path, *overrides: str) -> int:
    from pg_finetune.train import main

    return main(["--recipe", str(recipe), f"training.output_dir={tmp_path / 'run'}", "data.eval_split=null",
                 "eval.before_and_after=false", "training.per_device_train_batch_size=2", "training.max_steps=1",
                 "logging.html_report=false", *overrides])  # fmt: skip


def _detection_data(tmp_path: Path, bad_suffix: str) -> Path:
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "prefix": "detect circle", "suffix": suffix}
            for suffix in (GOOD_TARGET, bad_suffix, GOOD_TARGET)]  # fmt: skip
    return _jsonl(tmp_path / "train.jsonl", rows)


# ------------------------------------------------------------------------------ 5. detection targets
BAD_TARGETS = {
    "loc1024": ("<loc1024><loc0200><loc0600><loc0700> circle", "<loc1024> is outside 0..1023"),
    "loc9999": ("<loc0100><loc9999><loc0600><loc0700> circle", "<loc9999> is outside 0..1023"),
    "three-locs": ("<loc0100><loc0200><loc0600> circle", "3 location tokens, expected 4"),
    "no-locs": ("circle", "no location tokens"),
    "swapped-corners": ("<loc0600><loc0200><loc0100><loc0700> circle", "inverted box"),
    "zero-size": ("<loc0100><loc0200><loc0100><loc0700> circle", "zero-size box"),
    "no-label": ("<loc0100><loc0200><loc0600><loc0700>", "missing label"),
    "second-object": (GOOD_TARGET + " ; <loc0100><loc0200><loc0600> square", "1 of 2 objects malformed"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_a_malformed_detection_target_is_refused_by_file_line(tmp_path, case):
    from pg_finetune.data import BadRecordError, load_records
    from pg_finetune.tasks import get_task

    suffix, says = BAD_TARGETS[case]
    data = _detection_data(tmp_path, suffix)
    check = get_task("detect").check_target
    with pytest.raises(BadRecordError) as err:
        load_records(data, "train", check_target=check)
    text = str(err.value)
    assert "train.jsonl:2" in text and says in text and err.value.field == "suffix", text
    assert "<locY1><locX1><locY2><locX2> label" in text  # the fix: what a target looks like
    ds = load_records(data, "train", check_target=check, skip_bad_records=True)
    assert len(ds) == 2 and ds.skipped == {"malformed target": 1}


@pytest.mark.parametrize("case", ["loc1024", "swapped-corners", "no-label"])
def test_train_main_refuses_a_malformed_detection_target_then_skips_it_when_told(tmp_path, capsys, case):
    suffix, says = BAD_TARGETS[case]
    data = _detection_data(tmp_path, suffix)
    assert _train(tmp_path, DETECT, f"data.train={data}") == 2
    err = capsys.readouterr().err
    assert "train.jsonl:2" in err and says in err and "skip_bad_records" in err and "Traceback" not in err
    assert _train(tmp_path, DETECT, f"data.train={data}", "data.skip_bad_records=true") == 0


def test_targets_of_tasks_without_a_grammar_are_not_checked(tmp_path):
    from pg_finetune.recipe import load_recipe
    from pg_finetune.recipe_data import train_dataset

    data = _detection_data(tmp_path, "<loc1024> is fine as a caption")
    recipe = load_recipe(LORA, [f"data.train={data}", "task.name=caption"])
    assert len(train_dataset(recipe)) == 3


# ------------------------------------------------------------------------------ 7. recipes
def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("name: a\ntraining:\n  learning_rate: 1e-4\n  seed: 3\n  learning_rate: 2e-4\n",
         ["training.learning_rate: written twice (lines 3 and 5)"]),
        ("name: a\ntraining:\n  seed: 3\nmodel:\n  name_or_path: tiny\ntraining:\n  max_steps: 2\n",
         ["section 'training': written twice (lines 2 and 6)"]),
        ("name: a\nname: b\neval:\n  batch_size: 2\n  batch_size: 4\n  batch_size: 8\n",
         ["name: written twice (lines 1 and 2)", "eval.batch_size: written 3 times (lines 4, 5 and 6)"]),
    ],
    ids=["key", "section", "top-level-and-three-times"],
)
def test_train_main_refuses_a_key_written_twice_naming_it_and_its_lines(tmp_path, capsys, text, says):
    recipe = _write(tmp_path / "r.yaml", text)
    assert _train(tmp_path, recipe) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "Traceback" not in err
    for line in says:
        assert line in err, err


def test_the_same_key_in_different_sections_is_not_a_duplicate(tmp_path):
    from pg_finetune.recipe import load_recipe

    recipe = _write(tmp_path / "r.yaml", "name: a\ntask:\n  name: caption\nlogging:\n  run_name: b\n")
    assert load_recipe(recipe).task.name == "caption"


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_train_main_refuses_a_seed_numpy_cannot_take(tmp_path, capsys, seed):
    assert _train(tmp_path, LORA, f"training.seed={seed}") == 2
    err = capsys.readouterr().err
    assert "training.seed: must be in [0, 2**32 - 1]" in err and f"got {seed}" in err and "Traceback" not in err


def test_train_main_refuses_an_integer_too_big_for_64_bits(tmp_path, capsys):
    assert _train(tmp_path, LORA, "training.save_steps=99999999999999999999999") == 2
    err = capsys.readouterr().err
    assert "training.save_steps: expected an integer that fits in 64 bits" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("raw", "line", "column"),
    [
        (b"# caf\xe9 recipe\nname: a\n", 1, 6),  # latin-1 in a comment
        (b"name: a\ntraining:\n  seed: 3\ndescription: na\xefve \xff\n", 4, 16),  # in a value, line 4
    ],
    ids=["comment", "value"],
)
def test_train_main_names_the_line_of_a_byte_that_is_not_utf8(tmp_path, capsys, raw, line, column):
    recipe = _write(tmp_path / "r.yaml", raw)
    assert _train(tmp_path, recipe) == 2
    err = capsys.readouterr().err
    assert f"line {line}: not UTF-8" in err and f"column {column}" in err and str(recipe) in err
    assert "save the recipe as UTF-8" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ 10. tracebacks -> messages
@pytest.mark.parametrize("recipe", [LORA, DETECT], ids=["caption", "detect"])
def test_train_main_truncation_error_names_the_record_and_the_fix(tmp_path, capsys, recipe):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    if recipe == DETECT:
        suffix = " ; ".join([GOOD_TARGET] * 6)  # six objects: about 40 text tokens
        rows = [{"image": "a.png", "prefix": "detect circle", "suffix": suffix}] * 2
        task = "task.name=detect"
    else:
        rows = [{"image": "a.png", "prefix": "caption en", "suffix": " ".join(["red circle"] * 20)}] * 2
        task = "task.name=caption"
    data = _jsonl(tmp_path / "train.jsonl", rows)
    code = _train(tmp_path, recipe, task, f"data.train={data}", "data.max_length=12", "data.truncation=error")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "train.jsonl:" in err and "exceed data.max_length=12" in err, err
    assert "data.truncation: prefix_first" in err and "Traceback" not in err


def _coco_args(tmp_path: Path, bbox: list, *, image: dict | None = None) -> list[str]:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (100, 50)).save(images / "a.png")
    data = {"categories": [{"id": 1, "name": "cat"}],
            "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50, **(image or {})}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 10]},
                            {"id": 6, "image_id": 1, "category_id": 1, "bbox": bbox}]}  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(data))  # json writes NaN and Infinity, and reads them back
    return ["--format", "coco", "--annotations", str(tmp_path / "ann.json"), "--images", str(images)]


def _yolo_args(tmp_path: Path, line: str) -> list[str]:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (100, 50)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_text(f"0 0.5 0.5 0.2 0.2\n{line}\n")
    (tmp_path / "classes.txt").write_text("cat\n")
    return ["--format", "yolo", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
            "--classes", str(tmp_path / "classes.txt")]  # fmt: skip


def _voc_args(tmp_path: Path, width: str, xmin: str) -> list[str]:
    (tmp_path / "images").mkdir()
    (tmp_path / "xml").mkdir()
    Image.new("RGB", (100, 50)).save(tmp_path / "images" / "a.png")
    box = "<bndbox><xmin>{}</xmin><ymin>1</ymin><xmax>20</xmax><ymax>10</ymax></bndbox>"
    (tmp_path / "xml" / "a.xml").write_text(
        f"<annotation><filename>a.png</filename><size><width>{width}</width><height>50</height></size>"
        f"<object><name>cat</name>{box.format(1)}</object><object><name>cat</name>{box.format(xmin)}</object>"
        "</annotation>"
    )
    return ["--format", "voc", "--annotations", str(tmp_path / "xml"), "--images", str(tmp_path / "images")]


NAN_INPUTS = {
    "coco-nan": (lambda p: _coco_args(p, [float("nan"), 0, 10, 10]), "ann.json: annotation id 6: bbox [nan"),
    "coco-inf": (lambda p: _coco_args(p, [0, 0, float("inf"), 10]), "ann.json: annotation id 6: bbox [0, 0, inf"),
    "coco-nan-size": (lambda p: _coco_args(p, [0, 0, 5, 5], image={"width": float("nan")}),
                      "ann.json: images[0] (id 1): width is nan"),
    "yolo-nan": (lambda p: _yolo_args(p, "0 nan 0.5 0.2 0.2"), "a.txt:2: box 'cx cy w h' [nan"),
    "yolo-inf": (lambda p: _yolo_args(p, "0 0.5 0.5 inf 0.2"), "a.txt:2: box 'cx cy w h' [0.5, 0.5, inf"),
    "voc-nan": (lambda p: _voc_args(p, "100", "nan"), "a.xml: object #1: xmin is 'nan'"),
    "voc-nan-size": (lambda p: _voc_args(p, "NaN", "1"), "a.xml: size: width is 'NaN'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(NAN_INPUTS))
def test_od_dataset_names_the_file_and_annotation_of_a_nan_box(tmp_path, capsys, case):
    make_args, says = NAN_INPUTS[case]
    out = tmp_path / "out"
    assert od_main([*make_args(tmp_path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a finite number" in err or "NaN or infinity" in err, err
    assert says in err and "Traceback" not in err and not (out / "train.jsonl").exists(), err
