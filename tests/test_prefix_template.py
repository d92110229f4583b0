"""`task.prefix` templates ("answer en {question}") and VQAv2-style answer lists."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pg_finetune.data import BadRecordError, load_records
from pg_finetune.tasks import get_task


def _jsonl(tmp_path, rows):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prefix_template_is_filled_from_each_record(tmp_path):
    path = _jsonl(tmp_path, [
        {"image": "a.png", "question": "what color is it?", "suffix": "red"},
        {"image": "a.png", "question": "is it round?", "suffix": "no"},
        {"image": "a.png", "prefix": "answer en kept as is", "question": "ignored?", "suffix": "yes"},
    ])
    ds = load_records(path, "train", default_prefix="answer en {question}")
    assert [ds.rows_meta(i)["prefix"] for i in range(3)] == [
        "answer en what color is it?", "answer en is it round?", "answer en kept as is",
    ]


def test_prefix_template_with_a_missing_field_names_record_and_field(tmp_path):
    path = _jsonl(tmp_path, [
        {"image": "a.png", "question": "what color is it?", "suffix": "red"},
        {"image": "a.png", "suffix": "no"},
    ])
    with pytest.raises(BadRecordError, match=r"vqa\.jsonl:2.*'question'"):
        load_records(path, "train", default_prefix="answer en {question}")


def test_vqav2_answer_dicts_become_reference_strings():
    record = {"suffix": "2", "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": 1},
                                         {"answer": "two", "answer_confidence": "maybe", "answer_id": 2}]}
    assert get_task("vqa").reference(record) == ["2", "two"]
    assert get_task("vqa").reference({"suffix": "yes"}) == ["yes"]
