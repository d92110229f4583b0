"""Location tokens: binning arithmetic done by hand, edge bins, and the tolerant parser."""

from __future__ import annotations

import random

import pytest

from pg_finetune.loc import (
    NUM_BINS,
    decode_box,
    decode_value,
    detect_prefix,
    encode_box,
    encode_value,
    format_detections,
    parse_detections,
)


def test_num_bins():
    assert NUM_BINS == 1024


def test_encode_value_by_hand():
    # Exact halves round to even, as big_vision's tf.round (banker's rounding) does:
    # 320 / 640 * 1023 = 511.5 -> 512 (even)
    assert encode_value(320, 640) == 512
    # 5 / 2046 * 1023 = 2.5 -> 2 (even; half-up would give 3)
    assert encode_value(5, 2046) == 2
    # 1021 / 2046 * 1023 = 510.5 -> 510 (even; half-up would give 511)
    assert encode_value(1021, 2046) == 510
    # 7 / 2046 * 1023 = 3.5 -> 4 (even)
    assert encode_value(7, 2046) == 4
    # 100 / 480 * 1023 = 213.125 -> 213
    assert encode_value(100, 480) == 213
    # 0.4 / 1023 * 1023 = 0.4 -> 0
    assert encode_value(0.4, 1023) == 0


def test_decode_value_by_hand():
    # 512 / 1023 * 640 = 327680 / 1023 = 320.3128...
    assert decode_value(512, 640) == pytest.approx(320.3128054740958)
    assert decode_value(0, 640) == 0.0
    assert decode_value(1023, 640) == 640.0


def test_edges_and_clipping():
    # A box touching the right/bottom edge is in bin 1023, never 1024 (not in the vocabulary).
    assert encode_value(640, 640) == 1023
    assert encode_value(480, 480) == 1023
    assert encode_box((0, 0, 640, 480), 640, 480) == "<loc0000><loc0000><loc1023><loc1023>"
    assert encode_value(-3, 640) == 0
    assert encode_value(700, 640) == 1023
    assert encode_value(1e9, 640) == 1023


def test_bad_sizes_and_boxes_raise():
    with pytest.raises(ValueError):
        encode_value(1, 0)
    with pytest.raises(ValueError):
        decode_value(1, -5)
    with pytest.raises(ValueError, match="x1 <= x2"):
        encode_box((10, 0, 5, 5), 100, 100)


def test_encode_box_is_y_first():
    # width 1023, height 2046 so bins are easy: x bin = x, y bin = y / 2.
    # box x1=10 y1=20 x2=30 y2=40 -> y1 bin 10, x1 bin 10, y2 bin 20, x2 bin 30
    assert encode_box((10, 20, 30, 40), 1023, 2046) == "<loc0010><loc0010><loc0020><loc0030>"


def test_decode_box_returns_xyxy():
    # bins (y1, x1, y2, x2) = (10, 20, 30, 40) at width 1023, height 2046:
    # x1 = 20, y1 = 10 * 2 = 20, x2 = 40, y2 = 30 * 2 = 60
    assert decode_box((10, 20, 30, 40), 1023, 2046) == pytest.approx((20.0, 20.0, 40.0, 60.0))
    # Out-of-range bins are clipped into the image.
    assert decode_box((-5, 0, 2000, 1023), 100, 50) == pytest.approx((0.0, 0.0, 100.0, 50.0))


def test_roundtrip_within_half_a_bin():
    rng = random.Random(0)
    for _ in range(5000):
        size = rng.choice([rng.uniform(1, 5000), rng.randint(1, 2000)])
        v = rng.choice([rng.uniform(0, size), float(rng.randint(0, int(size))), size, 0.0])
        b = encode_value(v, size)
        assert 0 <= b <= 1023
        assert abs(decode_value(b, size) - v) <= size / 1023 / 2 + 1e-9 * size
        # Anything outside the image clips to the end bins.
        assert encode_value(-rng.uniform(1e-6, 1e4), size) == 0
        assert encode_value(size + rng.uniform(size / 1000, 1e4), size) == 1023


def test_format_detections_and_prefix():
    objects = [((0, 0, 1023, 1023), "cat"), ((10, 20, 30, 40), "  big   dog ")]
    text = format_detections(objects, 1023, 1023)
    assert text == "<loc0000><loc0000><loc1023><loc1023> cat ; <loc0020><loc0010><loc0040><loc0030> big dog"
    assert format_detections([], 100, 100) == ""
    with pytest.raises(ValueError):
        format_detections([((0, 0, 1, 1), "a;b")], 10, 10)
    assert detect_prefix(["cat", "dog", "cat", "bird"]) == "detect cat ; dog ; bird"
    with pytest.raises(ValueError):
        detect_prefix([])


def test_format_then_parse_roundtrip():
    objects = [((12.5, 40, 300, 470), "cat"), ((0, 0, 640, 480), "dog")]
    parsed = parse_detections(format_detections(objects, 640, 480), 640, 480)
    assert parsed.malformed == 0
    assert [d.label for d in parsed.detections] == ["cat", "dog"]
    for (box, _), det in zip(objects, parsed.detections, strict=True):
        half_bins = (640 / 2046, 480 / 2046, 640 / 2046, 480 / 2046)
        for got, want, tol in zip(det.box, box, half_bins, strict=True):
            assert abs(got - want) <= tol + 1e-9


# ---- the tolerant parser ----------------------------------------------------------------------------

GOOD = "<loc0000><loc0100><loc0200><loc0300> cat"


def test_parse_good_segment():
    result = parse_detections(GOOD, 1023, 2046)
    assert result.malformed == 0 and result.problems == []
    (det,) = result.detections
    assert det.label == "cat"
    assert det.bins == (0, 100, 200, 300)
    # x1 = 100, y1 = 0, x2 = 300, y2 = 200 * 2046 / 1023 = 400
    assert det.box == pytest.approx((100.0, 0.0, 300.0, 400.0))


def test_parse_empty_and_whitespace():
    for text in ("", "   ", " ; ", "\n"):
        result = parse_detections(text, 100, 100)
        assert (len(result.detections), result.malformed) == (0, 0)


def test_parse_whitespace_tolerant():
    text = (
        "  <loc0000> <loc0100>\t<loc0200> <loc0300>   hot   dog ;<loc0001><loc0001><loc0002><loc0002> cat ; "
    )
    result = parse_detections(text, 1023, 1023)
    assert result.malformed == 0
    assert [d.label for d in result.detections] == ["hot dog", "cat"]
    assert result.detections[0].bins == (0, 100, 200, 300)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("<loc12><loc0100><loc0200><loc0300> dog", "4-digit"),
        ("<loc0000><loc0100><loc0200> dog", "3 location tokens"),
        ("<loc0000><loc0100><loc0200><loc0300><loc0400> dog", "5 location tokens"),
        ("<loc0500><loc0100><loc0200><loc0300> dog", "inverted"),  # y2 < y1
        ("<loc0000><loc0400><loc0200><loc0300> dog", "inverted"),  # x2 < x1
        ("<loc0000><loc0100><loc0200><loc0300>", "missing label"),
        ("<loc0000><loc0100><loc0200><loc0300>   ", "missing label"),
        ("<loc0000><loc0100><loc0200><loc1024> dog", "outside"),
        ("the cat is on the mat", "no location tokens"),
        ("<loc0000><loc0100> dog <loc0200><loc0300>", "2 location tokens"),
    ],
)
def test_parse_counts_each_malformed_segment(bad, reason):
    result = parse_detections(f"{GOOD} ; {bad} ; {GOOD}", 1023, 1023)
    assert result.malformed == 1
    assert len(result.problems) == 1 and reason in result.problems[0]
    assert [d.bins for d in result.detections] == [(0, 100, 200, 300)] * 2
    assert result.segments == 3


def test_parse_allowed_labels():
    text = f"{GOOD} ; <loc0000><loc0000><loc0010><loc0010> unicorn ; <loc0000><loc0000><loc0010><loc0010> dog"
    result = parse_detections(text, 1023, 1023, allowed_labels=["cat", "dog"])
    assert result.malformed == 1 and "unicorn" in result.problems[0]
    assert [d.label for d in result.detections] == ["cat", "dog"]
    # Without a label list any label is kept.
    assert len(parse_detections(text, 1023, 1023).detections) == 3


def test_parse_only_garbage():
    result = parse_detections("I see a cat ; <loc0001 ; <<>>", 100, 100)
    assert result.detections == []
    assert result.malformed == 3


@pytest.mark.parametrize(
    "text",
    ["<loc0005><loc0005><loc0005><loc0005> dot", "<loc0005><loc0001><loc0005><loc0009> line",
     "<loc0001><loc0005><loc0009><loc0005> line"],
)  # fmt: skip
def test_parse_zero_size_box_is_malformed(text):
    # big_vision's segmentation/detection evaluator: valid only when y2 > y1 and x2 > x1.
    result = parse_detections(text, 1023, 1023)
    assert result.detections == [] and result.malformed == 1
    assert result.problems[0].startswith("zero-size box")
    assert parse_detections("<loc0005><loc0005><loc0006><loc0006> dot", 1023, 1023).malformed == 0
