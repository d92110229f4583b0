"""The segment task: a small codec trained here, targets from masks, the parser, and scoring through eval.run.

One codec is trained per module (`python -m pg_finetune.tasks.segment.train_codec`, 300 steps, about
a minute on one core) into a tmp dir; nothing is downloaded.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from eval.run import main as eval_main
from pg_finetune.benchmarks import get_benchmark
from pg_finetune.tasks import get_task
from pg_finetune.tasks.segment import mask_to_suffix, parse_segmentation, suffix_to_mask
from pg_finetune.tasks.segment.codec import MaskCodec
from pg_finetune.tasks.segment.masks import crop_to_64, mask_rle, rle_to_mask
from pg_finetune.tasks.segment.shapes import random_shape_mask, shape_masks64
from pg_finetune.tasks.segment.train_codec import TINY_FILE, tiny_codec_path, train_codec
from pg_finetune.tasks.segment.train_codec import main as train_main

SUFFIX_RE = re.compile(r"(<loc\d{4}>){4}(<seg\d{3}>){16}")


@pytest.fixture(scope="module")
def codec_file(segment_codec_file):
    return segment_codec_file  # tests/conftest.py: `train_codec --steps 300`, once per session


@pytest.fixture(scope="module")
def codec(codec_file):
    return MaskCodec.from_npz(codec_file)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _ellipse(width, height, cx, cy, rx, ry):
    yy, xx = np.mgrid[0:height, 0:width]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


# ---- the codec trained here ---------------------------------------------------------------------------------


def test_trained_codec_is_in_vae_oid_layout_and_reconstructs_masks(codec_file, codec):
    with np.load(codec_file) as npz:
        assert npz["_vq_vae._embedding"].shape[0] == 128  # one code per <segNNN> token
        assert {
            "encoder.0.weight",
            "encoder.8.net.4.bias",
            "decoder.3.net.0.weight",
            "decoder.12.bias",
        } <= set(npz.files)
    masks = shape_masks64(100, seed=99)  # shapes the codec never saw
    recon = codec.decode(codec.encode(masks)) > 0
    ious = [_iou(r, m > 0.5) for r, m in zip(recon, masks, strict=True)]
    assert np.mean(ious) > 0.8
    ellipse = crop_to_64(_ellipse(90, 60, 45, 30, 30, 20))
    assert _iou(codec.decode(codec.encode(ellipse))[0] > 0, ellipse > 0.5) > 0.8


def test_training_is_seeded():
    a = train_codec(steps=2, num_masks=16, batch_size=4, seed=3).to_arrays()
    b = train_codec(steps=2, num_masks=16, batch_size=4, seed=3).to_arrays()
    c = train_codec(steps=2, num_masks=16, batch_size=4, seed=4).to_arrays()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_the_default_cache_file_is_reused(tmp_path, monkeypatch, codec_file, capsys):
    monkeypatch.setenv("PG_FINETUNE_CACHE", str(tmp_path))
    cached = tmp_path / TINY_FILE
    cached.write_bytes(codec_file.read_bytes())
    before = cached.stat().st_mtime_ns
    assert tiny_codec_path() == cached and cached.stat().st_mtime_ns == before  # found, not retrained
    assert train_main([]) == 0
    assert "exists" in capsys.readouterr().out


# ---- targets and the parser ---------------------------------------------------------------------------------


def test_mask_to_suffix_bins_the_masks_own_extent(codec):
    mask = np.zeros((50, 100), bool)
    mask[5:25, 10:30] = True  # x 10..29, y 5..24: box (10, 5, 30, 25), x2/y2 exclusive
    suffix = mask_to_suffix(mask, codec)
    assert SUFFIX_RE.fullmatch(suffix)
    # round(5/50*1023)=102 (y1), round(10/100*1023)=102 (x1), round(511.5)=512 half to even (y2), round(306.9)=307
    assert suffix.startswith("<loc0102><loc0102><loc0512><loc0307>")
    back = suffix_to_mask(suffix, 100, 50, codec)
    assert back.shape == (50, 100) and _iou(back, mask) > 0.8
    with pytest.raises(ValueError, match="empty"):
        mask_to_suffix(np.zeros((8, 8), bool), codec)


SEG16 = "".join(f"<seg{i:03d}>" for i in range(16))


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<loc0010><loc0020><loc0500><loc0600>" + SEG16, None),
        ("<loc0010><loc0020><loc0500><loc0600>" + SEG16 + " the cat ; <loc0001>", None),  # the rest is ignored
        (" <loc0010> <loc0020><loc0500><loc0600> " + SEG16.replace("><", "> <"), None),  # whitespace between tokens
        ("<loc0010><loc0020><loc0500><loc0600>" + SEG16[:-8], "15 seg tokens after the box, expected 16"),
        ("<loc0010><loc0020><loc0500>" + SEG16, "3 location tokens at the start"),
        ("<loc0010><loc0020><loc0500><loc0600><loc0001>" + SEG16, "5 location tokens"),
        ("a cat <loc0010><loc0020><loc0500><loc0600>" + SEG16, "0 location tokens"),
        ("", "0 location tokens"),
        ("<loc0010><loc0020><loc1024><loc0600>" + SEG16, "<loc1024> is outside 0..1023"),
        ("<loc0010><loc0020><loc0500><loc0600>" + SEG16.replace("<seg015>", "<seg128>"), "<seg128> is outside 0..127"),
        ("<loc010><loc0020><loc0500><loc0600>" + SEG16, "<loc010> is not a 4-digit loc token"),
        ("<loc0500><loc0020><loc0500><loc0600>" + SEG16, "empty or inverted box"),
        ("<loc0010><loc0600><loc0500><loc0020>" + SEG16, "empty or inverted box"),
    ],
)  # fmt: skip
def test_parser_follows_big_visions_validity_rules(text, problem):
    parsed = parse_segmentation(text)
    if problem is None:
        assert (
            parsed.problem is None and parsed.bins == (10, 20, 500, 600) and parsed.codes == tuple(range(16))
        )
    else:
        assert parsed.problem is not None and parsed.problem.startswith(problem)


def test_extra_seg_tokens_are_ignored_with_a_note():
    parsed = parse_segmentation("<loc0010><loc0020><loc0500><loc0600>" + SEG16 + "<seg100>")
    assert parsed.problem is None and parsed.codes == tuple(range(16)) and "first 16" in parsed.notes[0]


# ---- scoring through eval.run -------------------------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(tmp_path, refs, preds, *extra):
    out = tmp_path / "out"
    code = eval_main(["--benchmark", "refcoco_seg", "--predictions", _write(tmp_path / "p.jsonl", preds),
                      "--references", _write(tmp_path / "r.jsonl", refs), "--out", str(out), "--quiet", *extra])  # fmt: skip
    if code != 0:
        return code, None, None
    scores = json.loads((out / "scores.json").read_text())
    return (
        code,
        {k.split("/")[-1]: v for k, v in scores.items()},
        json.loads((out / "report.json").read_text()),
    )


def test_box_accuracy_and_invalid_rate_worked_by_hand(tmp_path, codec, codec_file):
    # A 1023 x 1023 image: bin b is pixel b, so the box IoUs below are exact.
    mask = np.zeros((1023, 1023), bool)
    mask[0:100, 0:100] = True
    seg = mask_to_suffix(mask, codec)[36:]  # the 16 seg tokens of the true mask
    ref = {
        "mask": mask_rle(mask),
        "width": 1023,
        "height": 1023,
        "box": [0, 0, 100, 100],
        "codec": str(codec_file),
    }
    refs = [{"id": str(k), **ref} for k in range(4)]
    preds = [
        {"id": "0", "prediction": "<loc0000><loc0000><loc0100><loc0100>" + seg},  # box IoU 1
        {"id": "1", "prediction": "<loc0000><loc0000><loc0100><loc0060>" + seg},  # 60 / 100 = 0.6
        {"id": "2", "prediction": "<loc0000><loc0000><loc0100><loc0040>" + seg},  # 0.4
        {"id": "3", "prediction": "<loc0000><loc0000><loc0100>" + seg},  # invalid: box IoU 0, mask IoU 0
    ]
    code, scores, report = _run(tmp_path, refs, preds)
    assert code == 0
    assert scores["boxacc@0.5"] == pytest.approx(2 / 4)
    assert scores["boxacc@0.75"] == pytest.approx(1 / 4)
    assert scores["invalid_rate"] == pytest.approx(1 / 4)
    assert list(report["problems"]) == ["3"] and "invalid output" in report["problems"]["3"][0]
    # The decoded square squeezed into narrower boxes: mask IoU at most the box's share of the truth.
    each = get_task("segment").metric.scores_each([p["prediction"] for p in preds], refs_checked(refs), None)
    assert each[0] > 0.8 and each[1] <= 0.6 + 1e-9 and each[2] <= 0.4 + 1e-9 and each[3] == 0.0
    assert scores["miou"] == pytest.approx(sum(each) / 4)


def refs_checked(rows):
    metric = get_task("segment").metric
    return [metric.reference(r) for r in rows]


def test_perfect_predictions_score_the_codec_reconstruction_iou(tmp_path, codec, codec_file, monkeypatch):
    monkeypatch.setenv(
        "PG_FINETUNE_MASK_CODEC", str(codec_file)
    )  # references name no codec: the env var does
    rng = np.random.default_rng(7)
    refs, perfect, shifted, recon = [], [], [], []
    for k in range(12):
        width, height = int(rng.integers(80, 200)), int(rng.integers(80, 200))
        mask = random_shape_mask(rng, width, height)
        if k == 0:  # one reference as a PNG file
            png = tmp_path / "mask0.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(png)
            mask_field = str(png)
        else:
            mask_field = mask_rle(mask)
        refs.append(
            {"id": f"m{k}", "mask": mask_field, "width": width, "height": height, "expression": "the shape"}
        )
        suffix = mask_to_suffix(mask, codec)
        perfect.append({"id": f"m{k}", "prediction": suffix + " the shape"})
        bins = [int(b) for b in re.findall(r"<loc(\d{4})>", suffix)]
        moved = [
            bins[0],
            min(bins[1] + (bins[3] - bins[1]) // 2, 1022),
            bins[2],
            1023,
        ]  # half a width to the right
        shifted.append({"id": f"m{k}", "prediction": "".join(f"<loc{b:04d}>" for b in moved) + suffix[36:]})
        crop = crop_to_64(mask)
        recon.append(_iou(codec.decode(codec.encode(crop))[0] > 0, crop > 0.5))
    code, good, report = _run(tmp_path, refs, perfect)
    assert code == 0 and report["mask_codec"] == str(codec_file) and len(report["mask_codec_sha256"]) == 16
    assert good["invalid_rate"] == 0 and good["boxacc@0.75"] == 1.0
    assert good["miou"] > 0.8 and good["miou"] == pytest.approx(np.mean(recon), abs=0.05)
    code, bad, _ = _run(tmp_path, refs, shifted)
    assert code == 0 and bad["miou"] < good["miou"] - 0.2 and bad["boxacc@0.75"] < 1.0


def test_references_that_cannot_be_scored_are_reported(tmp_path, codec_file):
    mask = np.zeros((20, 30), bool)
    mask[2:8, 3:9] = True
    good = {"id": "ok", "mask": mask_rle(mask), "width": 30, "height": 20, "codec": str(codec_file)}
    refs = [
        good,
        {**good, "id": "size", "width": 31},
        {**good, "id": "empty", "mask": mask_rle(np.zeros((20, 30), bool))},
        {**good, "id": "nomask", "mask": None},
        {"id": "missing", "width": 30, "height": 20},
        {**good, "id": "png", "mask": str(tmp_path / "nope.png")},
        {**good, "id": "codec", "codec": str(tmp_path / "nope.npz")},
        {**good, "id": "rle", "mask": {"size": [20, 30], "counts": [1, 2]}},
    ]
    code, scores, report = _run(tmp_path, refs, [{"id": "ok", "prediction": "nothing"}])
    assert code == 0 and scores["invalid_rate"] == 1.0
    problems = {b["id"]: b["problem"] for b in report["bad_references"]}
    assert set(problems) == {"size", "empty", "nomask", "missing", "png", "codec", "rle"}
    assert "31 x 20" in problems["size"] and "empty" in problems["empty"] and "'mask'" in problems["missing"]
    assert (
        "train_codec" in problems["codec"]
        and "not found" in problems["png"]
        and "sum to 3" in problems["rle"]
    )


def test_uncompressed_rle_and_the_mask_extent_as_default_box(codec_file, monkeypatch):
    monkeypatch.setenv("PG_FINETUNE_MASK_CODEC", str(codec_file))
    mask = np.zeros((6, 5), bool)
    mask[1:3, 2:4] = True
    counts, last, run = [], False, 0
    for v in mask.flatten(order="F"):  # COCO RLE runs go down the columns, starting with zeros
        if v != last:
            counts.append(run)
            last, run = v, 0
        run += 1
    counts.append(run)
    assert np.array_equal(rle_to_mask({"size": [6, 5], "counts": counts}), mask)
    ref = get_task("segment").metric.reference(
        {"mask": {"size": [6, 5], "counts": counts}, "width": 5, "height": 6}
    )
    assert ref["box"] == [2.0, 1.0, 4.0, 3.0] and np.array_equal(rle_to_mask(ref["mask"]), mask)
    assert get_task("segment").describe_reference(ref) == "box (2, 1, 4, 3), mask of 4 px\n5 x 6 px"


def test_task_and_benchmark_are_registered():
    task, bench = get_task("segment"), get_benchmark("refcoco_seg")
    assert bench.get_task() is task and bench.prefix == "segment {expression}" and bench.split == "validation"
    assert task.prompt({"expression": "the  red cup"}) == "segment the red cup"
    assert task.prompt({"prefix": "segment cat"}) == "segment cat" and task.prompt({}) == "segment"
    assert list(task.metric.score([], [], None).metrics) == [
        "miou",
        "boxacc@0.5",
        "boxacc@0.75",
        "invalid_rate",
    ]


# ---- the offline easy-VQA segmentation data -------------------------------------------------------------------


def test_easyvqa_segment_data_trains_and_scores(tmp_path, codec_file):
    from pg_finetune.data import load_records
    from pg_finetune.tasks.segment.easyvqa import main as make_main

    out = tmp_path / "ds"
    assert make_main(["--out", str(out), "--split", "test", "--limit", "12", "--codec", str(codec_file)]) == 0
    path = out / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12 and {r["prefix"] for r in rows} <= {
        "segment circle",
        "segment rectangle",
        "segment triangle",
    }
    assert all(SUFFIX_RE.fullmatch(r["suffix"]) and r["codec"] == str(codec_file.resolve()) for r in rows)
    dataset = load_records(str(path), "test")  # the JSONL source reads it as training data
    first = dataset[0]
    assert len(dataset) == 12 and first["suffix"] == rows[0]["suffix"] and first["image"].size == (64, 64)
    preds = [{"id": r["id"], "prediction": r["suffix"]} for r in rows]
    code, scores, _ = _run(tmp_path, rows, preds)
    assert code == 0 and scores["invalid_rate"] == 0 and scores["miou"] > 0.7
