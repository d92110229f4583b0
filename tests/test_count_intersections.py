"""Line-intersection counting: exact geometry, the balanced generator, the task's parser and metric."""

from __future__ import annotations

import json
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # data_prep/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(REPO))

from pg_finetune.prep.count_intersections import (  # noqa: E402
    COLORS,
    CollinearOverlapError,
    class_quotas,
    count_intersections,
    generate,
    intersection_points,
    main,
    reject_reason,
)
from pg_finetune.tasks.base import Task  # noqa: E402
from pg_finetune.tasks.count import COUNT, count_accuracy, parse_count  # noqa: E402


# ------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize(
    ("line_a", "line_b", "expected"),
    [
        # plain X: one crossing at (5, 5)
        ([[0, 0], [10, 10]], [[0, 10], [10, 0]], 1),
        # tent y = 2x, then 10 - 2(x - 5), cut by y = 4 at x = 2 and x = 8
        ([[0, 0], [5, 10], [10, 0]], [[0, 4], [10, 4]], 2),
        # parallel lines, and two parallel tents 3 apart
        ([[0, 0], [10, 0]], [[0, 5], [10, 5]], 0),
        ([[0, 0], [5, 5], [10, 0]], [[0, 3], [5, 8], [10, 3]], 0),
        # crossing exactly at a's middle vertex (5, 5): both of a's segments report it, one point
        ([[0, 0], [5, 5], [10, 10]], [[0, 10], [10, 0]], 1),
        # a's peak (5, 5) touches the horizontal y = 5 without crossing: touching counts as one point
        ([[0, 0], [5, 5], [10, 0]], [[0, 5], [10, 5]], 1),
        # a peak resting on a valley at (5, 5): four segment pairs meet there, one point
        ([[0, 0], [5, 5], [10, 0]], [[0, 10], [5, 5], [10, 10]], 1),
        # collinear segments meeting end to end only: one point, not an overlap
        ([[0, 0], [5, 0]], [[5, 0], [10, 0]], 1),
        # lines sharing their first point, apart after it
        ([[0, 0], [5, 5], [10, 5]], [[0, 0], [5, -5], [10, -5]], 1),
        # lines sharing both end points (a lens): two points
        ([[0, 0], [5, 5], [10, 0]], [[0, 0], [5, -5], [10, 0]], 2),
    ],
)
def test_count_intersections_hand_made(line_a, line_b, expected):
    assert count_intersections(line_a, line_b) == expected
    assert count_intersections(line_b, line_a) == expected  # symmetric


def test_intersection_points_are_exact_and_deduplicated():
    # (0,0)-(3,1) and (0,1)-(3,0) cross at (3/2, 1/2): not representable as an integer pixel
    assert intersection_points([[0, 0], [3, 1]], [[0, 1], [3, 0]]) == {(Fraction(3, 2), Fraction(1, 2))}
    assert intersection_points([[0, 0], [5, 5], [10, 10]], [[0, 10], [10, 0]]) == {(Fraction(5), Fraction(5))}


@pytest.mark.parametrize(
    ("line_a", "line_b"),
    [
        ([[0, 0], [10, 0]], [[5, 0], [15, 0]]),  # partial overlap
        ([[0, 0], [5, 5], [10, 0]], [[0, 0], [5, 5], [10, 10]]),  # identical first segments
        ([[0, 0], [10, 10]], [[2, 2], [4, 4]]),  # one segment inside the other
    ],
)
def test_collinear_overlap_is_flagged_and_rejected(line_a, line_b):
    with pytest.raises(CollinearOverlapError):
        count_intersections(line_a, line_b)
    assert reject_reason(line_a, line_b, size=96, line_width=4) == "collinear_overlap"


@pytest.mark.parametrize(
    ("line_a", "line_b", "reason"),
    [
        # clean: a tent crossing a horizontal at x = 29 and x = 67, far from everything
        ([[10, 80], [48, 10], [86, 80]], [[10, 50], [86, 50]], None),
        # b's vertex (48, 45) is 5 px above a, without touching: looks like a touch
        ([[10, 40], [48, 40], [86, 40]], [[10, 80], [48, 45], [86, 80]], "near_miss"),
        # b dips through y = 40 at x ~ 45.3 and ~ 50.7: two crossings 5.3 px apart
        ([[10, 40], [48, 40], [86, 40]], [[10, 80], [48, 37], [86, 80]], "points_too_close"),
        # one crossing at (2, 2), within 8 px of the border
        ([[0, 0], [20, 20]], [[0, 4], [4, 0]], "near_border"),
    ],
)
def test_reject_reason(line_a, line_b, reason):
    assert reject_reason(line_a, line_b, size=96, line_width=4) == reason


# ------------------------------------------------------------------------------------------ generator
def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("count")
    summary = generate(out, num=30, seed=0, size=96, line_width=4, split="train", progress=False)
    return out, summary


def test_generator_is_deterministic(generated, tmp_path):
    out, _ = generated
    generate(tmp_path / "again", num=30, seed=0, size=96, line_width=4, progress=False)
    generate(tmp_path / "other", num=30, seed=1, size=96, line_width=4, progress=False)
    text = (out / "train.jsonl").read_text()
    assert (tmp_path / "again/train.jsonl").read_text() == text
    assert (tmp_path / "again/images/train_00007.png").read_bytes() == (
        out / "images/train_00007.png"
    ).read_bytes()
    assert (tmp_path / "other/train.jsonl").read_text() != text


def test_generator_balances_classes_and_labels_match_geometry(generated):
    out, summary = generated
    records = _read(out / "train.jsonl")
    assert len(records) == 30
    assert Counter(r["count"] for r in records) == {0: 10, 1: 10, 2: 10}
    assert summary["per_class"] == {0: 10, 1: 10, 2: 10}
    assert summary["candidates"] == 30 + sum(summary["rejected"].values())
    for r in records:
        assert r["count"] == count_intersections(*r["lines"])
        assert r["suffix"] == str(r["count"])
        assert r["prefix"] == "count the intersections"
        assert reject_reason(*r["lines"], size=96, line_width=4) is None
        assert [len(line) for line in r["lines"]] == [3, 3]
    assert len({r["id"] for r in records}) == 30


def test_generator_images_exist_with_size_and_both_colours(generated):
    out, _ = generated
    for r in _read(out / "train.jsonl"):
        with Image.open(out / r["image"]) as image:
            assert image.size == (96, 96)
            colours = {c for _, c in image.convert("RGB").getcolors(96 * 96)}
        assert set(COLORS) <= colours


def test_generator_classes_subset_and_quotas(tmp_path):
    assert class_quotas(5, [1, 2]) == {1: 3, 2: 2}
    summary = generate(tmp_path, num=5, seed=3, size=96, line_width=4, classes=[1, 2], progress=False)
    assert Counter(r["count"] for r in _read(tmp_path / "train.jsonl")) == {1: 3, 2: 2}
    assert summary["per_class"] == {1: 3, 2: 2}
    with pytest.raises(ValueError, match="classes"):
        generate(tmp_path, num=3, classes=[3], progress=False)


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--line-width" in capsys.readouterr().out
    main(
        [
            "--out",
            str(tmp_path),
            "--num",
            "4",
            "--size",
            "96",
            "--split",
            "test",
            "--classes",
            "0,2",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert "per class: 0: 2, 2: 2" in printed
    assert "rejected" in printed
    assert len(_read(tmp_path / "test.jsonl")) == 4
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--classes", "one"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--line-width", "0"], "--line-width must be at least 1"), (["--size", "0"], "--size must be at least 32"),
     (["--size", "40", "--line-width", "10"], "--size must be at least 80"), (["--num", "0"], "--num must be at least 1")],
)  # fmt: skip
def test_cli_refuses_settings_that_make_nonsense(tmp_path, capsys, args, message):
    # A 0-width line would write blank images labelled with counts; size 0 failed in randrange.
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_quiet_prints_nothing_and_returns_0(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--num", "2", "--size", "64", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert len(_read(tmp_path / "train.jsonl")) == 2


# ------------------------------------------------------------------------------------------ task
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2", "2"),
        ("03", "3"),
        ("two", "2"),
        (" Two. ", "2"),
        ("TEN!", "10"),
        ("(3)", "3"),
        ("'none'", "0"),
        ("Zero", "0"),
        # malformed: kept as written (stripped), scored as wrong
        ("-1", "-1"),
        ("+2", "+2"),
        ("1.5", "1.5"),
        (".5", ".5"),
        ("3 or 4", "3 or 4"),
        ("there are 2", "there are 2"),
        ("12 lines, 3 crossings", "12 lines, 3 crossings"),
        ("eleven", "eleven"),
        ("", ""),
        ("  many \n", "many"),
        ("someone", "someone"),
        ("²", "²"),  # a digit to str.isdigit, not an ASCII one
    ],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


def test_count_accuracy_by_hand():
    predictions = ["2", "1", "many", "0", "", "-2", "1.0", "3 or 2"]
    references = [["2"], ["2"], ["1"], ["0"], ["0"], ["2"], ["1"], ["2"]]
    # correct: yes, no, no (malformed), yes, no (empty), no ("-2" is not 2), no ("1.0" is not a whole
    # count), no (two numbers) -> 2/8; class 0: 1/2, class 1: 0/2, class 2: 1/4;
    # malformed: many, "", -2, 1.0, "3 or 2" -> 5/8
    scores = count_accuracy(predictions, references)
    assert scores == {"accuracy": 2 / 8, "accuracy/0": 0.5, "accuracy/1": 0.0, "accuracy/2": 0.25, "invalid_rate": 5 / 8}
    assert next(iter(scores)) == "accuracy"  # the headline metric comes first
    assert count_accuracy(["two", "1"], [["2"], ["1"]]) == {
        "accuracy": 1.0,
        "accuracy/1": 1.0,
        "accuracy/2": 1.0,
        "invalid_rate": 0.0,
    }
    # no reference at all: nothing to match, even an empty prediction is wrong, and no per-class key
    assert count_accuracy([""], [[]]) == {"accuracy": 0.0, "invalid_rate": 1.0}
    with pytest.raises(ValueError):
        count_accuracy(["1"], [])
    with pytest.raises(ValueError, match="not a count"):  # a bad reference is a data error, not a miss
        count_accuracy(["1"], [["1.5"]])


def test_task_references_accept_int_counts():
    assert isinstance(COUNT, Task)
    assert (COUNT.name, COUNT.default_prefix) == ("count_intersections", "count the intersections")
    assert COUNT.max_new_tokens == 4
    assert COUNT.reference({"count": 2, "suffix": "2"}) == ["2"]
    assert COUNT.reference({"count": 0, "suffix": "0"}) == ["0"]  # 0 is a count, not a missing field
    assert COUNT.reference({"suffix": "1"}) == ["1"]
    assert COUNT.reference({"count": ["2"]}) == ["2"]
    records = [{"count": 2, "suffix": "2"}, {"count": 0, "suffix": "0"}]
    predictions = [COUNT.parse("two"), COUNT.parse("1")]
    assert COUNT.score(predictions, [COUNT.reference(r) for r in records]).metrics == {
        "accuracy": 0.5,
        "accuracy/0": 0.0,
        "accuracy/2": 1.0,
        "invalid_rate": 0.0,
    }


def test_generated_jsonl_loads_as_records(generated):
    from pg_finetune.data import load_records

    out, _ = generated
    ds = load_records(str(out / "train.jsonl"), "train", default_prefix=COUNT.default_prefix)
    meta = ds.rows_meta(0)
    assert meta["count"] == int(meta["suffix"])
    assert COUNT.reference(meta) == [meta["suffix"]]
    assert ds[0]["image"].size == (96, 96)
