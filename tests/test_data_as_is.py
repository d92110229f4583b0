"""Datasets as users have them: configuration names, numeric targets, lower-cased captions, and bad
records counted right when DataLoader workers read them (issue #17 item 3).

Hub access is impossible here, so configurations are tested on a local dataset repository (a
README.md `configs:` block, as on the hub), which `datasets.load_dataset(path, name)` reads offline,
and the hub route by checking what reaches `datasets.load_dataset`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from pg_finetune.data import BadRecordError, load_records
from pg_finetune.data.bad_records import SubstituteBadRecords
from pg_finetune.data.records import REFERENCE_TEXT_FIELDS, suffix_text
from pg_finetune.recipe import RecipeError, recipe_from_dict
from pg_finetune.recipe_data import eval_dataset, train_dataset
from pg_finetune.tasks import TASKS
from pg_finetune.tasks.base import text_references


def _png(path: Path, color=(200, 30, 30)) -> str:
    Image.new("RGB", (8, 8), color).save(path)
    return str(path)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ configuration names
def _config_repo(tmp_path: Path) -> Path:
    """A dataset repository laid out as on the hub: two configurations, `small` the default."""
    repo = tmp_path / "plates"
    tmp_path.mkdir(parents=True, exist_ok=True)
    image = _png(tmp_path / "car.png")
    for config, suffixes in (("full", ["AB 123", "CD 456", "EF 789"]), ("small", ["GH 000"])):
        (repo / config).mkdir(parents=True)
        for split in ("train", "test"):
            _jsonl(repo / config / f"{split}.jsonl", [{"image": image, "prefix": "ocr", "suffix": s} for s in suffixes])
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: full\n  data_files:\n  - split: train\n    path: full/train.jsonl\n"
        "  - split: test\n    path: full/test.jsonl\n"
        "- config_name: small\n  default: true\n  data_files:\n  - split: train\n    path: small/train.jsonl\n"
        "  - split: test\n    path: small/test.jsonl\n---\n# plates\n"
    )
    return repo


def test_a_configuration_name_picks_that_configuration_of_a_local_dataset_repo(tmp_path):
    repo = _config_repo(tmp_path)
    (repo / "train.jsonl").write_text("")  # a file the {split}.jsonl layout would claim: the README wins
    full = load_records(repo, "train", config="full")
    assert [full.rows_meta(i)["suffix"] for i in range(len(full))] == ["AB 123", "CD 456", "EF 789"]
    assert "config full" in full.name
    default = load_records(repo, "train")  # README's `default: true`
    assert [default.rows_meta(i)["suffix"] for i in range(len(default))] == ["GH 000"]
    with pytest.raises(ValueError, match=r"configuration 'nope'.*'full', 'small'"):
        load_records(repo, "train", config="nope")


def test_a_configuration_name_reaches_load_dataset_for_a_hub_id(monkeypatch, tmp_path):
    import datasets

    calls = []
    image = _png(tmp_path / "a.png")

    def fake_load_dataset(path, name=None, *, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"image": [image], "prefix": ["count"], "label": [4]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_records("someone/count-intersections", "train", config="full", suffix_column="label")
    assert calls == [("someone/count-intersections", "full", "train")]
    assert ds.rows_meta(0)["suffix"] == "4"  # the int label became text


def test_a_configuration_name_is_refused_for_sources_without_configurations(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"image": _png(tmp_path / "a.png"), "prefix": "p", "suffix": "s"}])
    with pytest.raises(ValueError, match=r"jsonl source .* configuration 'full' .*data\.train_config.*remove it"):
        load_records(path, "train", config="full")
    with pytest.raises(ValueError, match=r"builtin source .* configuration 'full'"):
        load_records("builtin:easyvqa", "train[:2]", config="full")


def _recipe(**data) -> dict:
    return {"name": "t", "model": {"name_or_path": "tiny"}, "task": {"name": "ocr"}, "data": data}


def test_recipe_data_passes_train_config_and_eval_defaults_to_it(tmp_path):
    repo = _config_repo(tmp_path)
    recipe = recipe_from_dict(_recipe(train=str(repo), train_config="full", eval_split="test"))
    assert len(train_dataset(recipe)) == 3
    assert len(eval_dataset(recipe)) == 3  # eval reads the train source: its configuration too
    recipe = recipe_from_dict(_recipe(train=str(repo), train_config="full", eval_config="small"))
    assert len(eval_dataset(recipe)) == 1
    # another eval source does not inherit the train configuration
    other = _config_repo(tmp_path / "other")
    recipe = recipe_from_dict(_recipe(train=str(repo), train_config="full", eval=str(other)))
    assert len(eval_dataset(recipe)) == 1


def test_recipe_refuses_empty_configuration_and_one_for_a_builtin():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(_recipe(train="builtin:easyvqa", train_config="full", eval_config=" "))
    text = str(info.value)
    assert "data.train_config: 'builtin:easyvqa' has no dataset configurations" in text
    assert "data.eval_config: must not be empty" in text


# ------------------------------------------------------------------------------- numeric targets
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3, "3"),
        (np.int64(12), "12"),
        (3.0, "3"),  # pandas makes an int column with a gap float
        (0.25, "0.25"),
        (np.float32(0.1), "0.1"),  # its own precision, not 0.10000000149011612
        (-1.5, "-1.5"),
        ("a cat", "a cat"),
        (None, None),
        (float("nan"), None),
    ],
)
def test_suffix_text_rule(value, text):
    assert suffix_text(value) == text


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (True, "suffix is a boolean (True)"),
        (np.bool_(False), "suffix is a boolean (False)"),
        (math.inf, "suffix is inf, not a finite number"),
        (["x", "y"], "suffix must be a string or a number, got a list of 2 values"),
        ({"a": 1}, "suffix must be a string or a number, got dict"),
    ],
)
def test_suffix_text_refuses(value, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        suffix_text(value)


def test_jsonl_numeric_suffixes_become_text_and_bad_ones_are_named_by_line(tmp_path):
    _png(tmp_path / "a.png")
    rows = [{"image": "a.png", "prefix": "count", "suffix": v} for v in (3, 2.0, 0.5)]
    good = load_records(_jsonl(tmp_path / "good.jsonl", rows))
    assert [good.rows_meta(i)["suffix"] for i in range(3)] == ["3", "2", "0.5"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"image": "a.png", "prefix": "p", "suffix": 1}\n'
        '{"image": "a.png", "prefix": "p", "suffix": true}\n'
        '{"image": "a.png", "prefix": "p", "suffix": NaN}\n'
        '{"image": "a.png", "prefix": "p", "suffix": null}\n'
    )
    with pytest.raises(BadRecordError) as info:
        load_records(bad)
    problems = [(where, problem) for where, _, problem in info.value.problems]
    assert problems[0][0] == f"{bad}:2" and "suffix is a boolean (True)" in problems[0][1]
    assert problems[1] == (f"{bad}:3", "missing suffix (NaN, pandas' mark of a missing value)")
    assert problems[2] == (f"{bad}:4", "missing suffix (the training target)")
    # at eval a missing suffix is allowed: NaN and null mean "no target"
    ds = load_records(bad, require_suffix=False, skip_bad_records=True)
    assert [ds.rows_meta(i)["suffix"] for i in range(len(ds))] == ["1", None, None]


def test_table_integer_and_float32_suffix_columns(tmp_path):
    import datasets

    image = _png(tmp_path / "a.png")
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64"), "score": datasets.Value("float32")}
    )
    table = datasets.Dataset.from_dict(
        {"image": [image] * 3, "label": [0, 7, 12], "score": [0.1, 2.0, 0.3]}, features=features
    )
    table.save_to_disk(str(tmp_path / "saved"))
    labels = load_records(tmp_path / "saved", "train", suffix_column="label", default_prefix="count")
    assert [labels.rows_meta(i)["suffix"] for i in range(3)] == ["0", "7", "12"]
    assert "label" not in labels.rows_meta(0)  # the column became the suffix
    scores = load_records(tmp_path / "saved", "train", suffix_column="score", default_prefix="score")
    assert [scores.rows_meta(i)["suffix"] for i in range(3)] == ["0.1", "2", "0.3"]
    (tmp_path / "pq").mkdir()
    table.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    parquet = load_records(tmp_path / "pq", "train", suffix_column="label", default_prefix="count")
    assert [parquet.rows_meta(i)["suffix"] for i in range(3)] == ["0", "7", "12"]


# --------------------------------------------------------------------------------- lower-casing
def test_lowercase_suffix_lowers_targets_and_the_references_eval_reads(tmp_path):
    _png(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "prefix": "caption en", "suffix": "A Red Square.", "captions": ["A Red Square.", "RED box"]},
        {"image": "a.png", "prefix": "answer en Color?", "suffix": "Red",
         "answers": [{"answer": "Red", "answer_id": 1}, "RED"]},
        {"image": "a.png", "prefix": "ocr", "suffix": "AB 12", "texts": ["AB 12"]},
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    ds = load_records(path, lowercase_suffix=True)
    metas = [ds.rows_meta(i) for i in range(3)]
    assert [m["suffix"] for m in metas] == ["a red square.", "red", "ab 12"]
    assert metas[1]["prefix"] == "answer en Color?"  # prompts are left as written
    # what each text task scores against is lower-case too
    assert text_references(metas[0], "captions") == ["a red square.", "red box"]
    assert text_references(metas[1], "answers") == ["red", "red"]
    assert text_references(metas[2], "texts") == ["ab 12"]
    assert load_records(path).rows_meta(0)["suffix"] == "A Red Square."  # off by default


def test_lowercase_reference_fields_are_the_ones_the_text_tasks_read():
    # records.REFERENCE_TEXT_FIELDS must list every field a text task reads references from
    read = set()
    for name in ("caption", "vqa", "ocr"):
        record = {field: [f"X{field}"] for field in REFERENCE_TEXT_FIELDS}
        refs = TASKS[name].reference(record)
        read |= {field for field in REFERENCE_TEXT_FIELDS if refs == [f"X{field}"]}
    assert read == set(REFERENCE_TEXT_FIELDS)


def test_recipe_refuses_lowercase_for_detection():
    data = _recipe(lowercase_suffix=True)
    data["task"] = {"name": "detect"}
    with pytest.raises(RecipeError, match=r"data\.lowercase_suffix: true would lower-case the class names"):
        recipe_from_dict(data)
    data["task"] = {"name": "caption"}
    assert recipe_from_dict(data).data.lowercase_suffix is True


# ------------------------------------------------------------------ bad records with DataLoader workers
def _with_bad_images(tmp_path: Path) -> Path:
    """8 records; lines 3 and 6 have images that do not decode (text that is no PNG)."""
    good = _png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    rows = [{"image": "bad.png" if k in (3, 6) else good, "prefix": "p", "suffix": f"s{k}"} for k in range(1, 9)]
    return _jsonl(tmp_path / "d.jsonl", rows)


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])  # spawn: ~30 s
def test_skipped_counts_bad_records_found_by_dataloader_workers_once(tmp_path, context):
    ds = load_records(_with_bad_images(tmp_path), skip_bad_records=True)
    assert ds.skipped == Counter()  # nothing decoded yet
    loader = DataLoader(
        SubstituteBadRecords(ds), batch_size=2, num_workers=2, collate_fn=list,
        multiprocessing_context=context, persistent_workers=context == "spawn",
    )
    for _ in range(2):  # two epochs: each bad record counted once
        suffixes = [r["suffix"] for batch in loader for r in batch]
        assert len(suffixes) == 8 and "s3" not in suffixes and "s6" not in suffixes
    assert ds.skipped == Counter({"image cannot be decoded": 2})
    ds.skipped["image cannot be decoded"] += 1  # train.py adds header-check finds to the same Counter
    assert ds.skipped["image cannot be decoded"] == 3


def test_skipped_counts_workers_without_substitution_too(tmp_path):
    ds = load_records(_with_bad_images(tmp_path), skip_bad_records=True)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=list)
    kept = [r for batch in loader for r in batch if r is not None]
    assert len(kept) == 6
    assert ds.skipped == Counter({"image cannot be decoded": 2})
    assert ds.known_bad(2) and ds.known_bad(5) and not ds.known_bad(0)


def test_a_changed_or_another_same_named_repository_is_read_afresh(tmp_path):
    """datasets alone keys a local repository's cache by its folder name and relative paths: it would
    return the first rows here in all three loads."""
    import time

    def repo(root: Path, suffixes: list[str]) -> Path:
        path = root / "plates"
        (path / "full").mkdir(parents=True, exist_ok=True)
        image = _png(root / "car.png")
        _jsonl(path / "full" / "train.jsonl", [{"image": image, "prefix": "ocr", "suffix": s} for s in suffixes])
        (path / "README.md").write_text("---\nconfigs:\n- config_name: full\n  data_files:\n"
                                        "  - split: train\n    path: full/train.jsonl\n---\n")  # fmt: skip
        return path

    def suffixes(path: Path) -> list[str]:
        ds = load_records(path, "train", config="full")
        return [ds.rows_meta(i)["suffix"] for i in range(len(ds))]

    first = repo(tmp_path / "a", ["AB 123"])
    assert suffixes(first) == ["AB 123"]
    assert suffixes(repo(tmp_path / "b", ["CD 456", "EF 789"])) == ["CD 456", "EF 789"]  # same name, elsewhere
    time.sleep(0.01)
    repo(tmp_path / "a", ["GH 000"])  # the same folder, its data file edited
    assert suffixes(first) == ["GH 000"]
    assert suffixes(first) == ["GH 000"]  # and read again from its own cache
