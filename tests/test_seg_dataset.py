"""pg-make-seg-dataset: COCO polygons and RLE (compressed and not), RefCOCO refs -> segment JSONL.

The expected masks are drawn here with PIL / numpy (not by pycocotools, which the converter uses),
the loc tokens are binned by hand from the annotation bbox, and the suffix is decoded with the same
small codec (trained once a session, shared with tests/test_segment_e2e.py, 100 steps: its reconstructions of these convex shapes
are near 0.8 IoU, so "high" below means > 0.6 where a wrong crop or box gives < 0.3).
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pg_finetune.prep.seg_dataset import main
from pg_finetune.tasks.segment.codec import MaskCodec
from pg_finetune.tasks.segment.masks import rle_to_mask, suffix_to_mask

ROOT = Path(__file__).resolve().parents[1]
W, H = 80, 60
TRIANGLE = [10.0, 8.0, 50.0, 8.0, 30.0, 40.0]  # x, y pairs
TRIANGLE_BBOX = [10.0, 8.0, 40.0, 32.0]  # x, y, w, h
SQUARE = (45, 20, 75, 55)  # x1, y1, x2 (exclusive), y2 (exclusive): the RLE object


@pytest.fixture(scope="module")
def codec_file(segment_codec_file):
    return segment_codec_file  # tests/conftest.py: one codec per session


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE, by hand: run lengths of the column-major pixels, starting with a 0-run."""
    flat = mask.T.reshape(-1).astype(int)
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    return [*counts, run]


def _square_mask() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    x1, y1, x2, y2 = SQUARE
    mask[y1:y2, x1:x2] = True
    return mask


def _triangle_mask() -> np.ndarray:
    image = Image.new("L", (W, H), 0)
    ImageDraw.Draw(image).polygon(list(zip(TRIANGLE[::2], TRIANGLE[1::2], strict=True)), fill=255)
    return np.asarray(image) > 0


def _coco(tmp_path: Path, compressed: bool = False) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (W, H), (30, 60, 90)).save(images / name)
    square = _square_mask()
    if compressed:
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(square.astype(np.uint8)))
        square_segm = {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    else:
        square_segm = {"size": [H, W], "counts": _uncompressed_rle(square)}
    x1, y1, x2, y2 = SQUARE
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                   {"id": 2, "file_name": "b.png", "width": W, "height": H}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 5, "bbox": TRIANGLE_BBOX, "segmentation": [TRIANGLE],
             "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 6, "bbox": [x1, y1, x2 - x1, y2 - y1],
             "segmentation": square_segm, "iscrowd": 0},
        ],
        "categories": [{"id": 5, "name": "party hat"}, {"id": 6, "name": "box"}],
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _bins(suffix: str) -> list[int]:
    return [int(v) for v in re.findall(r"<loc(\d{4})>", suffix)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("compressed", [False, True], ids=["uncompressed-rle", "compressed-rle"])
def test_polygon_and_rle_become_records_that_decode_back_to_their_masks(tmp_path, codec_file, compressed):
    annotations, images = _coco(tmp_path, compressed)
    out = tmp_path / "out"
    args = ["--annotations", str(annotations), "--images", str(images), "--out", str(out), "--quiet"]
    assert main([*args, "--codec", str(codec_file)]) == 0
    records = {r["id"]: r for r in _read(out / "train.jsonl")}
    assert set(records) == {"ann11", "ann12"}
    tri, sq = records["ann11"], records["ann12"]
    assert tri["prefix"] == "segment party hat" and sq["prefix"] == "segment box"
    assert re.fullmatch(r"(<loc\d{4}>){4}(<seg\d{3}>){16}", tri["suffix"])
    # loc tokens: the annotation bbox binned by hand, round(v / size * 1023), y first
    x, y, w, h = TRIANGLE_BBOX
    assert _bins(tri["suffix"]) == [round(y / H * 1023), round(x / W * 1023), round((y + h) / H * 1023),
                                    round((x + w) / W * 1023)] == [136, 128, 682, 639]  # fmt: skip
    x1, y1, x2, y2 = SQUARE
    assert _bins(sq["suffix"]) == [round(y1 / H * 1023), round(x1 / W * 1023), 938, 959]
    # the stored reference masks are the source masks (PIL's polygon fill agrees with COCO's rasterisation
    # to within its edge pixels), the image path is relative to the JSONL
    assert rle_to_mask(sq["mask"]).tolist() == _square_mask().tolist()
    assert _iou(rle_to_mask(tri["mask"]), _triangle_mask()) > 0.9
    assert (out / tri["image"]).resolve() == (images / "a.png").resolve()
    assert tri["width"] == W and tri["height"] == H and tri["codec"] == str(codec_file.resolve())
    # the suffix decodes, with the same codec, to the source mask
    codec = MaskCodec.from_npz(codec_file)
    for record, truth in ((tri, _triangle_mask()), (sq, _square_mask())):
        decoded = suffix_to_mask(record["suffix"], W, H, codec)
        assert _iou(decoded, truth) > 0.6, record["id"]


def test_refs_give_one_record_per_sentence_in_files_by_split(tmp_path, codec_file):
    annotations, images = _coco(tmp_path)
    refs = [
        {"ref_id": 0, "ann_id": 11, "image_id": 1, "split": "train",
         "sentences": [{"sent": "the  hat", "raw": "The hat!"}, {"raw": "pointy thing"}]},
        {"ref_id": 1, "ann_id": 12, "image_id": 2, "split": "testA", "sentences": ["box on the right"]},
    ]  # fmt: skip
    refs_file = tmp_path / "refs(unc).p"
    refs_file.write_bytes(pickle.dumps(refs))
    out = tmp_path / "out"
    argv = ["--annotations", str(annotations), "--images", str(images), "--out", str(out), "--refs", str(refs_file),
            "--codec", str(codec_file), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    train, test_a = _read(out / "train.jsonl"), _read(out / "testA.jsonl")
    assert [r["prefix"] for r in train] == ["segment the hat", "segment pointy thing"]
    assert [r["id"] for r in train] == ["ref0-s0", "ref0-s1"] and train[0]["suffix"] == train[1]["suffix"]
    assert [r["prefix"] for r in test_a] == ["segment box on the right"]
    # the same refs as JSON ({"refs": [...]}), keeping one split
    (tmp_path / "refs.json").write_text(json.dumps({"refs": refs}))
    argv2 = [*argv[:5], str(tmp_path / "out2"), "--refs", str(tmp_path / "refs.json"), "--splits", "testA",
             "--codec", str(codec_file), "--quiet"]  # fmt: skip
    assert main(argv2) == 0
    assert sorted(p.name for p in (tmp_path / "out2").glob("*.jsonl")) == ["testA.jsonl"]
    assert _read(tmp_path / "out2/testA.jsonl") == test_a


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"segmentation": [[1.0, 2.0, 3.0, 4.0, 5.0]]}, "annotation 11: polygon 0 has 5 coordinates"),
        ({"segmentation": [[1.0, 2.0, 3.0, 4.0]]}, "annotation 11: polygon 0 has 4 coordinates"),
        ({"bbox": [50.0, 30.0, 40.0, 10.0]}, "annotation 11: bbox [50.0, 30.0, 40.0, 10.0] (x, y, w, h) reaches "
                                              "outside the 80 x 60 image"),
        ({"bbox": [1.0, 2.0, 0.0, 3.0]}, "annotation 11: bbox [1.0, 2.0, 0.0, 3.0] has no area"),
        ({"segmentation": {"size": [10, 10], "counts": [100]}}, "annotation 11: RLE size [10, 10] but the image"),
    ],
)  # fmt: skip
def test_bad_annotations_name_the_file_and_annotation_and_write_nothing(tmp_path, codec_file, capsys, change,
                                                                        message):  # fmt: skip
    annotations, images = _coco(tmp_path)
    data = json.loads(annotations.read_text())
    data["annotations"][0].update(change)
    annotations.write_text(json.dumps(data))
    out = tmp_path / "out"
    argv = ["--annotations", str(annotations), "--images", str(images), "--out", str(out), "--codec", str(codec_file)]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: {annotations}: {message}" in err, err
    assert not out.exists()


def test_a_ref_to_a_missing_annotation_names_the_refs_file(tmp_path, codec_file, capsys):
    annotations, images = _coco(tmp_path)
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"ref_id": 7, "ann_id": 99, "image_id": 1, "split": "val", "sentences": ["x"]}]))
    argv = ["--annotations", str(annotations), "--images", str(images), "--out", str(tmp_path / "o"),
            "--refs", str(refs), "--codec", str(codec_file), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    assert f"error: {refs}: ref 7: ann_id 99 is not in the annotations file" in capsys.readouterr().err


class _RunsCode:
    """Unpickling this would call os.getcwd: a stand-in for a refs file that runs code when opened."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_a_refs_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    annotations, images = _coco(tmp_path)
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([{"ref_id": 1, "sentences": [_RunsCode()]}]))
    argv = ["--annotations", str(annotations), "--images", str(images), "--out", str(tmp_path / "o"),
            "--refs", str(refs), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{refs}: not a plain-data refs pickle" in err and "posix.getcwd" in err
    assert not (tmp_path / "o").exists()


def test_the_shim_runs_the_same_program_with_help():
    result = subprocess.run([sys.executable, str(ROOT / "data_prep/create_seg_dataset.py"), "--help"],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0 and "refcoco_mask2str" in result.stdout and "--codec" in result.stdout


def test_task_detect_writes_referring_boxes_without_masks_or_codec(tmp_path, capsys):
    annotations, images = _coco(tmp_path)
    data = json.loads(annotations.read_text())
    for ann in data["annotations"]:
        del ann["segmentation"]  # a boxes-only file is enough for detection
    annotations.write_text(json.dumps(data))
    refs = [{"ref_id": 3, "ann_id": 11, "image_id": 1, "split": "val", "sentences": [{"sent": "the pointy hat"}]},
            {"ref_id": 4, "ann_id": 12, "image_id": 2, "split": "val", "sentences": ["box"]}]  # fmt: skip
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    out = tmp_path / "out"
    argv = ["--annotations", str(annotations), "--images", str(images), "--out", str(out),
            "--refs", str(tmp_path / "refs.json"), "--task", "detect", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["validation.jsonl"]  # the refs' "val"
    hat, box = _read(out / "validation.jsonl")
    # bins worked by hand, round(v / size * 1023), y first: the hat's bbox (10, 8, 40, 32) on 80 x 60
    assert hat["prefix"] == "detect the pointy hat"
    assert hat["suffix"] == "<loc0136><loc0128><loc0682><loc0639> the pointy hat"
    assert hat["box"] == [10.0, 8.0, 50.0, 40.0] and (hat["width"], hat["height"]) == (W, H)
    assert box["suffix"] == "<loc0341><loc0575><loc0938><loc0959> box" and box["id"] == "ref4-s0"
    assert "mask" not in hat and "codec" not in hat
    assert (out / hat["image"]).resolve() == (images / "a.png").resolve()
    # the records are what the refexp benchmark scores: the true box's own tokens score IoU ~1
    from pg_finetune.benchmarks import get_benchmark
    from pg_finetune.tasks.base import ScoreOptions

    metric = get_benchmark("refexp").get_metric()
    scored = metric.score([r["suffix"] for r in (hat, box)], [metric.reference(r) for r in (hat, box)], ScoreOptions())
    assert scored.metrics["acc@0.5"] == 1.0 and scored.metrics["miou"] > 0.97
    # a codec means masks: refused with detect
    with pytest.raises(SystemExit):
        main([*argv, "--codec", str(tmp_path / "refs.json")])
    assert "--codec is for --task segment" in capsys.readouterr().err
