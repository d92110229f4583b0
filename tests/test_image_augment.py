"""data.augment: big_vision's inception_crop, resize_small|random_crop and zoomout on training records.

References are worked by hand: TensorFlow's crop sampler on cases whose rounding is computed in the
comments, crop geometry read back from a coordinate-coded image, and zoomout's boxes found as the
pixels of a box drawn in red, compared with the location tokens of the moved suffix.
"""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pg_finetune.image_augment import (
    ImageAugment,
    _generate_random_crop,
    augment_problems,
    augment_record,
    parse_augment,
    sample_inception_crop,
)
from pg_finetune.recipe import RecipeError, recipe_from_dict
from pg_finetune.tasks.detect.augment import EpochCallback

RED = (255, 0, 0)


class ZeroRng:
    """randrange / randint always 0, random() always 0: pins every draw of the sampler."""

    def randrange(self, n):
        assert n >= 1
        return 0

    def random(self):
        return 0.0


def ops(spec: str) -> list:
    parsed, problems = parse_augment(spec)
    assert not problems, problems
    return parsed


def coordinate_image(width: int, height: int) -> Image.Image:
    """Pixel (x, y) holds (x, y, 7): a crop's position can be read back from its first pixel."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 7)], -1).astype(np.uint8))


# ---------------------------------------------------------------------------------------- inception_crop


def test_crop_sampler_worked_by_hand():
    # 100 x 100, area 50-100 %, aspect 1: h = round(sqrt(5000)) = 71, max_h = 100, + Uniform -> 0;
    # w = 71, area 5041 >= 5000; y = x = 0.
    assert _generate_random_crop(100, 100, 0.5, 1.0, 1.0, ZeroRng()) == (0, 0, 71, 71)
    # 10 x 10: h = round(sqrt(50)) = 7 gives area 49 < 50, so one pixel taller: 8 x 8 = 64.
    assert _generate_random_crop(10, 10, 0.5, 1.0, 1.0, ZeroRng()) == (0, 0, 8, 8)
    # 100 x 50 at aspect 1.33 cannot reach 90 % of the area: h is capped at 50 (w 66 or 67), and two
    # pixels taller is still < 4500 -> the attempt fails, and after every attempt the whole image is used.
    assert _generate_random_crop(100, 50, 0.9, 1.0, 1.33, ZeroRng()) is None
    assert sample_inception_crop(100, 50, random.Random(0), (0.9, 1.0), (1.33, 1.33)) == (0, 0, 100, 50)


def test_inception_crop_area_and_aspect_stay_in_range_over_many_draws():
    width, height = 200, 150
    rng = random.Random(123)
    areas, aspects = [], []
    for _ in range(600):
        x, y, w, h = sample_inception_crop(width, height, rng, (0.5, 1.0), (0.75, 1.33))
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height
        assert 0.5 <= w * h / (width * height) <= 1.0
        # w = round(h * aspect) with aspect in [0.75, 1.33]: w / h is within 0.5 / h of the range
        assert 0.75 - 0.5 / h <= w / h <= 1.33 + 0.5 / h
        areas.append(w * h / (width * height))
        aspects.append(w / h)
    # the whole ranges are used, not one corner of them
    assert min(areas) < 0.55 and max(areas) > 0.95
    assert min(aspects) < 0.8 and max(aspects) > 1.25


def test_inception_crop_cuts_the_sampled_window_out_of_the_image():
    image = coordinate_image(200, 150)
    record = {"image": image, "prefix": "caption en", "suffix": "a cat"}
    for seed in range(20):
        out = augment_record(record, ops("inception_crop(area_min=50)"), random.Random(seed))
        x, y, w, h = sample_inception_crop(200, 150, random.Random(seed), (0.5, 1.0), (0.75, 1.33))
        assert out["image"].size == (w, h)
        assert out["image"].getpixel((0, 0)) == (x, y, 7)
        assert out["image"].getpixel((w - 1, h - 1)) == (x + w - 1, y + h - 1, 7)
        assert out["suffix"] == "a cat"
    assert image.size == (200, 150)  # the source image (maybe cached by the dataset) is not touched


# ---------------------------------------------------------------------------------- resize_small | random_crop


def test_resize_small_then_random_crop():
    # 160 x 120 -> resize_small(128): factor 128 / 120, width round(170.67) = 171; then 112 x 112 at an
    # offset in [0, 59] x [0, 16], both ends included (tf.image.random_crop)
    image = coordinate_image(160, 120)
    resized = augment_record({"image": image}, ops("resize_small(128)"), random.Random(0))["image"]
    assert resized.size == (171, 128)
    offsets = set()
    for seed in range(150):
        out = augment_record({"image": image}, ops("resize_small(128)|random_crop(112)"), random.Random(seed))
        assert out["image"].size == (112, 112)
        rng = random.Random(seed)
        y, x = rng.randint(0, 16), rng.randint(0, 59)
        assert np.array_equal(np.asarray(out["image"]), np.asarray(resized)[y : y + 112, x : x + 112])
        offsets.add(y)
    assert {0, 16} <= offsets


# -------------------------------------------------------------------------------------------------- zoomout


def red_box_record() -> dict:
    """100 x 80 grey image, a red box over pixels x 20..59, y 10..39: box [20, 10, 60, 40].
    Bins by hand (round(v / size * 1023), halves to even): y1 10/80 -> 127.875 -> 128,
    x1 20/100 -> 204.6 -> 205, y2 40/80 -> 511.5 -> 512, x2 60/100 -> 613.8 -> 614."""
    pixels = np.full((80, 100, 3), 128, np.uint8)
    pixels[10:40, 20:60] = RED
    return {
        "image": Image.fromarray(pixels),
        "prefix": "detect red box",
        "suffix": "<loc0128><loc0205><loc0512><loc0614> red box",
        "boxes": [[20, 10, 60, 40]],
        "labels": ["red box"],
        "width": 100,
        "height": 80,
        "mask": "old-frame.png",
    }


def extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1  # x1, y1, x2, y2 (pixel edges)


def test_zoomout_moves_the_suffix_boxes_with_the_red_pixels():
    record = red_box_record()
    seen_sizes = set()
    for seed in range(12):
        out = augment_record(record, ops("zoomout(max_f=2)"), random.Random(seed))
        pixels = np.asarray(out["image"])
        width, height = out["image"].size
        seen_sizes.add((width, height))
        assert 100 <= width <= 200 and 80 <= height <= 160 and abs(width / height - 1.25) < 0.02
        # where the image went: the non-black pixels (grey background) form a 100 x 80 block
        x0, y0, x1, y1 = extent(pixels.sum(-1) > 0)
        assert (x1 - x0, y1 - y0) == (100, 80)
        assert pixels[pixels.sum(-1) == 0].size + 100 * 80 * 3 == pixels.size  # the rest is black canvas
        red = extent(np.all(pixels == RED, -1))
        assert red == (20 + x0, 10 + y0, 60 + x0, 40 + y0)
        # the suffix's tokens, decoded in the new frame (bin / 1023 * size), land on the red pixels
        bins = [int(b) for b in re.findall(r"<loc(\d{4})>", out["suffix"])]
        assert len(bins) == 4 and out["suffix"].endswith("> red box")
        y1_, x1_, y2_, x2_ = (
            b / 1023 * size for b, size in zip(bins, (height, width, height, width), strict=True)
        )
        assert np.allclose([x1_, y1_, x2_, y2_], red, atol=0.5), (bins, red, (width, height))
        assert out["boxes"] == [[20.0 + x0, 10.0 + y0, 60.0 + x0, 40.0 + y0]]
        assert (out["width"], out["height"]) == (width, height)
        assert "mask" not in out
    assert len(seen_sizes) > 5  # the zoom factor is drawn, not fixed


def test_zoomout_keeps_the_seg_codes_and_every_object():
    record = red_box_record()
    record["suffix"] = (
        "<loc0128><loc0205><loc0512><loc0614><seg001><seg127> red ; <loc0000><loc0000><loc1023><loc1023> all"
    )
    out = augment_record(record, ops("zoomout(max_f=1.5)"), random.Random(3))
    width, height = out["image"].size
    assert (width, height) != (100, 80)
    first, second = out["suffix"].split(" ; ")
    assert first.endswith("><seg001><seg127> red") and second.endswith("> all")
    # the whole old image, moved: its corners are where the grey block starts and ends
    x0, y0, x1, y1 = extent(np.asarray(out["image"]).sum(-1) > 0)
    hand = [round(v / size * 1023) for v, size in ((y0, height), (x0, width), (y1, height), (x1, width))]
    assert [int(b) for b in re.findall(r"<loc(\d{4})>", second)] == hand


def test_records_without_boxes_keep_their_text():
    record = {"image": coordinate_image(64, 48), "prefix": "answer en what?", "suffix": "yes", "id": "q1"}
    out = augment_record(record, ops("zoomout(max_f=1.5)|resize_small(32)"), random.Random(1))
    assert {k: v for k, v in out.items() if k != "image"} == {k: v for k, v in record.items() if k != "image"}
    assert min(out["image"].size) == 32


# ---------------------------------------------------------------------------------------- seeds and epochs


class ListRecords:
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def rows_meta(self, i):
        return {k: v for k, v in self.records[i].items() if k != "image"}


def draws(data: ImageAugment) -> list[tuple[bytes, str]]:
    return [(data[i]["image"].tobytes(), data[i]["suffix"]) for i in range(len(data))]


def test_same_seed_and_epoch_same_images_other_epoch_or_seed_other_images():
    records = ListRecords([red_box_record() for _ in range(4)])
    spec = ops("zoomout(max_f=2)")
    first = ImageAugment(records, spec, seed=7)
    first.set_epoch(1)
    again = ImageAugment(records, spec, seed=7)  # another process, or a resumed run
    again.set_epoch(1)
    assert draws(first) == draws(again)
    other_epoch = ImageAugment(records, spec, seed=7)
    other_epoch.set_epoch(2)
    other_seed = ImageAugment(records, spec, seed=8)
    other_seed.set_epoch(1)
    for other in (other_epoch, other_seed):
        assert sum(a != b for a, b in zip(draws(first), draws(other), strict=True)) >= 3
    # within one epoch the records (the same source image) get different draws too
    assert len({image for image, _ in draws(first)}) >= 3


@pytest.mark.parametrize("state_epoch", [1.0, 1.5])
def test_resume_mid_epoch_reproduces_the_stream(state_epoch):
    """A run resumed in epoch 1 (state.epoch 1.5) sees epoch 1's images again, as the killed run did."""
    records = ListRecords([red_box_record() for _ in range(3)])
    spec = ops("resize_small(90)|zoomout(max_f=1.5)")
    killed = ImageAugment(records, spec, seed=0)
    EpochCallback(killed).on_epoch_begin(None, SimpleNamespace(epoch=1.0), None)
    resumed = ImageAugment(records, spec, seed=0)
    EpochCallback(resumed).on_epoch_begin(None, SimpleNamespace(epoch=state_epoch), None)
    assert resumed.epoch == 1 and draws(resumed) == draws(killed)
    assert resumed[0] is not None and resumed.rows_meta(0)["suffix"] == records[0]["suffix"]


# ------------------------------------------------------------------------------------------------ recipes


def recipe_problems(augment, task="vqa") -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"task": {"name": task}, "data": {"augment": augment}})
    return info.value.problems


def test_recipe_accepts_the_big_vision_strings():
    for spec in ("inception_crop(area_min=50)", "resize_small(256)|random_crop(224)", "zoomout(max_f=1.5)"):
        assert recipe_from_dict({"task": {"name": "caption"}, "data": {"augment": spec}}).data.augment == spec
    assert recipe_from_dict(
        {"task": {"name": "detect"}, "data": {"augment": "zoomout(1.5)|resize_small(224)"}}
    )


@pytest.mark.parametrize(
    "augment, task, words",
    [
        (
            "inceptoin_crop",
            "vqa",
            ["data.augment", "did you mean 'inception_crop'", "valid ops: inception_crop"],
        ),
        ("inception_crop(224, area_min=50)", "caption", ["data.augment", "no output size", "area_min="]),
        ("random_crop(224)", "caption", ["data.augment", "resize_small(n) with n >= 224"]),
        ("resize_small(256)|random_crop(300)", "caption", ["n >= 300"]),
        ("zoomout(max_f=0.5)", "vqa", ["max_f must be in [1, 8]"]),
        ("zoomout(scale=2)", "vqa", ["unknown argument 'scale'", "zoomout(max_f=1.5)"]),
        ("", "vqa", ["data.augment: empty", "null"]),
        (
            "inception_crop",
            "detect",
            ["data.augment: inception_crop is refused for task 'detect'", "zoomout"],
        ),
        ("resize_small(256)|random_crop(224)", "segment", ["random_crop is refused for task 'segment'"]),
    ],
)
def test_bad_augment_is_refused_by_key_with_the_fix(augment, task, words):
    problems = recipe_problems(augment, task)
    assert len(problems) == 1, problems
    for word in words:
        assert word in problems[0], problems[0]


def test_every_problem_is_listed_at_once():
    assert len(augment_problems("nope|zoomout(max_f=9)|random_crop(10)", "vqa")) == 3
