"""A catalogue of bad inputs, each pushed through a public entry point.

Every case checks that the message names the bad thing (file:line, key, id, field) and that
nothing else is lost (good records still load with skip_bad_records; counts are reported).
Entry points: `load_recipe`, `load_records`, `data_prep/create_od_dataset.py` main, the collator,
`eval.run.main([... --predictions ...])`, and `pg_finetune.train.main`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pg_finetune.collator import PaliGemmaCollator, SequenceTooLongError
from pg_finetune.data import BadRecordError, load_records
from pg_finetune.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # data_prep/ and eval/ are top-level folders, not part of the package
    sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes/tiny/easyvqa_lora.yaml"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _good(tmp_path: Path, name: str = "good.png") -> str:
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / name)
    return name


def _row(image: str, **fields) -> dict:
    return {"image": image, "prefix": "caption en", "suffix": "a shape", **fields}


# ------------------------------------------------------------------------------------------ images
def test_corrupt_image_bytes_name_the_line_and_file_and_others_still_load(tmp_path, caplog):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    data = _jsonl(tmp_path / "train.jsonl", [_row(_good(tmp_path)), _row("bad.png"), _row("good.png")])
    ds = load_records(data, "train")  # text checks only: images decode lazily
    with pytest.raises(BadRecordError) as err:
        ds[1]
    assert "train.jsonl:2" in str(err.value) and "bad.png" in str(err.value) and "cannot be decoded" in str(err.value)
    ds = load_records(data, "train", skip_bad_records=True)
    assert [ds[i] is None for i in range(3)] == [False, True, False]
    assert ds.skipped == {"image cannot be decoded": 1}
    assert "train.jsonl:2" in caplog.text


def test_missing_image_file_is_found_at_load_time_with_counts(tmp_path):
    rows = [_row(_good(tmp_path)), _row("nope.png"), _row("good.png"), _row("gone.jpg")]
    data = _jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(BadRecordError) as err:
        load_records(data, "train")
    text = str(err.value)
    assert "2 bad records" in text and "train.jsonl:2" in text and "nope.png" in text
    assert "train.jsonl:4" in text and "gone.jpg" in text and "skip_bad_records" in text
    ds = load_records(data, "train", skip_bad_records=True)
    assert len(ds) == 2 and ds.skipped == {"image file not found": 2}


def _mode_images(tmp_path: Path) -> dict[str, tuple[str, tuple[int, int, int]]]:
    """file -> (mode written, the RGB pixel expected at (0, 0))."""
    Image.new("L", (8, 8), 128).save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: white after compositing
    rgba.save(tmp_path / "rgba.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # red in CMYK
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 1 = blue
    palette.save(tmp_path / "palette.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "sixteen.png")  # 16-bit white
    return {
        "gray.png": ("L", (128, 128, 128)),
        "rgba.png": ("RGBA", (255, 255, 255)),
        "cmyk.jpg": ("CMYK", (255, 0, 0)),
        "palette.png": ("P", (0, 0, 255)),
        "sixteen.png": ("I;16", (255, 255, 255)),
    }


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "cmyk.jpg", "palette.png", "sixteen.png"])
def test_odd_image_modes_load_as_rgb_with_the_right_colours(tmp_path, name):
    expected_mode, pixel = _mode_images(tmp_path)[name]
    with Image.open(tmp_path / name) as im:
        assert im.mode.startswith(expected_mode[:4]) or im.mode == "I"  # really written in that mode
    ds = load_records(_jsonl(tmp_path / "train.jsonl", [_row(name)]), "train")
    image = ds[0]["image"]
    assert image.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((0, 0)), pixel, strict=True)), image.getpixel((0, 0))


def test_a_very_large_image_works_and_a_giant_one_is_a_clear_error(tmp_path):
    Image.new("RGB", (8000, 8000), (0, 0, 255)).save(tmp_path / "big.png", compress_level=1)  # 64 Mpx > PIL's bomb warning
    # 20000 x 20000 (400 Mpx): over MAX_PIXELS and over PIL's own DecompressionBombError limit
    Image.new("1", (20000, 20000)).save(tmp_path / "giant.png", compress_level=1)
    data = _jsonl(tmp_path / "train.jsonl", [_row("big.png"), _row("giant.png")])
    ds = load_records(data, "train")
    assert ds[0]["image"].size == (8000, 8000) and ds[0]["image"].getpixel((7999, 7999)) == (0, 0, 255)
    with pytest.raises(BadRecordError) as err:
        ds[1]
    text = str(err.value)
    assert "train.jsonl:2" in text and "20000 x 20000" in text and "downscale" in text
    assert "DecompressionBomb" not in text and not isinstance(err.value.__cause__, Image.DecompressionBombError)


# ------------------------------------------------------------------------------------------ text fields
@pytest.mark.parametrize(
    ("row", "field", "says"),
    [
        ({"image": "good.png", "suffix": "x"}, "prefix", "missing prefix"),
        ({"image": "good.png", "prefix": "caption en"}, "suffix", "missing suffix"),
        ({"image": "good.png", "prefix": "caption en", "suffix": "   "}, "suffix", "empty suffix"),
    ],
    ids=["missing-prefix", "missing-suffix", "empty-suffix"],
)
def test_missing_or_empty_text_fields_name_line_and_field(tmp_path, row, field, says):
    data = _jsonl(tmp_path / "train.jsonl", [_row(_good(tmp_path)), row, _row("good.png")])
    with pytest.raises(BadRecordError) as err:
        load_records(data, "train")
    assert "train.jsonl:2" in str(err.value) and says in str(err.value) and err.value.field == field
    ds = load_records(data, "train", skip_bad_records=True)
    assert len(ds) == 2 and sum(ds.skipped.values()) == 1


@pytest.fixture(scope="module")
def processor():
    from pg_finetune.model import load_processor

    return load_processor("tiny")


def test_suffix_longer_than_max_length_errors_by_record_or_keeps_eos(processor):
    long_suffix = " ".join(["red circle"] * 40)
    record = {"image": Image.new("RGB", (32, 32)), "prefix": "caption en", "suffix": long_suffix,
              "where": "data/train.jsonl:7"}
    with pytest.raises(SequenceTooLongError) as err:
        PaliGemmaCollator(processor, max_length=16, truncation="error")([record])
    assert "data/train.jsonl:7" in str(err.value) and "data.max_length=16" in str(err.value)
    collator = PaliGemmaCollator(processor, max_length=16, truncation="prefix_first")
    batch = collator([record])
    text_tokens = int(batch["attention_mask"].sum()) - collator.image_seq_length
    assert text_tokens == 16
    labels = batch["labels"][0]
    assert int(labels[labels != -100][-1]) == processor.tokenizer.eos_token_id  # eos kept
    assert collator.stats.truncated_prefix == 1 and collator.stats.truncated_suffix == 1


# ------------------------------------------------------------------------------------------ detection data
def _coco(tmp_path: Path, categories: list[dict], annotations: list[dict]) -> list[str]:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (100, 50)).save(images / "a.png")
    data = {"categories": categories, "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}],
            "annotations": annotations}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return ["--format", "coco", "--annotations", str(tmp_path / "ann.json"), "--images", str(images),
            "--out", str(tmp_path / "out"), "--quiet"]


@pytest.mark.parametrize(
    ("bbox", "category", "counter"),
    [([90, 40, 30, 30], 1, "clipped"), ([10, 10, 0, 5], 1, "zero_area"), ([0, 0, 10, 10], 7, "unknown_category")],
    ids=["box-outside-image", "zero-area-box", "unknown-category"],
)
def test_bad_boxes_are_counted_and_the_good_ones_kept(tmp_path, bbox, category, counter):
    from data_prep.create_od_dataset import main as create_od_main

    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 10]},
                   {"id": 2, "image_id": 1, "category_id": category, "bbox": bbox}]
    assert create_od_main(_coco(tmp_path, [{"id": 1, "name": "cat"}], annotations)) == 0
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary[counter] == 1 and summary["images_written"] == 1
    record = json.loads((tmp_path / "out" / "train.jsonl").read_text())
    if counter == "clipped":  # x 90..120 in a 100 px image: clipped to 90..100
        assert len(record["boxes"]) == 2 and record["boxes"][1] == [90.0, 40.0, 100.0, 50.0]
    else:
        assert record["boxes"] == [[0.0, 0.0, 20.0, 10.0]]


def test_a_class_name_with_a_semicolon_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    from data_prep.create_od_dataset import main as create_od_main

    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 10]},
                   {"id": 2, "image_id": 1, "category_id": 2, "bbox": [5, 5, 20, 10]}]
    args = _coco(tmp_path, [{"id": 1, "name": "cat"}, {"id": 2, "name": "salt;pepper"}], annotations)
    assert create_od_main(args) == 2
    err = capsys.readouterr().err
    assert "'salt;pepper'" in err and "image id 1" in err and "--class-map 'salt;pepper=salt pepper'" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "train.jsonl").exists()
    # the suggested fix works
    assert create_od_main([*args, "--class-map", "salt;pepper=salt pepper"]) == 0
    record = json.loads((tmp_path / "out" / "train.jsonl").read_text())
    assert record["prefix"] == "detect cat ; salt pepper"


# ------------------------------------------------------------------------------------------ recipes
def _recipe_error(*overrides: str) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, list(overrides))
    return str(err.value)


def test_unknown_recipe_key_is_named_with_a_suggestion():
    text = _recipe_error("training.learning_rat=1e-4")
    assert "training.learning_rat" in text and "learning_rate" in text


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("training:\n  lerning_rate: 0.1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and "training.lerning_rate" in str(err.value)


def test_wrong_type_is_named():
    text = _recipe_error("training.per_device_train_batch_size=four")
    assert "training.per_device_train_batch_size" in text and "expected an integer" in text and "'four'" in text


def test_out_of_range_learning_rate_is_named():
    text = _recipe_error("training.learning_rate=5")
    assert "training.learning_rate" in text and "got 5" in text


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    text = _recipe_error("tuning.method=qlora")
    assert "tuning.method" in text and "bitsandbytes" in text and "pip install" in text


def test_flash_attention_2_is_refused_with_the_reason():
    text = _recipe_error("model.attn_implementation=flash_attention_2")
    assert "model.attn_implementation" in text and "prefix-LM mask" in text and "sdpa" in text


# ------------------------------------------------------------------------------------------ training entry
def _train(tmp_path: Path, *overrides: str) -> int:
    from pg_finetune.train import main

    return main(["--recipe", str(RECIPE), f"training.output_dir={tmp_path / 'run'}", "data.eval_split=null",
                 "eval.before_and_after=false", "task.name=caption", "training.per_device_train_batch_size=2",
                 "training.max_steps=1", *overrides])


def test_train_main_names_a_missing_image_and_trains_on_the_rest_when_told(tmp_path, capsys):
    data = _jsonl(tmp_path / "train.jsonl", [_row(_good(tmp_path)), _row("missing.png"), _row("good.png")])
    assert _train(tmp_path, f"data.train={data}") == 2
    err = capsys.readouterr().err
    assert "train.jsonl:2" in err and "missing.png" in err and "Traceback" not in err
    assert _train(tmp_path, f"data.train={data}", "data.skip_bad_records=true") == 0


def test_train_main_bad_recipe_exits_2_naming_every_key(tmp_path, capsys):
    assert _train(tmp_path, "training.learning_rate=0", "model.attn_implementation=flash_attention_2") == 2
    err = capsys.readouterr().err
    assert "training.learning_rate" in err and "model.attn_implementation" in err


def test_train_main_nan_loss_exits_3_naming_the_step(tmp_path, capsys, monkeypatch):
    from transformers import PaliGemmaForConditionalGeneration

    original = PaliGemmaForConditionalGeneration.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:  # the trainer's loss comes from the logits (suffix_loss) or is out.loss
            out.logits = out.logits * float("nan")
            if out.loss is not None:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(PaliGemmaForConditionalGeneration, "forward", forward)
    data = _jsonl(tmp_path / "train.jsonl", [_row(_good(tmp_path))] * 2)
    assert _train(tmp_path, f"data.train={data}") == 3
    err = capsys.readouterr().err
    assert "NaN/inf at step 1" in err and "none saved yet" in err and "learning_rate" in err


# ------------------------------------------------------------------------------------------ eval
def test_malformed_model_output_is_scored_as_wrong_and_listed_by_id(tmp_path, capsys):
    from eval.run import main as eval_main

    refs = [{"id": f"img{i}", "boxes": [[0, 0, 32, 32]], "labels": ["circle"], "width": 64, "height": 64}
            for i in range(3)]
    preds = [
        {"id": "img0", "prediction": "<loc0000><loc0000><loc0511><loc0511> circle"},  # right
        {"id": "img1", "prediction": "<loc12> circle ; <loc0000>"},  # malformed
        {"id": "img2", "prediction": "<loc0000><loc0000><loc1023>"},  # malformed: 3 tokens, no label
        "not json at all",
    ]
    _jsonl(tmp_path / "refs.jsonl", refs)
    (tmp_path / "preds.jsonl").write_text("".join((p if isinstance(p, str) else json.dumps(p)) + "\n" for p in preds))
    code = eval_main(["--benchmark", "detection", "--predictions", str(tmp_path / "preds.jsonl"),
                      "--references", str(tmp_path / "refs.jsonl"), "--out", str(tmp_path / "out"),
                      "--html-samples", "0"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["malformed"] == [f"{tmp_path / 'preds.jsonl'}:4"]  # the unreadable line, by file:line
    assert set(report["problems"]) == {"img1", "img2"}  # by id; img0 is fine
    assert any("<loc12> is not a 4-digit location token" in p for p in report["problems"]["img1"])
    assert report["problems"]["img2"] == ["malformed detection: 3 location tokens, expected 4"]
    assert report["scored"] == 3
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["detection/validation/acc@0.5"] == pytest.approx(1 / 3)  # malformed output counts as wrong
    assert scores["detection/validation/invalid_rate"] == pytest.approx(3 / 4)  # 3 of 4 segments malformed
    assert "img1: malformed detection" in capsys.readouterr().err  # also told on the terminal


def test_detection_fields_that_cannot_make_a_shuffled_suffix_are_named_before_training(tmp_path, capsys):
    # The stored suffix is well formed, but with task.shuffle_objects (on for detect) the suffix is rebuilt
    # from `boxes` every epoch: an inverted box there used to fail inside the DataLoader, unnamed.
    image = _good(tmp_path)
    good = {"boxes": [[4, 4, 20, 20]], "labels": ["cat"], "width": 32, "height": 32}
    bad = {**good, "boxes": [[20, 4, 4, 20]]}  # x1 > x2
    suffix = "<loc0128><loc0128><loc0639><loc0639> cat"  # (4, 4, 20, 20) of 32 px, binned by hand: round(v/32*1023)
    rows = [{**_row(image, **good), "prefix": "detect cat", "suffix": suffix},
            {**_row(image, **bad), "prefix": "detect cat", "suffix": suffix}]  # fmt: skip
    data = _jsonl(tmp_path / "train.jsonl", rows)
    assert _train(tmp_path, f"data.train={data}", "task.name=detect") == 2
    err = capsys.readouterr().err
    assert "train.jsonl:2" in err and "x1 <= x2" in err and "task.shuffle_objects" in err and "Traceback" not in err
    assert "train.jsonl:1" not in err
    assert _train(tmp_path, f"data.train={data}", "task.name=detect", "task.shuffle_objects=false") == 0
