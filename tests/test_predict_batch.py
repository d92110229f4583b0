"""`pg_finetune.predict` on a folder (--images) and a JSONL of records (--records), batched (issue #17).

Through the real CLI on the tiny model. Decoding options are checked where they reach `generate`
(a spy around it), and with one real run that uses them all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import pg_finetune.predict as predict_module
from pg_finetune.predict import PARSED_FIELDS, PROMPT_TASKS, OverlayNames, main, prompt_task
from pg_finetune.tasks import TASKS


def _folder(root: Path, colors=("red", "blue", "green")) -> Path:
    folder = root / "images"
    folder.mkdir()
    for color in colors:
        Image.new("RGB", (64, 48), color).save(folder / f"{color}.png")
    return folder


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def generate_calls(monkeypatch) -> list:
    """(records, settings) of every generate() call the CLI makes; generation itself still runs."""
    calls: list = []
    real = predict_module.generate

    def spy(model, processor, records, settings, **kwargs):
        calls.append((records, settings))
        return real(model, processor, records, settings, **kwargs)

    monkeypatch.setattr(predict_module, "generate", spy)
    return calls


# ---- --images -----------------------------------------------------------------------------------


def test_a_folder_gives_one_line_per_image_sorted_and_skips_the_unreadable(tmp_path, capsys, generate_calls):
    folder = _folder(tmp_path)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image, not an input")
    out = tmp_path / "pred" / "out.jsonl"  # the folder is made
    code = main(["--model", "tiny", "--images", str(folder), "--prompt", "caption en",
                 "--max-new-tokens", "3", "--batch-size", "2", "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    rows = _lines(out)
    assert [r["id"] for r in rows] == ["blue.png", "green.png", "red.png"]
    assert all(r["prompt"] == "caption en" and isinstance(r["output"], str) for r in rows)
    assert rows[0]["image"] == str(folder / "blue.png")
    assert "broken.jpg" in captured.err and "skipped 1 of 4 images" in captured.err
    assert "notes.txt" not in captured.err
    assert "predicting" in captured.err  # the progress bar
    assert captured.out == ""  # with --out, nothing on stdout
    # 4 inputs in batches of 2: [blue, broken] -> blue alone, then [green, red]
    assert [len(records) for records, _ in generate_calls] == [1, 2]


def test_a_folder_of_unreadable_images_exits_2(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    assert main(["--model", "tiny", "--images", str(folder), "--prompt", "caption en", "--quiet"]) == 2
    assert "a.png" in capsys.readouterr().err


def test_an_empty_folder_exits_2_before_loading_a_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(predict_module, "load_for_inference", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "empty").mkdir()
    assert main(["--model", "tiny", "--images", str(tmp_path / "empty"), "--prompt", "caption en"]) == 2
    assert "no image files" in capsys.readouterr().err


def test_detect_prompts_give_boxes_and_overlays_and_quiet_hides_the_bar(tmp_path, capsys):
    folder = _folder(tmp_path, colors=("red", "blue"))
    overlays = tmp_path / "overlays"
    code = main(["--model", "tiny", "--images", str(folder), "--prompt", "detect circle ; red square",
                 "--max-new-tokens", "24", "--constrained", "--overlays", str(overlays),
                 "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    rows = [json.loads(line) for line in captured.out.splitlines()]  # no --out: JSONL on stdout
    assert [r["id"] for r in rows] == ["blue.png", "red.png"]
    for row in rows:
        assert row["malformed"] == 0 and len(row["detections"]) >= 1  # constrained: always parses
        for detection in row["detections"]:
            assert detection["label"] in ("circle", "red square") and len(detection["box_xyxy"]) == 4
        assert Path(row["overlay"]).parent == overlays
        with Image.open(row["overlay"]) as drawn:
            assert drawn.size == (64, 48)
    assert sorted(p.name for p in overlays.iterdir()) == ["blue.png", "red.png"]


# ---- --records ----------------------------------------------------------------------------------


def test_records_use_their_own_prompts_paths_relative_to_the_file_and_ids(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    _folder(data, colors=("red", "blue", "green"))
    lines = [
        {"id": "box", "image": "images/red.png", "prompt": "detect circle"},
        {"image": "images/blue.png", "prefix": "count the intersections"},
        "not json",
        {"image": "images/green.png"},  # takes --prompt
        {"id": 9, "image": "images/missing.png", "prompt": "caption en"},
    ]
    records = data / "records.jsonl"
    records.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    monkeypatch.chdir(tmp_path / "data" / "images")  # paths are the records file's, not the cwd's
    out = tmp_path / "out.jsonl"
    code = main(["--model", "tiny", "--records", str(records), "--prompt", "answer en what color?",
                 "--max-new-tokens", "3", "--overlays", str(tmp_path / "ov"), "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    rows = {str(r["id"]): r for r in _lines(out)}
    assert set(rows) == {"box", "2", "4"}  # the line number when a record has no id
    assert rows["box"]["prompt"] == "detect circle"
    assert "detections" in rows["box"] and "count" not in rows["box"]
    assert rows["2"]["prompt"] == "count the intersections" and "count" in rows["2"]
    assert rows["2"]["count"] is None or isinstance(rows["2"]["count"], int)
    assert rows["4"]["prompt"] == "answer en what color?"
    assert set(rows["4"]) == {"id", "image", "prompt", "output"}
    assert rows["4"]["image"] == str(data / "images" / "green.png")
    assert [p.name for p in (tmp_path / "ov").iterdir()] == ["box.png"]  # detect inputs only
    assert "line 3: invalid JSON" in err and "missing.png" in err


def test_records_without_a_prompt_and_no_flag_are_skipped(tmp_path, capsys):
    _folder(tmp_path, colors=("red",))
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"image": "images/red.png"}) + "\n")
    assert main(["--model", "tiny", "--records", str(records)]) == 2
    assert "no 'prompt'" in capsys.readouterr().err


# ---- decoding options --------------------------------------------------------------------------------


def test_every_decoding_option_reaches_generate_and_runs(tmp_path, capsys, generate_calls):
    folder = _folder(tmp_path, colors=("red", "blue"))
    code = main(["--model", "tiny", "--images", str(folder), "--prompt", "caption en", "--quiet",
                 "--num-beams", "2", "--do-sample", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5",
                 "--repetition-penalty", "1.3", "--max-new-tokens", "3", "--seed", "1"])  # fmt: skip
    assert code == 0
    (_, settings), = generate_calls
    assert (settings.num_beams, settings.do_sample, settings.temperature, settings.top_p, settings.top_k,
            settings.repetition_penalty, settings.max_new_tokens, settings.batch_size) == (
            2, True, 0.7, 0.9, 5, 1.3, 3, 16)  # fmt: skip
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_the_same_seed_samples_the_same_outputs(tmp_path, capsys):
    folder = _folder(tmp_path, colors=("red",))
    argv = ["--model", "tiny", "--images", str(folder), "--prompt", "caption en", "--quiet", "--do-sample",
            "--repetition-penalty", "3", "--max-new-tokens", "6"]  # fmt: skip
    outputs = []
    for seed in ("1", "1", "2"):
        assert main([*argv, "--seed", seed]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["output"])
    assert outputs[0] == outputs[1] != outputs[2]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("16", "64", "1", "1.0", "50", "0", "float32"):
        assert f"(default: {default})" in text
    actions = predict_module.build_parser()._actions
    valued = [a for a in actions if a.default not in (None, "==SUPPRESS==") and a.default is not False]
    assert {a.dest for a in valued} >= {"batch_size", "max_new_tokens", "num_beams", "temperature", "top_p",
                                         "top_k", "repetition_penalty", "seed", "dtype"}  # fmt: skip
    assert all("(default: %(default)s)" in a.help for a in valued)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--images", "IMAGES"], "--prompt is required"),
     (["--images", "IMAGES", "--image", "x.png", "--prompt", "caption en"], "not allowed with"),
     (["--images", "nowhere", "--prompt", "caption en"], "is not a folder"),
     (["--records", "nowhere.jsonl"], "no such file"),
     (["--images", "IMAGES", "--prompt", "detect a", "--save-overlay", "o.png"], "is for --image"),
     (["--images", "IMAGES", "--prompt", "caption en", "--batch-size", "0"], "--batch-size"),
     (["--images", "IMAGES", "--prompt", "caption en", "--num-beams", "0"], "--num-beams"),
     (["--images", "IMAGES", "--prompt", "caption en", "--top-k", "-1"], "--top-k"),
     (["--images", "IMAGES", "--prompt", "caption en", "--repetition-penalty", "0"], "--repetition-penalty")],
)  # fmt: skip
def test_usage_errors_exit_2_before_loading_a_model(tmp_path, capsys, args, message):
    folder = _folder(tmp_path, colors=("red",))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny", *[str(folder) if a == "IMAGES" else a for a in args]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---- single image and the parts ----------------------------------------------------------------------


def test_a_single_count_prompt_gets_a_count(tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), "white").save(image)
    assert main(["--model", "tiny", "--image", str(image), "--prompt", "count the intersections", "--json",
                 "--max-new-tokens", "2"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["id"] == "img.png" and "count" in result and "detections" not in result


def test_prompt_task_reads_the_first_word():
    assert prompt_task("detect cat ; dog") == "detect"
    assert prompt_task("count the intersections") == "count_intersections"
    assert prompt_task("  detect cat") == "detect"
    for prompt in ("caption en", "answer en how many?", "detection cat", "", "   "):
        assert prompt_task(prompt) is None
    assert set(PROMPT_TASKS.values()) == set(PARSED_FIELDS) <= set(TASKS)  # the dicts and the registry agree


def test_parsed_fields():
    image = Image.new("RGB", (100, 50))
    fields = PARSED_FIELDS["detect"]("<loc0000><loc0000><loc0512><loc0512> cat ; junk", "detect cat", image)
    assert fields == {"detections": [{"label": "cat", "box_xyxy": [0.0, 0.0, 50.0, 25.0]}], "malformed": 1}
    assert PARSED_FIELDS["count_intersections"](" Two.", "count the intersections", image) == {"count": 2}
    assert PARSED_FIELDS["count_intersections"]("3 or 4", "count the intersections", image) == {"count": None}


def test_overlay_names_are_unique_and_safe(tmp_path):
    from pg_finetune.predict import Input

    names = OverlayNames(tmp_path)
    ids = ("a.jpg", "a.png", "a", "x/../y z", 3, "...")
    got = [names(Input(id=i, image="", prompt="")).name for i in ids]
    assert got == ["a.png", "a-2.png", "a-3.png", "x_.._y_z.png", "3.png", "image.png"]
