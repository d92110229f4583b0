"""The source registry: every source module is listed, and each source string goes to the right kind.

`find` reads no file, so these checks only create the files a layout is recognised by.
"""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest

import pg_finetune.data as data
from pg_finetune.data import SOURCES, Request, SourceKind, load_records


def _kinds_by_module() -> dict[str, list[SourceKind]]:
    found = {}
    for info in pkgutil.iter_modules(data.__path__):
        module = importlib.import_module(f"{data.__name__}.{info.name}")
        kinds = [value for value in vars(module).values() if isinstance(value, SourceKind)]
        if kinds:
            found[info.name] = kinds
    return found


def test_every_source_module_registers_its_kinds():
    by_module = _kinds_by_module()
    assert set(by_module) == {"builtin", "hub", "imagefolder", "jsonl", "karpathy", "saved"}
    for module, kinds in by_module.items():
        for kind in kinds:
            assert any(kind is registered for registered in SOURCES), (
                f"{module}.{kind.name} is not in SOURCES"
            )
    assert len(SOURCES) == sum(len(kinds) for kinds in by_module.values())
    assert len({kind.name for kind in SOURCES}) == len(SOURCES)
    assert SOURCES[-1].name == "hub"  # the catch-all for strings that are no local path


def _claimed_by(source: str, split: str = "train") -> str:
    request = Request(source, split)
    return next(kind.name for kind in SOURCES if kind.find(request) is not None)


def test_each_source_string_goes_to_its_kind(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text("{}")
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "val.jsonl").write_text("")
    (tmp_path / "folder" / "test").mkdir(parents=True)
    (tmp_path / "folder" / "test" / "metadata.jsonl").write_text("")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.parquet").write_text("")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": []}))

    assert _claimed_by("builtin:easyvqa") == "builtin"
    assert _claimed_by(str(tmp_path / "missing.jsonl")) == "jsonl"  # its opener says it is missing
    assert _claimed_by(str(tmp_path / "dataset_coco.json")) == "karpathy"
    assert _claimed_by(f"karpathy+all:{tmp_path / 'dataset_coco.json'}") == "karpathy"
    assert _claimed_by(str(tmp_path / "saved")) == "save_to_disk"
    assert _claimed_by(str(tmp_path / "lines"), "val") == "jsonl-directory"
    assert _claimed_by(str(tmp_path / "folder"), "test") == "imagefolder"
    assert _claimed_by(str(tmp_path / "files")) == "data-files"
    assert _claimed_by("HuggingFaceM4/VQAv2") == "hub"
    assert _claimed_by(str(tmp_path / "missing.json")) == "hub"  # not a local path: a hub id, as before


def test_unclaimed_files_and_directories_list_what_would_do(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError) as info:
        load_records(str(tmp_path / "notes.txt"))
    message = str(info.value)
    assert (
        "a file source must be .jsonl (one JSON object per line) or .json (a Karpathy caption file" in message
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as info:
        load_records(str(tmp_path / "empty"), "val")
    listed = [line.removeprefix("  - ") for line in str(info.value).splitlines()[1:]]
    assert listed == [kind.description for kind in SOURCES if kind.form == "directory"]
    assert "cannot read directory" in str(info.value) and "for split 'val'" in str(info.value)
