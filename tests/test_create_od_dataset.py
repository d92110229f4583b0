"""data_prep/create_od_dataset.py on tiny COCO / YOLO / VOC / datasets inputs built here with PIL.

Every image is 100 x 50 px (W=100, H=50) unless said otherwise. Expected loc tokens are worked
out by hand: bin = round(v / size * 1023), halves to even (as tf.round), clipped to 0..1023, in the order
<locY1><locX1><locY2><locX2>.

EXIF-tagged images are stored 120 x 64 with a red rectangle on black; their expected boxes come
from the pixels, as training sees them (PIL's exif_transpose), not from the converter's arithmetic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps, PngImagePlugin

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # data_prep/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(REPO))

from pg_finetune.loc import format_detections  # noqa: E402
from pg_finetune.prep.od_dataset import InputError, main, read_coco, read_yolo_classes  # noqa: E402

W, H = 100, 50
RAW_W, RAW_H = 120, 64  # stored size of the EXIF-tagged images
RAW_BOX = (16, 8, 56, 24)  # the red rectangle, x1, y1, x2, y2 in the stored frame: on 8 px JPEG blocks


def _image(path: Path, size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)


def _tagged_image(path: Path, orientation: int) -> None:
    """RAW_BOX red on black, RAW_W x RAW_H, tagged EXIF `orientation`; .jpg at 4:4:4 so the edges stay sharp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (RAW_W, RAW_H))
    image.paste((255, 0, 0), RAW_BOX)
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"quality": 95, "subsampling": 0} if path.suffix == ".jpg" else {}
    image.save(path, exif=exif, **extra)


def _red_box(image: Image.Image) -> tuple[list[int], tuple[int, int]]:
    """(the red pixels' x1, y1, x2, y2, the size), after exif_transpose: the frame training sees."""
    upright = ImageOps.exif_transpose(image)
    red = upright.getchannel("R").point(lambda v: 255 if v > 128 else 0)
    return list(red.getbbox()), upright.size


def _red_box_of(path: Path) -> tuple[list[int], tuple[int, int]]:
    with Image.open(path) as image:
        return _red_box(image)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary(out: Path, split: str = "train") -> dict:
    return json.loads((out / f"{split}_summary.json").read_text())


# ------------------------------------------------------------------------------------------ COCO
def _coco(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "coco" / "images"
    _image(images / "a.png")
    _image(images / "b.png")
    _image(images / "c.png")  # declared 200 x 100 below: the file (100 x 50) wins
    data = {
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
            {"id": 3, "file_name": "missing.png", "width": W, "height": H},
            {"id": 4, "file_name": "c.png", "width": 200, "height": 100},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [20, 5, 30, 20]},  # normal
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [80, 40, 40, 20]},  # reaches outside
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5]},  # zero width
            {"id": 13, "image_id": 1, "category_id": 99, "bbox": [0, 0, 10, 10]},  # unknown category
            {"id": 14, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1},
            {"id": 15, "image_id": 2, "category_id": 2, "bbox": [-10, 0, 5, 10]},  # wholly left of image
            {"id": 16, "image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10]},  # image file missing
            {"id": 17, "image_id": 4, "category_id": 2, "bbox": [0, 0, 100, 50]},
        ],
    }
    annotations = tmp_path / "coco" / "instances.json"
    annotations.write_text(json.dumps(data))
    return annotations, images


def _run_coco(tmp_path: Path, *extra: str) -> Path:
    annotations, images = _coco(tmp_path)
    out = tmp_path / "out"
    args = ["--format", "coco", "--annotations", str(annotations), "--images", str(images)]
    assert main([*args, "--out", str(out), "--quiet", *extra]) == 0
    return out


def test_coco(tmp_path):
    out = _run_coco(tmp_path)
    records = _read_jsonl(out / "train.jsonl")
    assert [r["id"] for r in records] == [1, 4]
    a, c = records
    # ann 10: xywh [20, 5, 30, 20] -> xyxy (20, 5, 50, 25)
    #   y1 = 5/50*1023 = 102.3 -> 102;  x1 = 20/100*1023 = 204.6 -> 205
    #   y2 = 25/50*1023 = 511.5 -> 512 (half to even);  x2 = 50/100*1023 = 511.5 -> 512
    # ann 11: xywh [80, 40, 40, 20] -> (80, 40, 120, 60), clipped to (80, 40, 100, 50)
    #   y1 = 40/50*1023 = 818.4 -> 818;  x1 = 80/100*1023 = 818.4 -> 818;  y2 = x2 = 1023
    assert (
        a["suffix"] == "<loc0102><loc0205><loc0512><loc0512> cat ; <loc0818><loc0818><loc1023><loc1023> dog"
    )
    assert a["prefix"] == "detect cat ; dog"
    assert a["boxes"] == [[20, 5, 50, 25], [80, 40, 100, 50]]
    assert a["labels"] == ["cat", "dog"]
    assert (a["width"], a["height"]) == (W, H)
    assert a["image"] == "../coco/images/a.png"  # relative to out/train.jsonl
    # image 4 declares 200 x 100, the file is 100 x 50: the whole-image box is the whole file
    assert c["suffix"] == "<loc0000><loc0000><loc1023><loc1023> dog"
    assert (c["width"], c["height"]) == (W, H)

    summary = _summary(out)
    assert summary["images_read"] == 4
    assert summary["images_written"] == 2
    assert summary["objects_written"] == 3
    assert summary["clipped"] == 1  # ann 11
    assert summary["zero_area"] == 2  # ann 12 (w=0); ann 15 -> (-10, 0, -5, 10) clipped to (0, 0, 0, 10)
    assert summary["unknown_category"] == 1  # ann 13
    assert summary["crowd"] == 1  # ann 14
    assert summary["no_objects"] == 1  # image 2: its only box had zero area
    assert summary["size_mismatch"] == 1  # image 4
    assert summary["missing_image"] == 1
    assert summary["missing_images"] == [str(tmp_path / "coco" / "images" / "missing.png")]


def test_coco_keep_crowd(tmp_path):
    out = _run_coco(tmp_path, "--keep-crowd")
    first = _read_jsonl(out / "train.jsonl")[0]
    # ann 14 [0, 0, 10, 10]: y2 = 10/50*1023 = 204.6 -> 205; x2 = 10/100*1023 = 102.3 -> 102
    assert first["suffix"].endswith(" ; <loc0000><loc0000><loc0205><loc0102> cat")
    assert _summary(out)["crowd"] == 0


def test_class_map_and_max_objects(tmp_path):
    out = _run_coco(tmp_path, "--class-map", "cat=feline,dog=canine", "--max-objects", "1")
    a, c = _read_jsonl(out / "train.jsonl")
    # image 1 keeps ann 10 (area 30*20 = 600) over the clipped ann 11 (area 20*10 = 200)
    assert a["suffix"] == "<loc0102><loc0205><loc0512><loc0512> feline"
    assert a["prefix"] == "detect feline"
    assert c["labels"] == ["canine"]
    assert _summary(out)["over_max_objects"] == 1


def test_max_objects_sorts_by_area_stably(tmp_path):
    out = _run_coco(tmp_path, "--max-objects", "2", "--keep-crowd")
    a = _read_jsonl(out / "train.jsonl")[0]
    # areas: ann 10 600, ann 11 200, ann 14 (crowd kept) 100 -> the two largest, largest first
    assert a["boxes"] == [[20, 5, 50, 25], [80, 40, 100, 50]]


def test_class_map_json_and_classes_keep(tmp_path):
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"dog": "canine"}))
    out = _run_coco(tmp_path, "--class-map", str(class_map), "--classes-keep", "canine")
    a, c = _read_jsonl(out / "train.jsonl")
    assert a["labels"] == ["canine"] and c["labels"] == ["canine"]
    assert _summary(out)["not_kept"] == 2  # anns 10 and 12 (cat), before the zero-area check


def test_output_loads_through_load_records(tmp_path):
    from pg_finetune.data import load_records

    out = _run_coco(tmp_path)
    ds = load_records(str(out / "train.jsonl"), "train")
    assert len(ds) == 2
    record = ds[0]
    assert record["image"].size == (W, H)
    assert record["prefix"] == "detect cat ; dog"
    assert record["suffix"].startswith("<loc0102><loc0205><loc0512><loc0512> cat")
    assert record["labels"] == ["cat", "dog"]


def test_copy_images(tmp_path):
    out = _run_coco(tmp_path, "--copy-images")
    first = _read_jsonl(out / "train.jsonl")[0]
    assert first["image"] == "images/a.png"
    assert (out / "images" / "a.png").is_file()


def test_val_fraction_is_deterministic(tmp_path):
    out = _run_coco(tmp_path, "--val-fraction", "0.5", "--seed", "3")
    train, val = _summary(out, "train"), _summary(out, "val")
    assert train["images_read"] == val["images_read"] == 2  # round(4 * 0.5) images go to val
    ids = (
        [r["id"] for r in _read_jsonl(out / "train.jsonl")],
        [r["id"] for r in _read_jsonl(out / "val.jsonl")],
    )
    again = _run_coco(tmp_path, "--val-fraction", "0.5", "--seed", "3")
    assert ids == (
        [r["id"] for r in _read_jsonl(again / "train.jsonl")],
        [r["id"] for r in _read_jsonl(again / "val.jsonl")],
    )


def test_coco_errors_name_the_file_and_annotation(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(InputError, match="bad.json: invalid JSON"):
        read_coco(bad, tmp_path)
    no_bbox = tmp_path / "no_bbox.json"
    no_bbox.write_text(
        json.dumps(
            {
                "categories": [{"id": 1, "name": "cat"}],
                "images": [{"id": 1, "file_name": "a.png"}],
                "annotations": [{"id": 42, "image_id": 1, "category_id": 1}],
            }
        )
    )
    with pytest.raises(InputError, match="no_bbox.json: annotation id 42: missing required field 'bbox'"):
        read_coco(no_bbox, tmp_path)


def _tagged_coco(tmp_path: Path, orientation: int, bbox: list[float], **size: int) -> list[str]:
    """main() arguments for one tagged PNG a.png (declared `size`: width=, height=) with one cat `bbox`."""
    images = tmp_path / "coco" / "images"
    _tagged_image(images / "a.png", orientation)
    data = {
        "categories": [{"id": 1, "name": "cat"}],
        "images": [{"id": 1, "file_name": "a.png", **size}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": bbox}],
    }
    annotations = tmp_path / "coco" / "instances.json"
    annotations.write_text(json.dumps(data))
    out = tmp_path / "out"
    return ["--format", "coco", "--annotations", str(annotations), "--images", str(images), "--out", str(out)]


RAW_XYWH = [RAW_BOX[0], RAW_BOX[1], RAW_BOX[2] - RAW_BOX[0], RAW_BOX[3] - RAW_BOX[1]]


@pytest.mark.parametrize("orientation", range(2, 9))
def test_coco_exif_orientation_moves_boxes_to_the_upright_frame(tmp_path, orientation):
    # declared size = the stored size: the box is in the stored frame (for 2-4 both frames are 120 x 64)
    args = _tagged_coco(tmp_path, orientation, RAW_XYWH, width=RAW_W, height=RAW_H)
    assert main([*args, "--quiet"]) == 0
    (a,) = _read_jsonl(tmp_path / "out" / "train.jsonl")
    with Image.open(tmp_path / "coco" / "images" / "a.png") as image:
        assert image.size == (RAW_W, RAW_H) and image.getexif()[0x0112] == orientation
        box, size = _red_box(image)
    assert a["boxes"] == [box]
    assert (a["width"], a["height"]) == size
    assert a["suffix"] == format_detections([(box, "cat")], *size)
    summary = _summary(tmp_path / "out")
    assert (summary["exif_transposed"], summary["size_mismatch"]) == (1, 0)


def test_coco_exif_orientation_without_declared_size_is_the_stored_frame(tmp_path):
    args = _tagged_coco(tmp_path, 6, RAW_XYWH)
    assert main([*args, "--quiet"]) == 0
    (a,) = _read_jsonl(tmp_path / "out" / "train.jsonl")
    box, size = _red_box_of(tmp_path / "coco" / "images" / "a.png")
    assert (a["boxes"], a["width"], a["height"]) == ([box], *size)
    assert _summary(tmp_path / "out")["exif_transposed"] == 1


def test_coco_declared_upright_size_keeps_the_boxes(tmp_path):
    # orientation 6 (a quarter turn clockwise): stored 120 x 64, upright 64 x 120; the annotation
    # declares 64 x 120, so its box is already upright: the red pixels' upright box, as xywh
    _tagged_image(tmp_path / "probe.png", 6)
    (x1, y1, x2, y2), size = _red_box_of(tmp_path / "probe.png")
    # stored (16, 8, 56, 24) -> (x, y) -> (h - y, x) with h = 64: (64 - 24, 16, 64 - 8, 56)
    assert size == (RAW_H, RAW_W) and [x1, y1, x2, y2] == [40, 16, 56, 56]
    args = _tagged_coco(tmp_path, 6, [x1, y1, x2 - x1, y2 - y1], width=RAW_H, height=RAW_W)
    assert main([*args, "--quiet"]) == 0
    (a,) = _read_jsonl(tmp_path / "out" / "train.jsonl")
    assert a["boxes"] == [[40, 16, 56, 56]]
    assert (a["width"], a["height"]) == (64, 120)
    # y1 = 16/120*1023 = 136.4 -> 136; x1 = 40/64*1023 = 639.375 -> 639
    # y2 = 56/120*1023 = 477.4 -> 477; x2 = 56/64*1023 = 895.125 -> 895
    assert a["suffix"] == "<loc0136><loc0639><loc0477><loc0895> cat"
    summary = _summary(tmp_path / "out")
    assert (summary["exif_transposed"], summary["size_mismatch"]) == (0, 0)


def test_coco_declared_size_fitting_neither_frame_is_an_error(tmp_path, capsys):
    args = _tagged_coco(tmp_path, 6, RAW_XYWH, width=100, height=100)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "coco" / "images" / "a.png") in err
    assert "EXIF orientation 6" in err and "100 x 100" in err and "120 x 64" in err and "64 x 120" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "train.jsonl").exists()


def test_copy_images_keeps_exif_and_writes_the_upright_size(tmp_path):
    from pg_finetune.data import load_records

    args = _tagged_coco(tmp_path, 6, RAW_XYWH, width=RAW_W, height=RAW_H)
    assert main([*args, "--quiet", "--copy-images"]) == 0
    (a,) = _read_jsonl(tmp_path / "out" / "train.jsonl")
    with Image.open(tmp_path / "out" / a["image"]) as copy:
        assert copy.getexif()[0x0112] == 6 and copy.size == (RAW_W, RAW_H)
    # the image training opens (exif_transpose applied) is the record's size, its red pixels the box
    record = load_records(str(tmp_path / "out" / "train.jsonl"), "train")[0]
    assert record["image"].size == (a["width"], a["height"]) == (RAW_H, RAW_W)
    assert a["boxes"] == [_red_box(record["image"])[0]]


def _move_exif_after_pixels(path: Path) -> None:
    """Rewrite a PNG with its eXIf chunk just before IEND, after the image data (PNG allows both)."""
    data = path.read_bytes()
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append(data[pos : pos + 12 + length])
        pos += 12 + length
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(exif) == 1 and rest[-1][4:8] == b"IEND"
    path.write_bytes(data[:8] + b"".join([*rest[:-1], *exif, rest[-1]]))


def test_png_exif_after_the_pixel_data_is_read(tmp_path):
    args = _tagged_coco(tmp_path, 6, RAW_XYWH, width=RAW_W, height=RAW_H)
    path = tmp_path / "coco" / "images" / "a.png"
    _move_exif_after_pixels(path)
    with Image.open(path) as image:
        assert "exif" not in image.info  # not in the header...
        assert image.getexif()[0x0112] == 6  # ...but training's exif_transpose finds it
    assert main([*args, "--quiet"]) == 0
    (a,) = _read_jsonl(tmp_path / "out" / "train.jsonl")
    box, size = _red_box_of(path)
    assert (a["boxes"], a["width"], a["height"]) == ([box], *size)


def test_headers_are_read_without_decoding_pixels(tmp_path, monkeypatch):
    args = _tagged_coco(tmp_path, 6, RAW_XYWH, width=RAW_W, height=RAW_H)
    _image(tmp_path / "coco" / "images" / "plain.png")  # untagged: PIL's PNG getexif() would decode it
    data = json.loads((tmp_path / "coco" / "instances.json").read_text())
    data["images"].append({"id": 2, "file_name": "plain.png", "width": W, "height": H})
    data["annotations"].append({"id": 11, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10]})
    (tmp_path / "coco" / "instances.json").write_text(json.dumps(data))

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    assert main([*args, "--quiet"]) == 0
    a, plain = _read_jsonl(tmp_path / "out" / "train.jsonl")
    assert (a["width"], a["height"], plain["width"], plain["height"]) == (RAW_H, RAW_W, W, H)


# ------------------------------------------------------------------------------------------ YOLO
def _yolo(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "yolo"
    _image(root / "images" / "a.png")
    _image(root / "images" / "b.png")
    labels = root / "labels"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text(
        "0 0.375 0.5 0.25 0.5\n"  # normal
        "1 0.875 0.75 0.5 0.5\n"  # reaches past the right edge
        "0 0.5 0.5 0 0.5\n"  # zero width
        "5 0.5 0.5 0.25 0.25\n"  # class index out of range
    )
    (labels / "b.txt").write_text("7 0.5 0.5 0.5 0.5\n")  # only an unknown class
    (labels / "c.txt").write_text("0 0.5 0.5 0.5 0.5\n")  # no image c.*
    classes = root / "classes.txt"
    classes.write_text("cat\ndog\n")
    return root / "images", labels, classes


def test_yolo(tmp_path):
    images, labels, classes = _yolo(tmp_path)
    out = tmp_path / "out"
    args = ["--format", "yolo", "--images", str(images), "--labels", str(labels), "--classes", str(classes)]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    (a,) = _read_jsonl(out / "train.jsonl")
    # line 1: cx .375 w .25 -> x 0.25..0.5 -> 25..50 px; cy .5 h .5 -> y 0.25..0.75 -> 12.5..37.5 px
    #   y1 = 12.5/50*1023 = 255.75 -> 256; x1 = 25/100*1023 = 255.75 -> 256
    #   y2 = 37.5/50*1023 = 767.25 -> 767; x2 = 50/100*1023 = 511.5 -> 512
    # line 2: x 0.625..1.125 -> 62.5..112.5, clipped to 100; y 0.5..1.0 -> 25..50
    #   y1 = 25/50*1023 = 511.5 -> 512; x1 = 62.5/100*1023 = 639.375 -> 639; y2 = x2 = 1023
    assert (
        a["suffix"] == "<loc0256><loc0256><loc0767><loc0512> cat ; <loc0512><loc0639><loc1023><loc1023> dog"
    )
    assert a["prefix"] == "detect cat ; dog"
    assert a["boxes"] == [[25, 12.5, 50, 37.5], [62.5, 25, 100, 50]]
    assert a["labels"] == ["cat", "dog"]
    assert a["id"] == "a"
    summary = _summary(out)
    assert (summary["images_read"], summary["images_written"], summary["objects_written"]) == (3, 1, 2)
    assert summary["clipped"] == 1
    assert summary["zero_area"] == 1
    assert summary["unknown_category"] == 2  # a.txt line 4, b.txt line 1
    assert summary["no_objects"] == 1  # b
    assert summary["missing_images"] == [str(images / "c.*")]


def test_yolo_data_yaml_names(tmp_path):
    (tmp_path / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")
    assert read_yolo_classes(tmp_path / "data.yaml") == ["cat", "dog"]
    (tmp_path / "list.yaml").write_text("names: [cat, dog]\n")
    assert read_yolo_classes(tmp_path / "list.yaml") == ["cat", "dog"]


def test_yolo_wrong_field_count_names_file_and_line(tmp_path, capsys):
    images, labels, classes = _yolo(tmp_path)
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5\n")
    args = ["--format", "yolo", "--images", str(images), "--labels", str(labels), "--classes", str(classes)]
    assert main([*args, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "a.txt:2: expected 5 fields" in capsys.readouterr().err


def test_yolo_exif_orientation_labels_are_upright(tmp_path):
    # orientation 6: stored 120 x 64, upright 64 x 120; the label is normalised in the upright frame
    images, labels = tmp_path / "yolo" / "images", tmp_path / "yolo" / "labels"
    _tagged_image(images / "a.jpg", 6)
    (x1, y1, x2, y2), (width, height) = _red_box_of(images / "a.jpg")
    assert (width, height) == (RAW_H, RAW_W)
    labels.mkdir(parents=True)
    cx, cy, w, h = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
    (labels / "a.txt").write_text(f"0 {cx!r} {cy!r} {w!r} {h!r}\n")
    (tmp_path / "classes.txt").write_text("cat\n")
    out = tmp_path / "out"
    args = ["--format", "yolo", "--images", str(images), "--labels", str(labels)]
    assert main([*args, "--classes", str(tmp_path / "classes.txt"), "--out", str(out), "--quiet"]) == 0
    (a,) = _read_jsonl(out / "train.jsonl")
    assert (a["width"], a["height"]) == (width, height)
    assert a["boxes"][0] == pytest.approx([x1, y1, x2, y2])
    assert _summary(out)["exif_transposed"] == 0  # scaled, not moved


# ------------------------------------------------------------------------------------------ VOC
def _voc_xml(
    filename: str, objects: list[tuple[str, int, int, int, int]], size: tuple[int, int] = (W, H)
) -> str:
    parts = [
        f"<annotation><filename>{filename}</filename>"
        f"<size><width>{size[0]}</width><height>{size[1]}</height></size>"
    ]
    for name, *coords in objects:
        xmin, ymin, xmax, ymax = coords
        parts.append(
            f"<object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def _run_voc(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    images, xml_dir = tmp_path / "voc" / "JPEGImages", tmp_path / "voc" / "Annotations"
    _image(images / "a.png")
    xml_dir.mkdir(parents=True)
    (xml_dir / "a.xml").write_text(
        _voc_xml(
            "a.png",
            [
                ("cat", 10, 10, 60, 40),  # normal
                ("person", -5, 20, 30, 70),  # reaches left and below
                ("dog", 50, 30, 49, 45),  # zero width: pixels 50..49, none
            ],
        )
    )
    (xml_dir / "b.xml").write_text(_voc_xml("missing.png", [("cat", 0, 0, 10, 10)]))
    out = tmp_path / "out"
    args = ["--format", "voc", "--annotations", str(xml_dir), "--images", str(images)]
    assert main([*args, "--out", str(out), "--quiet", *extra]) == 0
    return out, images


def test_voc(tmp_path):
    out, images = _run_voc(tmp_path)
    (a,) = _read_jsonl(out / "train.jsonl")
    # VOC is 1-based: xmin, ymin lose 1, xmax, ymax stay
    # cat (10, 10, 60, 40) -> (9, 9, 60, 40): y1 = 9/50*1023 = 184.14 -> 184; x1 = 9/100*1023 = 92.07 -> 92
    #   y2 = 40/50*1023 = 818.4 -> 818; x2 = 60/100*1023 = 613.8 -> 614
    # person (-5, 20, 30, 70) -> (-6, 19, 30, 70), clipped to (0, 19, 30, 50)
    #   y1 = 19/50*1023 = 388.74 -> 389; x1 = 0; y2 = 1023; x2 = 30/100*1023 = 306.9 -> 307
    # dog (50, 30, 49, 45) -> (49, 29, 49, 45): zero width
    assert (
        a["suffix"]
        == "<loc0184><loc0092><loc0818><loc0614> cat ; <loc0389><loc0000><loc1023><loc0307> person"
    )
    assert a["prefix"] == "detect cat ; person"
    assert a["boxes"] == [[9, 9, 60, 40], [0, 19, 30, 50]]
    assert a["labels"] == ["cat", "person"]
    summary = _summary(out)
    assert (summary["images_read"], summary["images_written"], summary["objects_written"]) == (2, 1, 2)
    assert summary["clipped"] == 1
    assert summary["zero_area"] == 1
    assert summary["missing_images"] == [str(images / "missing.png")]


def test_voc_classes_keep(tmp_path):
    out, _ = _run_voc(tmp_path, "--classes-keep", "cat,dog")
    (a,) = _read_jsonl(out / "train.jsonl")
    assert a["labels"] == ["cat"]
    summary = _summary(out)
    assert (summary["not_kept"], summary["zero_area"], summary["unknown_category"]) == (1, 1, 0)


def _run_voc_one(tmp_path: Path, filename: str, objects: list, size: tuple[int, int] = (W, H)) -> Path:
    xml_dir = tmp_path / "voc" / "Annotations"
    xml_dir.mkdir(parents=True)
    (xml_dir / "a.xml").write_text(_voc_xml(filename, objects, size))
    out = tmp_path / "out"
    args = [
        "--format",
        "voc",
        "--annotations",
        str(xml_dir),
        "--images",
        str(tmp_path / "voc" / "JPEGImages"),
    ]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    return out


def test_voc_coordinates_are_one_based(tmp_path):
    _image(tmp_path / "voc" / "JPEGImages" / "a.png")
    out = _run_voc_one(tmp_path, "a.png", [("cat", 1, 1, W, H), ("dog", 21, 11, 60, 30)])
    (a,) = _read_jsonl(out / "train.jsonl")
    # cat: pixels 1..100 x 1..50, the whole image -> (0, 0, 100, 50)
    # dog: pixels 21..60 x 11..30 -> (20, 10, 60, 30): y1 = 10/50*1023 = 204.6 -> 205
    #   x1 = 20/100*1023 = 204.6 -> 205; y2 = 30/50*1023 = 613.8 -> 614; x2 = 60/100*1023 = 613.8 -> 614
    assert a["boxes"] == [[0, 0, W, H], [20, 10, 60, 30]]
    assert (
        a["suffix"] == "<loc0000><loc0000><loc1023><loc1023> cat ; <loc0205><loc0205><loc0614><loc0614> dog"
    )
    assert _summary(out)["clipped"] == 0


@pytest.mark.parametrize("orientation", range(2, 9))
def test_voc_exif_orientation_moves_boxes_to_the_upright_frame(tmp_path, orientation):
    path = tmp_path / "voc" / "JPEGImages" / "a.jpg"
    _tagged_image(path, orientation)
    x1, y1, x2, y2 = RAW_BOX
    out = _run_voc_one(tmp_path, "a.jpg", [("cat", x1 + 1, y1 + 1, x2, y2)], size=(RAW_W, RAW_H))
    (a,) = _read_jsonl(out / "train.jsonl")
    with Image.open(path) as image:
        assert image.getexif()[0x0112] == orientation
        assert list(image.getchannel("R").point(lambda v: 255 if v > 128 else 0).getbbox()) == list(RAW_BOX)
        box, size = _red_box(image)
    assert a["boxes"] == [box]
    assert (a["width"], a["height"]) == size
    assert a["suffix"] == format_detections([(box, "cat")], *size)
    assert _summary(out)["exif_transposed"] == 1


# ------------------------------------------------------------------------------------------ hf
def test_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=["cat", "dog"]),
                }
            ),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (W, H), (10, 200, 10))],
            "image_id": [7],
            "objects": [{"bbox": [[20, 5, 30, 20], [90, 0, 20, 10]], "category": [0, 1]}],
        },
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"
    assert main(["--format", "hf", "--dataset", str(tmp_path / "hf"), "--out", str(out), "--quiet"]) == 0
    (a,) = _read_jsonl(out / "train.jsonl")
    # cat xywh [20, 5, 30, 20] -> (20, 5, 50, 25): as in test_coco, <loc0102><loc0205><loc0512><loc0512>
    # dog xywh [90, 0, 20, 10] -> (90, 0, 110, 10), clipped to (90, 0, 100, 10)
    #   y1 = 0; x1 = 90/100*1023 = 920.7 -> 921; y2 = 10/50*1023 = 204.6 -> 205; x2 = 1023
    assert (
        a["suffix"] == "<loc0102><loc0205><loc0512><loc0512> cat ; <loc0000><loc0921><loc0205><loc1023> dog"
    )
    assert a["prefix"] == "detect cat ; dog"
    assert a["id"] == 7
    assert a["image"] == "images/train-000000.png"
    with Image.open(out / a["image"]) as image:
        assert image.size == (W, H)
    assert _summary(out)["clipped"] == 1


def test_hf_exif_orientation_boxes_are_in_the_decoded_frame(tmp_path):
    # datasets' Image feature applies exif_transpose when it decodes, so the dataset's rows show
    # the upright image; boxes are taken in that frame and the PNG written has no orientation tag
    datasets = pytest.importorskip("datasets")
    _tagged_image(tmp_path / "a.jpg", 6)
    (x1, y1, x2, y2), size = _red_box_of(tmp_path / "a.jpg")
    assert size == (RAW_H, RAW_W)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=["cat"]),
                }
            ),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": (tmp_path / "a.jpg").read_bytes(), "path": None}],
            "objects": [{"bbox": [[x1, y1, x2 - x1, y2 - y1]], "category": [0]}],
        },
        features=features,
    )
    assert ds[0]["image"].size == size  # decoded upright
    ds.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"
    assert main(["--format", "hf", "--dataset", str(tmp_path / "hf"), "--out", str(out), "--quiet"]) == 0
    (a,) = _read_jsonl(out / "train.jsonl")
    assert (a["boxes"], a["width"], a["height"]) == ([[x1, y1, x2, y2]], *size)
    with Image.open(out / a["image"]) as written:
        assert 0x0112 not in written.getexif()
        assert _red_box(written) == ([x1, y1, x2, y2], size)
    assert _summary(out)["exif_transposed"] == 0


# ------------------------------------------------------------------------------------------ CLI
def test_help_exits_zero():
    result = subprocess.run(
        [sys.executable, "data_prep/create_od_dataset.py", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--max-objects" in result.stdout


# ------------------------------------------------------------------------------------------ nothing to write
def test_no_annotations_or_no_images_is_an_error_not_an_empty_jsonl(tmp_path, capsys):
    images = tmp_path / "coco" / "images"
    _image(images / "a.png")
    annotations = tmp_path / "coco" / "instances.json"
    annotations.write_text(json.dumps({"categories": [{"id": 1, "name": "cat"}], "annotations": [],
                                       "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}]}))  # fmt: skip
    out = tmp_path / "out"
    args = ["--format", "coco", "--annotations", str(annotations), "--out", str(out), "--quiet"]
    assert main([*args, "--images", str(images)]) == 2  # an image without objects: nothing to train on
    assert "no image was written" in capsys.readouterr().err
    assert not (out / "train.jsonl").exists() and json.loads((out / "train_summary.json").read_text())["no_objects"] == 1
    with pytest.raises(SystemExit) as exit_info:  # a missing --images folder
        main([*args, "--images", str(tmp_path / "nope")])
    assert exit_info.value.code == 2 and "--images" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"categories": [], "images": [], "annotations": []}))
    assert main(["--format", "coco", "--annotations", str(empty), "--images", str(images), "--out", str(out)]) == 2
    assert "no images found" in capsys.readouterr().err


def test_a_box_thinner_than_a_location_bin_is_skipped_and_every_target_parses(tmp_path):
    from pg_finetune.tasks.detect import target_problem

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (1000, 50)).save(images / "a.png")
    # x 100..100.1 of 1000 px: both edges in bin 102, a zero-width target; 100..102 spans bins 102..104
    data = {"categories": [{"id": 1, "name": "cat"}],
            "images": [{"id": 1, "file_name": "a.png", "width": 1000, "height": 50}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 10, 0.1, 20]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 10, 2, 20]}]}  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    assert main(["--format", "coco", "--annotations", str(tmp_path / "ann.json"), "--images", str(images),
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    (record,) = _read_jsonl(out / "train.jsonl")
    assert record["boxes"] == [[100.0, 10.0, 102.0, 30.0]] and _summary(out)["zero_area"] == 1
    assert target_problem(record["suffix"]) is None
