"""Record loading: sources, splits, validation, lazy image decoding and odd image modes.

Fixtures are written with PIL into tmp_path; nothing binary is committed. The built-in
easy-vqa source is checked against the package's own question files.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pg_finetune import images as images_module
from pg_finetune.data import BadRecordError, RecordDataset, load_records, parse_split, split_indices
from pg_finetune.images import open_image


# ------------------------------------------------------------------------------------------ helpers
def _png(path: Path, color=(200, 30, 30), size=(8, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    """Dicts become JSON lines; strings are written as they are (blank or broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


@pytest.fixture
def jsonl_dataset(tmp_path):
    """Two good records (with a blank line between them) whose images sit in imgs/ beside the file."""
    _png(tmp_path / "imgs" / "red.png", (200, 30, 30))
    _png(tmp_path / "imgs" / "blue.png", (10, 20, 230))
    path = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"image": "imgs/red.png", "prefix": "caption en", "suffix": "a red box"},
            "",
            {
                "image": "imgs/blue.png",
                "prefix": "answer en what color?",
                "suffix": "blue",
                "answers": ["blue", "navy"],
                "boxes": [[1, 2, 3, 4]],
            },
        ],
    )
    return path


def _numbered_jsonl(tmp_path: Path, n: int) -> Path:
    _png(tmp_path / "img.png")
    return _write_jsonl(
        tmp_path / "many.jsonl",
        [{"image": "img.png", "prefix": "caption en", "suffix": f"caption {i}", "n": i} for i in range(n)],
    )


# ------------------------------------------------------------------------------------------ JSONL
def test_jsonl_relative_images_extra_fields_and_where(jsonl_dataset):
    ds = load_records(str(jsonl_dataset))
    assert isinstance(ds, RecordDataset)
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["where"] == f"{jsonl_dataset}:1"
    assert second["where"] == f"{jsonl_dataset}:3"  # line 2 is blank: numbering counts it
    assert first["image"].mode == "RGB" and first["image"].getpixel((0, 0)) == (200, 30, 30)
    assert second["image"].getpixel((0, 0)) == (10, 20, 230)
    assert (first["prefix"], first["suffix"]) == ("caption en", "a red box")
    assert second["answers"] == ["blue", "navy"] and second["boxes"] == [[1, 2, 3, 4]]
    assert first["id"] != second["id"]
    meta = ds.rows_meta(1)
    assert "image" not in meta
    assert meta["answers"] == ["blue", "navy"] and meta["where"] == second["where"]


def test_jsonl_in_directory_is_found_by_split(jsonl_dataset):
    directory = jsonl_dataset.parent
    ds = load_records(directory, "train")  # a Path works as well as a str
    assert len(ds) == 2
    assert ds.rows_meta(0)["where"] == f"{directory / 'train.jsonl'}:1"
    with pytest.raises(ValueError, match="cannot read directory"):
        load_records(str(directory), "validation")


def test_jsonl_split_slicing(tmp_path):
    total = 20
    path = str(_numbered_jsonl(tmp_path, total))
    head = load_records(path, "train[:10]")
    assert [head.rows_meta(i)["n"] for i in range(len(head))] == list(range(10))
    tail = load_records(path, "train[90%:]")
    assert len(tail) == total - int(total * 0.9)
    assert tail.rows_meta(0)["n"] == int(total * 0.9)
    middle = load_records(path, "train[5:8]")
    assert [middle.rows_meta(i)["where"] for i in range(3)] == [f"{path}:{k}" for k in (6, 7, 8)]
    assert len(load_records(path, "train[:25%]")) == total // 4
    assert len(load_records(path, "train[:1000]")) == total  # clipped like a Python slice


def test_limit_caps_records(tmp_path):
    path = str(_numbered_jsonl(tmp_path, 12))
    ds = load_records(path, "train[2:]", limit=4)
    assert [ds.rows_meta(i)["n"] for i in range(len(ds))] == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="limit"):
        load_records(path, limit=0)


@pytest.mark.parametrize(
    "split", ["train[-5:]", "train[:-10%]", "train[5]", "train[:150%]", "train[a:b]", "", "train[1:2:3]"]
)
def test_malformed_or_negative_split_is_rejected(split):
    with pytest.raises(ValueError, match="split|slice"):
        parse_split(split)


def test_parse_split_and_indices():
    assert parse_split("train") == ("train", slice(None, None))
    assert parse_split("validation[10:20]") == ("validation", slice(10, 20))
    name, part = parse_split("test[:10%]")
    assert name == "test" and list(split_indices(part, 50)) == list(range(5))
    assert split_indices(parse_split("train[90%:]")[1], 100) == range(90, 100)
    assert len(split_indices(parse_split("train[8:3]")[1], 100)) == 0


def test_invalid_json_line(tmp_path):
    _png(tmp_path / "a.png")
    good = {"image": "a.png", "prefix": "caption en", "suffix": "x"}
    path = _write_jsonl(tmp_path / "d.jsonl", [good, '{"image": "a.png", "prefix": ', good])
    with pytest.raises(BadRecordError, match=re.escape(f"{path}:2: invalid JSON")):
        load_records(str(path))
    ds = load_records(str(path), skip_bad_records=True)
    assert len(ds) == 2
    assert ds.skipped["invalid JSON"] == 1
    assert [ds.rows_meta(i)["where"] for i in range(2)] == [f"{path}:1", f"{path}:3"]


# ------------------------------------------------------------------------------------------ text checks
def test_missing_prefix_with_and_without_default(tmp_path):
    _png(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "suffix": "x"}])
    with pytest.raises(BadRecordError, match=re.escape(f"{path}:1: missing prefix")) as info:
        load_records(str(path))
    assert info.value.field == "prefix" and "skip_bad_records" in str(info.value)
    ds = load_records(str(path), default_prefix="caption en")
    assert ds[0]["prefix"] == "caption en"


def test_record_prefix_wins_over_default(jsonl_dataset):
    ds = load_records(str(jsonl_dataset), default_prefix="detect cat")
    assert [ds.rows_meta(i)["prefix"] for i in range(2)] == ["caption en", "answer en what color?"]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"image": "a.png", "prefix": "caption en"}, "missing suffix"),
        ({"image": "a.png", "prefix": "caption en", "suffix": "   "}, "empty suffix"),
    ],
)
def test_missing_or_empty_suffix_depends_on_require_suffix(tmp_path, record, reason):
    _png(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(BadRecordError, match=re.escape(f"{path}:1: {reason}")) as info:
        load_records(str(path))
    assert info.value.field == "suffix" and info.value.reason == reason
    ds = load_records(str(path), require_suffix=False)
    assert len(ds) == 1 and ds[0]["suffix"] is None


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"image": "a.png", "prefix": 3, "suffix": "x"}, "prefix", "prefix must be a string"),
        ({"image": "a.png", "prefix": "p", "suffix": ["x", "y"]}, "suffix", "suffix must be a string"),
        ({"prefix": "p", "suffix": "x"}, "image", "missing image"),
        ({"image": "", "prefix": "p", "suffix": "x"}, "image", "missing image"),
        ({"image": 5, "prefix": "p", "suffix": "x"}, "image", "image must be a path string, got int"),
    ],
)
def test_wrong_field_types_and_missing_image(tmp_path, record, field, message):
    _png(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(BadRecordError, match=re.escape(f"{path}:1: {message}")) as info:
        load_records(str(path))
    assert info.value.field == field


def test_skip_bad_text_records_counts_and_warns_once(tmp_path, caplog):
    _png(tmp_path / "a.png")
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"image": "a.png", "prefix": "p", "suffix": "ok"},
            {"image": "a.png", "prefix": "p"},
            {"image": "a.png", "prefix": "p", "suffix": ""},
            {"image": "a.png", "suffix": "x"},
            {"image": "a.png", "prefix": "p", "suffix": "ok 2"},
        ],
    )
    with pytest.raises(BadRecordError) as info:
        load_records(str(path))
    assert len(info.value.problems) == 3  # every problem reported at once, not just the first
    assert all(f"{path}:{k}" in str(info.value) for k in (2, 3, 4))
    with caplog.at_level(logging.WARNING, logger="pg_finetune.data"):
        ds = load_records(str(path), skip_bad_records=True)
    assert [ds.rows_meta(i)["suffix"] for i in range(len(ds))] == ["ok", "ok 2"]
    assert ds.skipped == {"missing suffix": 1, "empty suffix": 1, "missing prefix": 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{path}:2" in warnings[0].getMessage()


# ------------------------------------------------------------------------------------------ bad images
def test_corrupt_image_fails_lazily_naming_record_and_path(tmp_path):
    _png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"this is not an image at all")
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"image": "good.png", "prefix": "p", "suffix": "s"},
            {"image": "bad.png", "prefix": "p", "suffix": "s"},
        ],
    )
    ds = load_records(str(path))  # loading decodes nothing, so the corrupt file is not noticed yet
    assert len(ds) == 2 and ds[0]["image"].size == (8, 6)
    with pytest.raises(BadRecordError) as info:
        ds[1]
    message = str(info.value)
    assert message.startswith(f"{path}:2: image ") and "bad.png" in message
    assert "cannot be decoded" in message and "skip_bad_records" in message

    skipping = load_records(str(path), skip_bad_records=True)
    assert skipping[1] is None
    assert skipping[1] is None  # read again (a second epoch): still counted once
    assert skipping.skipped == {"image cannot be decoded": 1}
    assert skipping[0] is not None


def test_truncated_image_fails_on_load_not_later(tmp_path):
    rng = np.random.default_rng(0)
    full = tmp_path / "full.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    Image.open(cut)  # the header alone parses fine: only loading the pixels finds the damage
    with pytest.raises(BadRecordError, match=r"rec:7: image .*cut\.png.* cannot be decoded"):
        open_image(cut, where="rec:7")


def test_missing_image_files_are_listed_at_load_time(tmp_path):
    _png(tmp_path / "a.png")
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"image": "a.png", "prefix": "p", "suffix": "s"},
            {"image": "gone/x.png", "prefix": "p", "suffix": "s"},
            {"image": "gone/y.png", "prefix": "p", "suffix": "s"},
        ],
    )
    with pytest.raises(BadRecordError) as info:
        load_records(str(path))
    message = str(info.value)
    for line, name in ((2, "x.png"), (3, "y.png")):
        assert f"{path}:{line}: image file not found: {tmp_path / 'gone' / name}" in message
    ds = load_records(str(path), skip_bad_records=True)
    assert len(ds) == 1 and ds.skipped == {"image file not found": 2}


def test_open_image_missing_file_message(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(BadRecordError, match=re.escape(f"r:1: image file not found: {missing}")):
        open_image(str(missing), where="r:1")


def test_nothing_usable_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "none.png", "prefix": "p", "suffix": "s"}])
    with pytest.raises(ValueError, match="no usable records"):
        load_records(str(path), skip_bad_records=True)


# ------------------------------------------------------------------------------------------ image modes
def _pixel(src) -> tuple[int, int, int]:
    image = open_image(src, where="t")
    assert image.mode == "RGB"
    return image.getpixel((0, 0))


def _saved(tmp_path: Path, image: Image.Image, name: str) -> Path:
    path = tmp_path / name
    image.save(path)
    return path


def test_grayscale_palette_and_one_bit(tmp_path):
    assert _pixel(_saved(tmp_path, Image.new("L", (4, 4), 100), "l.png")) == (100, 100, 100)
    assert _pixel(_saved(tmp_path, Image.new("1", (4, 4), 1), "one.png")) == (255, 255, 255)
    assert _pixel(_saved(tmp_path, Image.new("1", (4, 4), 0), "zero.png")) == (0, 0, 0)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert _pixel(_saved(tmp_path, palette, "p.png")) == (10, 200, 30)


def test_transparency_is_composited_on_white(tmp_path):
    # a transparent pixel's hidden colour (here red/black) must not leak through
    assert _pixel(_saved(tmp_path, Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "clear.png")) == (255, 255, 255)
    assert _pixel(_saved(tmp_path, Image.new("RGBA", (4, 4), (255, 0, 0, 255)), "red.png")) == (255, 0, 0)
    half = _pixel(_saved(tmp_path, Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "half.png"))
    assert all(abs(c - 127) <= 1 for c in half)
    assert _pixel(_saved(tmp_path, Image.new("LA", (4, 4), (0, 0)), "la.png")) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] + [0] * 765)
    palette.info["transparency"] = 0
    path = _saved(tmp_path, palette, "p_clear.png")
    assert Image.open(path).mode == "P"
    assert _pixel(path) == (255, 255, 255)


def test_cmyk(tmp_path):
    assert _pixel(_saved(tmp_path, Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "red.tif")) == (255, 0, 0)
    assert _pixel(_saved(tmp_path, Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "white.tif")) == (255, 255, 255)


@pytest.mark.parametrize(("value", "expected"), [(65535, 255), (32896, 128), (0, 0), (257 * 10, 10)])
def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path, value, expected):
    path = _saved(tmp_path, Image.fromarray(np.full((4, 4), value, dtype=np.uint16)), "g16.png")
    assert Image.open(path).mode.startswith("I;16")
    assert _pixel(path) == (expected,) * 3
    as_int32 = Image.fromarray(np.full((4, 4), value, dtype=np.int32))
    assert as_int32.mode == "I"
    if value > 255:  # an "I" image holding 16-bit values scales the same way
        assert _pixel(as_int32) == (expected,) * 3


def test_float_images():
    assert _pixel(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))) == (128, 128, 128)
    ramp = Image.fromarray(np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(4, 4))
    out = np.asarray(open_image(ramp))
    assert out.min() == 0 and out.max() == 255  # scaled by its range, not clipped at 0


def test_bytes_dict_and_pil_sources(tmp_path):
    path = _png(tmp_path / "c.png", (1, 2, 3))
    data = path.read_bytes()
    assert _pixel(data) == (1, 2, 3)
    assert _pixel({"bytes": data, "path": "ignored.png"}) == (1, 2, 3)
    assert _pixel({"bytes": None, "path": str(path)}) == (1, 2, 3)
    assert _pixel(Image.open(io.BytesIO(data))) == (1, 2, 3)
    with pytest.raises(BadRecordError, match="unsupported type"):
        open_image(12345, where="w")


def test_large_images_open_despite_pil_bomb_limit(tmp_path, monkeypatch):
    path = _png(tmp_path / "big.png", (5, 6, 7), size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px is now a "bomb" to PIL
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert _pixel(path) == (5, 6, 7)
    assert Image.MAX_IMAGE_PIXELS == 1000  # the limit was raised only for our own open
    monkeypatch.setattr(images_module, "MAX_PIXELS", 5000)
    with pytest.raises(BadRecordError, match="100 x 100 pixels"):
        open_image(path, where="w")


# ------------------------------------------------------------------------------------------ datasets
def _tiny_hf_dataset(colors):
    import datasets

    features = datasets.Features(
        {
            "img": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "img": [Image.new("RGB", (5, 5), c) for c in colors],
            "question": [f"answer en q{i}" for i in range(len(colors))],
            "answer": [f"a{i}" for i in range(len(colors))],
            "answers": [[f"a{i}", "other"] for i in range(len(colors))],
        },
        features=features,
    )


def test_save_to_disk_round_trip(tmp_path):
    import datasets

    colors = [(10 * i, 100, 200) for i in range(6)]
    directory = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": _tiny_hf_dataset(colors), "test": _tiny_hf_dataset(colors[:2])}
    ).save_to_disk(str(directory))
    columns = dict(image_column="img", prefix_column="question", suffix_column="answer")
    ds = load_records(str(directory), "train[1:4]", **columns)
    assert len(ds) == 3
    record = ds[0]
    assert record["image"].getpixel((0, 0)) == colors[1]
    assert (record["prefix"], record["suffix"], record["answers"]) == ("answer en q1", "a1", ["a1", "other"])
    assert record["where"] == f"dataset {directory} split train row 1"
    assert "img" not in record and "question" not in record  # renamed columns are not duplicated
    assert len(load_records(str(directory), "test", **columns)) == 2
    assert pickle.loads(pickle.dumps(ds))[2]["image"].getpixel((0, 0)) == colors[3]  # DataLoader workers
    with pytest.raises(ValueError, match="no split 'validation'.*train"):
        load_records(str(directory), "validation", **columns)
    with pytest.raises(ValueError, match="no image column 'image'"):
        load_records(str(directory), "train", prefix_column="question", suffix_column="answer")


def test_hub_style_dataset_with_corrupt_image_bytes(tmp_path):
    import datasets

    good = io.BytesIO()
    Image.new("RGB", (3, 3), (9, 8, 7)).save(good, format="PNG")
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"garbage", "path": None}],
            "prefix": ["caption en", "caption en"],
            "suffix": ["ok", "broken"],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "prefix": datasets.Value("string"),
                "suffix": datasets.Value("string"),
            }
        ),
    )
    table.save_to_disk(str(tmp_path / "single"))
    ds = load_records(str(tmp_path / "single"))  # a single saved Dataset: the split name just names it
    assert ds[0]["image"].getpixel((0, 0)) == (9, 8, 7)
    # images stay undecoded in the table until open_image, so the error is ours and names the row
    with pytest.raises(
        BadRecordError, match=re.escape(f"dataset {tmp_path / 'single'} split train row 1: image")
    ):
        ds[1]
    skipping = load_records(str(tmp_path / "single"), skip_bad_records=True)
    assert skipping[1] is None and skipping.skipped == {"image cannot be decoded": 1}


def test_image_folder_with_metadata(tmp_path):
    folder = tmp_path / "folder"
    _png(folder / "cat.png", (1, 1, 1))
    _png(folder / "sub" / "dog.png", (2, 2, 2))
    _write_jsonl(
        folder / "metadata.jsonl",
        [
            {"file_name": "cat.png", "caption": "a cat", "source": "web"},
            {"file_name": "sub/dog.png", "caption": "a dog", "source": "cam"},
        ],
    )
    ds = load_records(str(folder), suffix_column="caption", default_prefix="caption en")
    assert len(ds) == 2
    dog = ds[1]
    assert dog["image"].getpixel((0, 0)) == (2, 2, 2)
    assert (dog["prefix"], dog["suffix"], dog["source"]) == ("caption en", "a dog", "cam")
    assert dog["where"] == f"{folder / 'metadata.jsonl'}:2" and dog["id"] == "sub/dog.png"

    split_folder = tmp_path / "split_folder"
    _png(split_folder / "test" / "x.png")
    _write_jsonl(split_folder / "test" / "metadata.jsonl", [{"file_name": "x.png", "caption": "x"}])
    test = load_records(str(split_folder), "test", suffix_column="caption", default_prefix="caption en")
    assert len(test) == 1 and test[0]["image"].size == (8, 6)


def test_hub_id_offline_gives_actionable_message(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the libraries read these at import time; set the parsed values too so it fails at once
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as info:
        load_records("some-org/not-a-local-path", "train[:5]")
    message = str(info.value)
    assert "cannot load dataset 'some-org/not-a-local-path' split 'train'" in message
    assert "save_to_disk" in message and "check the id" in message


def test_unknown_sources_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown builtin dataset 'nope'.*builtin:easyvqa"):
        load_records("builtin:nope")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_records(str(tmp_path / "missing.jsonl"))
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match=r"must be \.jsonl"):
        load_records(str(other))


# ------------------------------------------------------------------------------------------ Karpathy JSON
RED, BLUE, GREEN = (200, 30, 30), (10, 20, 230), (20, 200, 40)


def _karpathy_json(path: Path, image_root: Path | None = None) -> Path:
    """Karpathy's dataset_coco.json shape: two train images, one val, one restval; the second train
    image has no `cocoid` and a sentence without `raw`. PNGs go under image_root when given."""
    images = [
        {"filepath": "train2014", "filename": "a.png", "split": "train", "cocoid": 11,
         "sentences": [{"raw": "A red square."}, {"raw": "a red box"}]},
        {"filepath": "train2014", "filename": "b.png", "split": "train",
         "sentences": [{"raw": "a blue square"}, {"tokens": ["no", "raw"]}, {"raw": "blue"}]},
        {"filepath": "val2014", "filename": "c.png", "split": "val", "cocoid": 33, "sentences": [{"raw": "green"}]},
        {"filepath": "val2014", "filename": "d.png", "split": "restval", "cocoid": 44, "sentences": []},
    ]  # fmt: skip
    if image_root is not None:
        for name, color in (("train2014/a.png", RED), ("train2014/b.png", BLUE), ("val2014/c.png", GREEN)):
            _png(image_root / name, color)
        _png(image_root / "val2014" / "d.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images}))
    return path


def test_karpathy_json_gives_one_record_per_image_with_its_first_caption(tmp_path):
    path = _karpathy_json(tmp_path / "dataset_coco.json", image_root=tmp_path)
    train = load_records(path, "train")  # a PathLike works as well as a string
    metas = [train.rows_meta(i) for i in range(len(train))]
    assert [m["id"] for m in metas] == ["11", "b.png"]  # the cocoid, else the filename
    assert [m["suffix"] for m in metas] == ["A red square.", "a blue square"]
    assert [m["captions"] for m in metas] == [["A red square.", "a red box"], ["a blue square", "blue"]]
    assert [m["prefix"] for m in metas] == ["caption en", "caption en"]
    assert [m["where"] for m in metas] == [f"{path} images[0]", f"{path} images[1]"]
    assert train[0]["image"].getpixel((0, 0)) == RED and train[1]["image"].getpixel((0, 0)) == BLUE

    val = load_records(str(path), "val", default_prefix="caption es", require_suffix=False)
    assert len(val) == 1 and val.rows_meta(0)["id"] == "33" and val.rows_meta(0)["prefix"] == "caption es"
    assert val[0]["image"].getpixel((0, 0)) == GREEN
    assert load_records(str(path), "train[1:]").rows_meta(0) == train.rows_meta(1)


def test_karpathy_image_paths_resolve_against_image_root_or_the_json_directory(tmp_path):
    coco = tmp_path / "coco"
    path = _karpathy_json(tmp_path / "annotations" / "dataset_coco.json", image_root=coco)
    with pytest.raises(BadRecordError) as info:  # default root: the JSON's directory, where no image is
        load_records(str(path), "train")
    assert str(tmp_path / "annotations" / "train2014" / "a.png") in str(info.value)
    assert info.value.reason == "image file not found" and info.value.where == f"{path} images[0]"
    for root in (coco, str(coco)):
        ds = load_records(str(path), "train", image_root=root)
        assert ds[0]["image"].getpixel((0, 0)) == RED and ds[1]["image"].getpixel((0, 0)) == BLUE
    # other sources ignore image_root: a JSONL's images stay relative to the file
    _png(tmp_path / "j" / "x.png", GREEN)
    jsonl = _write_jsonl(tmp_path / "j" / "d.jsonl", [{"image": "x.png", "prefix": "p", "suffix": "s"}])
    assert load_records(str(jsonl), image_root=coco)[0]["image"].getpixel((0, 0)) == GREEN


def test_karpathy_all_gives_one_record_per_caption(tmp_path):
    path = _karpathy_json(tmp_path / "dataset_coco.json", image_root=tmp_path)
    ds = load_records(f"karpathy+all:{path}", "train")
    metas = [ds.rows_meta(i) for i in range(len(ds))]
    assert [m["id"] for m in metas] == ["11-0", "11-1", "b.png-0", "b.png-1"]
    assert [m["image_id"] for m in metas] == ["11", "11", "b.png", "b.png"]
    assert [m["suffix"] for m in metas] == ["A red square.", "a red box", "a blue square", "blue"]
    assert metas[3]["where"] == f"{path} images[1] sentences[2]"  # sentences[1] has no raw text
    assert metas[3]["captions"] == ["a blue square", "blue"]
    assert ds[1]["image"].getpixel((0, 0)) == RED and ds[3]["image"].getpixel((0, 0)) == BLUE
    assert len(load_records(f"karpathy+all:{path}", "train[:3]")) == 3  # a slice counts captions


def test_karpathy_image_without_captions_is_a_bad_record_for_training(tmp_path):
    path = _karpathy_json(tmp_path / "dataset_coco.json", image_root=tmp_path)
    for source in (str(path), f"karpathy+all:{path}"):
        with pytest.raises(BadRecordError, match=re.escape(f"{path} images[3]: missing suffix")):
            load_records(source, "restval")
        meta = load_records(source, "restval", require_suffix=False).rows_meta(0)
        assert meta["id"] == "44" and meta["suffix"] is None and meta["captions"] == []


def test_karpathy_bad_files_are_named_in_the_error(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=re.escape(f"{broken}: not a Karpathy caption file: invalid JSON")):
        load_records(str(broken), "train")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{listed}: not a Karpathy caption file (expected")):
        load_records(str(listed), "train")
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"images": [{"split": "train", "filename": "a.png"}, "a.png"]}))
    with pytest.raises(ValueError, match=re.escape(f"{odd} images[1]: not a JSON object")):
        load_records(str(odd), "train")
    path = _karpathy_json(tmp_path / "dataset_coco.json")
    no_split = f"{path}: no images in split 'validation'; splits there: restval, train, val"
    with pytest.raises(ValueError, match=re.escape(no_split)):
        load_records(str(path), "validation")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(f"karpathy+all:{tmp_path / 'missing.json'}", "train")


def test_karpathy_rows_reads_references_without_images(tmp_path):
    from pg_finetune.data import karpathy_rows

    path = _karpathy_json(tmp_path / "dataset_coco.json")  # no image files: none is opened
    rows = karpathy_rows(str(path), "train")
    assert rows[1] == {
        "id": "b.png",
        "image": str(tmp_path / "train2014" / "b.png"),
        "prefix": "caption en",
        "captions": ["a blue square", "blue"],
        "where": f"{path} images[1]",
        "_line": f"{path} images[1]",
    }
    assert [r["id"] for r in karpathy_rows(str(path), "train[1:]")] == ["b.png"]
    assert karpathy_rows(str(path), "val", "/data/coco")[0]["image"] == "/data/coco/val2014/c.png"


# ------------------------------------------------------------------------------------------ easy-vqa
@pytest.fixture(scope="module")
def easyvqa_train():
    return load_records("builtin:easyvqa", "train")


def test_builtin_easyvqa_sizes_and_record_shape(easyvqa_train):
    from easy_vqa import get_train_questions

    assert len(easyvqa_train) == 38575
    assert len(load_records("builtin:easyvqa", "test")) == 9673
    questions, answers, _ = get_train_questions()
    record = easyvqa_train[17]
    assert record["prefix"] == f"answer en {questions[17]}"
    assert record["suffix"] == answers[17] and record["answers"] == [answers[17]]
    assert record["question"] == questions[17]
    assert record["id"] == "easyvqa-train-17" and record["where"] == "builtin:easyvqa train #17"
    assert record["image"].mode == "RGB" and record["image"].size == (64, 64)


def test_builtin_easyvqa_split_slicing(easyvqa_train):
    total = len(easyvqa_train)
    head = load_records("builtin:easyvqa", "train[:10]")
    assert len(head) == 10 and head.rows_meta(9) == easyvqa_train.rows_meta(9)
    tail = load_records("builtin:easyvqa", "train[90%:]")
    assert len(tail) == total - round(total * 0.9)
    assert tail.rows_meta(len(tail) - 1) == easyvqa_train.rows_meta(total - 1)
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_records("builtin:easyvqa", "validation")


def test_builtin_easyvqa_caption_agrees_with_qa():
    from easy_vqa import get_train_image_paths, get_train_questions

    captions = load_records("builtin:easyvqa-caption", "train")
    assert len(captions) == len(get_train_image_paths())
    qa = defaultdict(list)
    for question, answer, image_id in zip(*get_train_questions(), strict=True):
        qa[image_id].append((question, answer))

    checked_full = 0
    for i in range(len(captions)):
        meta = captions.rows_meta(i)
        caption = meta["suffix"]
        assert meta["prefix"] == "caption en" and meta["captions"] == [caption]
        words = caption.split()
        for question, answer in qa[meta["image_id"]]:
            if question.startswith(("what color", "what is the color")) or question.startswith("what shape"):
                assert answer in words, (caption, question, answer)  # the caption states the answer
        colors = [a for q, a in qa[meta["image_id"]] if q.startswith(("what color", "what is the color"))]
        shapes = [a for q, a in qa[meta["image_id"]] if q.startswith("what shape")]
        if colors and shapes:
            assert caption == f"a {colors[0]} {shapes[0]}"
            checked_full += 1
    assert checked_full > 100  # the direct-answer check above covered many images
    first = captions[0]
    assert first["image"].size == (64, 64) and first["where"] == "builtin:easyvqa-caption train #0"


def _independent_shape_box(path: str) -> tuple[int, int, int, int]:
    """The shape's bounding box, computed here separately: background = the corner colour."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    corners = [tuple(pixels[y, x]) for y in (0, -1) for x in (0, -1)]
    background = max(set(corners), key=corners.count)
    mask = np.abs(pixels - np.array(background)).sum(axis=-1) > 0
    rows, cols = np.where(mask.any(axis=1))[0], np.where(mask.any(axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def test_builtin_easyvqa_detect_boxes_labels_and_sizes():
    from easy_vqa import get_train_image_paths

    from pg_finetune.data import _EASYVQA_DETECT_SKIPPED
    from pg_finetune.loc import parse_detections

    detect = load_records("builtin:easyvqa-detect", "train")
    skipped = sum(_EASYVQA_DETECT_SKIPPED["train"].values())
    assert len(detect) == len(get_train_image_paths()) - skipped == 4000 - skipped
    assert skipped < 400  # most images have a QA pair naming their shape
    test = load_records("builtin:easyvqa-detect", "test")
    assert len(test) == 1000 - sum(_EASYVQA_DETECT_SKIPPED["test"].values())

    paths = get_train_image_paths()
    captions = load_records("builtin:easyvqa-caption", "train")
    caption_by_image = {captions.rows_meta(i)["image_id"]: captions.rows_meta(i)["suffix"] for i in range(50)}
    for i in (0, 7, 23):
        meta = detect.rows_meta(i)
        (label,) = meta["labels"]
        assert label in ("circle", "rectangle", "triangle")
        assert caption_by_image[meta["image_id"]].endswith(label)
        assert meta["prefix"] == f"detect {label}"
        assert meta["width"] == meta["height"] == 64
        box = _independent_shape_box(paths[meta["image_id"]])
        assert meta["boxes"] == [list(box)]
        assert 0 < box[2] - box[0] < 64 and 0 < box[3] - box[1] < 64
        parsed = parse_detections(meta["suffix"], 64, 64)
        assert parsed.malformed == 0 and len(parsed.detections) == 1
        assert parsed.detections[0].label == label
        half_bin = 64 / 1023 / 2
        assert np.allclose(parsed.detections[0].box, box, atol=half_bin + 1e-9)
        assert meta["where"] == f"builtin:easyvqa-detect train #{i}"
    assert detect[0]["image"].size == (64, 64)


def test_question_id_names_a_record_without_an_id(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "question": "q?", "answers": ["yes"] * 10, "question_id": 262148000},
        {"image": "a.png", "question": "q?", "answers": ["no"] * 10, "question_id": 5, "id": "mine"},
        {"image": "a.png", "question": "q?", "answers": ["no"] * 10},
    ]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_records(str(tmp_path / "val.jsonl"), "train", default_prefix="answer en {question}", require_suffix=False)
    assert [ds.rows_meta(i)["id"] for i in range(3)] == ["262148000", "mine", "val-3"]


def test_decoded_images_are_cached_by_reference_as_private_copies(tmp_path, monkeypatch):
    from PIL import Image

    import pg_finetune.data.records as data_module  # the module whose RecordDataset decodes images

    for name, color in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        Image.new("RGB", (32, 32), color).save(tmp_path / name)
    rows = [{"image": n, "prefix": "caption en", "suffix": n} for n in ("a.png", "b.png", "a.png", "c.png", "a.png")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    decoded = []
    real_open = data_module.open_image
    monkeypatch.setattr(data_module, "open_image", lambda ref, where: decoded.append(ref) or real_open(ref, where))

    # room for two 32x32 RGB images: a least-recently-used one is dropped when a third comes
    ds = load_records(str(tmp_path / "d.jsonl"), "train", image_cache_mb=2 * 32 * 32 * 3 / 2**20)
    first = ds[0]["image"]
    first.putpixel((0, 0), (0, 0, 0))  # a caller drawing on its image must not change the next read
    assert ds[2]["image"].getpixel((0, 0)) == (255, 0, 0)
    assert [Path(p).name for p in decoded] == ["a.png"]  # record 2 shares record 0's image: no decode
    ds[1], ds[3]  # b, then c pushes out the least recently used (a)
    ds[4]
    assert [Path(p).name for p in decoded] == ["a.png", "b.png", "c.png", "a.png"]

    decoded.clear()
    off = load_records(str(tmp_path / "d.jsonl"), "train", image_cache_mb=0)
    for i in range(len(off)):
        off[i]
    assert len(decoded) == 5


def test_a_non_utf8_line_is_named_by_file_and_line_and_skippable(tmp_path):
    from PIL import Image

    from pg_finetune.data import BadRecordError, load_records

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = b'{"image": "a.png", "prefix": "caption en", "suffix": "a"}\n'
    (tmp_path / "train.jsonl").write_bytes(good + b'{"image": "a.png", "prefix": "caf\xe9", "suffix": "b"}\n' + good)
    with pytest.raises(BadRecordError, match=r"train\.jsonl:2.*not UTF-8 \(byte 0xe9 at column 34\)"):
        load_records(tmp_path / "train.jsonl", "train")
    ds = load_records(tmp_path / "train.jsonl", "train", skip_bad_records=True)
    assert len(ds) == 2 and sum(ds.skipped.values()) == 1


def test_check_target_refuses_a_suffix_by_file_line_and_leaves_rows_without_one(tmp_path):
    _png(tmp_path / "a.png")
    rows = [{"image": "a.png", "prefix": "p", "suffix": "good"}, {"image": "a.png", "prefix": "p", "suffix": "BAD"},
            {"image": "a.png", "prefix": "p"}, {"image": "a.png", "prefix": "p", "suffix": "also BAD"}]  # fmt: skip
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    seen = []

    def check(suffix):
        seen.append(suffix)
        return "shouts" if "BAD" in suffix else None

    with pytest.raises(BadRecordError) as err:
        load_records(path, "train", require_suffix=False, check_target=check)
    assert [p[0] for p in err.value.problems] == [f"{path}:2", f"{path}:4"]
    assert "suffix is not a valid target for the task: shouts" in str(err.value)
    assert seen == ["good", "BAD", "also BAD"]  # never called without a suffix
    ds = load_records(path, "train", require_suffix=False, check_target=check, skip_bad_records=True)
    assert len(ds) == 2 and ds.skipped == {"malformed target": 2}
    assert len(load_records(path, "train", require_suffix=False)) == 4  # no check: any text is a target


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_open_image_turns_exif_orientation_upright_as_pil_does(tmp_path, orientation):
    # a 6 x 4 image with distinct pixels, stored with an EXIF Orientation tag
    stored = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    stored.save(path, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))  # PIL's own rule
    assert expected.shape[:2] == ((6, 4) if orientation in (6, 8) else (4, 6))
    for source in (str(path), path.read_bytes(), {"path": str(path)}):
        assert np.array_equal(np.asarray(open_image(source)), expected)
    # an image handed in by the caller is turned upright in a copy; the caller's object is left as it was
    theirs = Image.open(path)
    assert np.array_equal(np.asarray(open_image(theirs)), expected)
    assert theirs.size == (6, 4) and theirs.getexif().get(0x0112) == orientation


def test_a_missing_split_names_the_splits_the_directory_holds(tmp_path):
    record = {"image": "a.png", "prefix": "p", "suffix": "s"}
    _png(tmp_path / "a.png")
    for path in ("val.jsonl", "testA/annotations.jsonl", "_annotations.train.jsonl"):
        _write_jsonl(tmp_path / path, [record])
    _write_jsonl(tmp_path / "dev" / "metadata.jsonl", [{"file_name": "../a.png", "caption": "c"}])  # image folder
    with pytest.raises(ValueError) as info:
        load_records(str(tmp_path), "validation")
    assert str(info.value).endswith(
        "splits found here: dev, testA, train, val (name one in data.train_split / data.eval_split, or --split)"
    )
    assert len(load_records(str(tmp_path), "val")) == 1  # the name it lists is one that loads
    # an image folder's top-level metadata.jsonl is its split "train", not one named "metadata"
    folder = tmp_path / "folder"
    _write_jsonl(folder / "metadata.jsonl", [{"file_name": "../a.png", "caption": "c"}])
    with pytest.raises(ValueError, match=r"splits found here: train \(name one"):
        load_records(str(folder), "validation")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as info:
        load_records(str(empty), "validation")
    assert "splits found here" not in str(info.value)
