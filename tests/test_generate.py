"""Batched generation equals one-at-a-time generation; the predict CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pg_finetune.generate import GenerationSettings, generate
from pg_finetune.predict import main as predict_main
from pg_finetune.tiny import build_tiny


def _records():
    colors = ["red", "blue", "green", "yellow", "black", "white"]
    prompts = ["caption en", "answer en what color is the shape?", "detect circle ; triangle",
               "answer en is there a red shape in the image?", "count the intersections", "answer en what?"]
    return [{"image": Image.new("RGB", (64, 64), c), "prefix": p} for c, p in zip(colors, prompts, strict=True)]


def test_batched_greedy_generation_equals_one_at_a_time():
    model, processor = build_tiny(seed=3)
    # A random model with tied embeddings just repeats its last input token; an untied random head
    # makes the outputs depend on the whole (padded) context, which is what this test must see.
    torch.manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    records = _records()
    settings = GenerationSettings(max_new_tokens=8, batch_size=len(records))
    batched = generate(model, processor, records, settings, progress=False)
    single = [generate(model, processor, [r], GenerationSettings(max_new_tokens=8, batch_size=1), progress=False)[0]
              for r in records]
    assert batched == single
    assert len(set(single)) > 1, "degenerate test: every prompt gave the same output"


def test_predict_cli_prints_output_and_draws_detections(tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), "blue").save(image)
    overlay = tmp_path / "overlay.png"
    code = predict_main(["--model", "tiny", "--image", str(image), "--prompt", "detect circle",
                         "--max-new-tokens", "6", "--save-overlay", str(overlay), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompt"] == "detect circle"
    assert isinstance(result["detections"], list) and isinstance(result["malformed"], int)
    with Image.open(overlay) as drawn:
        assert drawn.size == (64, 48)


def test_draw_detections_marks_the_box():
    from pg_finetune.loc import Detection
    from pg_finetune.predict import draw_detections

    image = Image.new("RGB", (100, 100), "white")
    drawn = draw_detections(image, [Detection(box=(10.0, 20.0, 60.0, 80.0), label="cat", bins=(0, 0, 0, 0))])
    assert drawn.getpixel((10, 50)) != (255, 255, 255)   # left edge of the box
    assert drawn.getpixel((35, 50)) == (255, 255, 255)   # inside stays untouched
    assert image.getpixel((10, 50)) == (255, 255, 255)   # the input image is not modified


def test_predict_cli_names_a_missing_image(tmp_path, capsys):
    code = predict_main(["--model", "tiny", "--image", str(tmp_path / "nope.png"), "--prompt", "caption en"])
    assert code == 2
    assert "nope.png" in capsys.readouterr().err


def test_predict_cli_names_a_corrupt_image_without_dataset_advice(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    code = predict_main(["--model", "tiny", "--image", str(tmp_path / "bad.png"), "--prompt", "caption en"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--image" in err and "bad.png" in err and "cannot be decoded" in err
    assert "skip_bad_records" not in err  # a recipe setting means nothing to the CLI


def test_constrain_detection_is_off_by_default_and_adds_nothing_to_generate():
    settings = GenerationSettings()
    assert settings.constrain_detection is False
    _, processor = build_tiny()
    assert "logits_processor" not in settings.generate_kwargs(processor.tokenizer)


def test_predict_cli_constrained_detection_parses(tmp_path, capsys):
    from pg_finetune.loc import parse_detections

    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), "blue").save(image)
    argv = ["--model", "tiny", "--image", str(image), "--prompt", "detect circle ; red square",
            "--max-new-tokens", "24", "--json"]
    assert predict_main(argv) == 0
    free = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert predict_main([*argv, "--constrained"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["output"] != free["output"]  # the stock tiny model writes only newlines on its own
    parsed = parse_detections(result["output"], 64, 48, allowed_labels=["circle", "red square"])
    assert parsed.malformed == 0 and result["malformed"] == 0
    assert len(result["detections"]) == len(parsed.detections) >= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--prompt", "  "], "--prompt is empty"), (["--prompt", "caption en", "--max-new-tokens", "0"], "at least 1"),
     (["--prompt", "caption en", "--max-new-tokens", "-3"], "at least 1"),
     (["--prompt", "detect cat", "--save-overlay", "no/such/dir/o.png"], "does not exist")],
)  # fmt: skip
def test_predict_cli_refuses_empty_prompts_bad_budgets_and_missing_folders(tmp_path, capsys, args, message):
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), "blue").save(image)
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error, before any model is loaded
        predict_main(["--model", "tiny", "--image", str(image), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_top_k_is_passed_only_when_sampling_and_repetition_penalty_only_when_set():
    _, processor = build_tiny()
    tokenizer = processor.tokenizer
    greedy = GenerationSettings(top_k=5).generate_kwargs(tokenizer)
    assert greedy["top_k"] is None and "repetition_penalty" not in greedy  # 1.0 = off: left to the model
    sampled = GenerationSettings(do_sample=True, top_k=5, repetition_penalty=1.3).generate_kwargs(tokenizer)
    assert (sampled["top_k"], sampled["repetition_penalty"]) == (5, 1.3)
    assert "top_k" not in GenerationSettings(do_sample=True).generate_kwargs(tokenizer)  # None: the model's
    assert GenerationSettings(repetition_penalty=2.0).generate_kwargs(tokenizer)["repetition_penalty"] == 2.0


def test_repetition_penalty_reaches_the_model():
    model, processor = build_tiny()
    records = [{"image": Image.new("RGB", (32, 32), "red"), "prefix": "caption en"}]
    plain = generate(model, processor, records, GenerationSettings(max_new_tokens=6), progress=False)
    settings = GenerationSettings(max_new_tokens=6, repetition_penalty=5.0)
    penalised = generate(model, processor, records, settings, progress=False)
    assert plain == ["\n" * 6]  # the random tiny model repeats its last input token ...
    assert penalised != plain  # ... until repeating is penalised
