"""Per-epoch detection augmentation: object order reshuffled per epoch, negatives only in the prompt."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest

from pg_finetune.loc import parse_detections
from pg_finetune.tasks.detect import make_prefix, make_suffix
from pg_finetune.tasks.detect.augment import DetectionAugment, EpochCallback, collect_classes

WIDTH, HEIGHT = 640, 480
CLASSES = ["cat", "dog", "bird", "car", "tree", "boat"]


class FakeRecords:
    """List-backed stand-in for RecordDataset (records carry a fake image)."""

    def __init__(self, metas: list[dict | None]):
        self.metas = metas

    def __len__(self) -> int:
        return len(self.metas)

    def __getitem__(self, i: int) -> dict | None:
        meta = self.metas[i]
        return None if meta is None else {"image": f"img{i}", **meta}

    def rows_meta(self, i: int) -> dict:
        return dict(self.metas[i] or {})


def detection_meta(i: int) -> dict:
    boxes = [[10 + i, 20, 200, 220], [300, 40 + i, 420, 300], [50, 310, 600, 470 - i]]
    labels = ["cat", "dog", "cat"] if i % 2 == 0 else ["bird", "car", "dog"]
    return {
        "id": f"r{i}",
        "prefix": make_prefix(labels),
        "suffix": make_suffix(boxes, labels, WIDTH, HEIGHT),
        "boxes": boxes,
        "labels": labels,
        "width": WIDTH,
        "height": HEIGHT,
    }


PLAIN = {"id": "plain", "prefix": "caption en", "suffix": "a cat on a mat"}


@pytest.fixture
def records() -> FakeRecords:
    return FakeRecords([detection_meta(i) for i in range(6)] + [dict(PLAIN), None])


def wrap(records, *, seed=0, shuffle=True, negatives=0, classes=CLASSES) -> DetectionAugment:
    return DetectionAugment(records, seed=seed, shuffle_objects=shuffle, negatives=negatives, all_classes=classes)


def objects(suffix: str) -> list[tuple]:
    parsed = parse_detections(suffix, WIDTH, HEIGHT)
    assert parsed.malformed == 0, parsed.problems
    return [(d.bins, d.label) for d in parsed.detections]


def prefix_classes(prefix: str) -> list[str]:
    assert prefix.startswith("detect ")
    return [c.strip() for c in prefix[len("detect ") :].split(";")]


def test_suffix_keeps_the_objects_in_every_epoch(records):
    data = wrap(records)
    for i in range(6):
        original = sorted(objects(records[i]["suffix"]))
        assert len(original) == 3
        for epoch in range(5):
            data.set_epoch(epoch)
            record = data[i]
            assert sorted(objects(record["suffix"])) == original
            assert record["prefix"] == records[i]["prefix"]  # no negatives asked for
            assert record["image"] == f"img{i}" and record["id"] == f"r{i}"


def test_order_changes_between_epochs(records):
    data = wrap(records)
    for i in range(6):
        orders = set()
        for epoch in range(8):
            data.set_epoch(epoch)
            orders.add(tuple(objects(data[i]["suffix"])))
        assert len(orders) > 1, f"record {i} kept one order over 8 epochs"


def test_same_epoch_same_record(records):
    a, b = wrap(records, seed=3, negatives=2), wrap(records, seed=3, negatives=2)
    for epoch in (0, 1, 7):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(6):
            first = a[i]
            assert a[i] == first  # read twice
            assert b[i] == first  # another wrapper, same seed
    # and it survives pickling (DataLoader workers get a copy)
    a.set_epoch(5)
    assert pickle.loads(pickle.dumps(a))[2] == a[2]


def test_same_record_in_another_process():
    # DataLoader workers and resumed runs are other processes: the stream must not hang on the salted hash()
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_augment as t; "
        "d = t.wrap(t.FakeRecords([t.detection_meta(i) for i in range(6)]), seed=5, negatives=2); d.set_epoch(3); "
        "print([(d[i]['prefix'], d[i]['suffix']) for i in range(6)])"
    )
    procs = [  # both at once: each is mostly a cold import of the stack
        subprocess.Popen(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for hash_seed in (1, 2)
    ]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in results]
    outputs = {out for out, _ in results}
    assert len(outputs) == 1, outputs


def test_seed_changes_the_order(records):
    suffixes = {tuple(wrap(records, seed=seed)[i]["suffix"] for i in range(6)) for seed in range(4)}
    assert len(suffixes) > 1


def test_no_shuffle_keeps_the_suffix(records):
    data = wrap(records, shuffle=False, negatives=2)
    for epoch in range(3):
        data.set_epoch(epoch)
        for i in range(6):
            assert data[i]["suffix"] == records[i]["suffix"]


def test_negatives_only_in_the_prompt(records):
    data = wrap(records, negatives=2)
    seen_absent = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        for i in range(6):
            record = data[i]
            present = set(records[i]["labels"])
            classes = prefix_classes(record["prefix"])
            assert len(classes) == len(set(classes)), classes  # no class twice
            assert present <= set(classes)
            absent = set(classes) - present
            assert len(absent) == 2 and absent <= set(CLASSES)
            seen_absent |= absent
            assert {label for _, label in objects(record["suffix"])} == present  # never a negative
    assert len(seen_absent) > 2  # the negatives are sampled, not always the same two


def test_negatives_capped_by_the_absent_classes(records):
    data = wrap(records, negatives=10, classes=["cat", "dog", "bird"])
    assert sorted(prefix_classes(data[0]["prefix"])) == ["bird", "cat", "dog"]  # present: cat, dog


def test_records_without_boxes_and_none_pass_through(records):
    data = wrap(records, negatives=2)
    data.set_epoch(4)
    assert data[6] == {"image": "img6", **PLAIN}
    assert data[7] is None
    assert len(data) == len(records) == 8


def test_rows_meta_and_classes(records):
    data = wrap(records)
    assert data.rows_meta(1) == records.rows_meta(1)
    assert collect_classes(records) == ["cat", "dog", "bird", "car"]
    assert collect_classes(data) == ["cat", "dog", "bird", "car"]


def test_negative_count_rejected(records):
    with pytest.raises(ValueError, match="negatives"):
        wrap(records, negatives=-1)


@pytest.mark.parametrize(("state_epoch", "expected"), [(None, 0), (0.0, 0), (1.0, 1), (2.75, 2), (3.0, 3)])
def test_callback_sets_the_epoch(records, state_epoch, expected):
    data = wrap(records)
    data.set_epoch(99)
    EpochCallback(data).on_epoch_begin(None, SimpleNamespace(epoch=state_epoch), None)
    assert data.epoch == expected
    reference = wrap(records)
    reference.set_epoch(expected)
    assert [data[i] for i in range(6)] == [reference[i] for i in range(6)]
