"""Inference cuts prompts at the training recipe's data.max_length (issue #11 item 8), not a fixed 512.

Through the real CLIs (`eval.run`, `pg_finetune.predict`) on the tiny model. The collator
`generate()` builds is spied on, so each test sees the max_length generation really ran with and
the text tokens each batch row really held.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

import pg_finetune.generate as generate_module
from eval.run import main as eval_main
from pg_finetune.collator import PaliGemmaCollator
from pg_finetune.model import resolve_max_length, tiny_model_dir, training_max_length
from pg_finetune.predict import main as predict_main
from pg_finetune.recipe import load_recipe, save_recipe

RECIPE_MAX_LENGTH = 24
LONG_PROMPT = "answer en " + "what color is the shape in the image? " * 12  # well over 24 text tokens


def _write_recipe(directory: Path, max_length: int) -> Path:
    """A recipe.yaml as training writes it (resolved, every default filled in)."""
    recipe = load_recipe("recipes/tiny/easyvqa_lora.yaml", [f"data.max_length={max_length}"])
    return save_recipe(recipe, directory)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    """A tiny model directory without a recipe (like a downloaded checkpoint)."""
    path = tmp_path_factory.mktemp("models") / "plain"
    shutil.copytree(tiny_model_dir("tiny"), path)
    return path


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, plain_model) -> Path:
    """A tiny model directory as training leaves final/: weights, processor and recipe.yaml."""
    path = tmp_path_factory.mktemp("models") / "final"
    shutil.copytree(plain_model, path)
    _write_recipe(path, RECIPE_MAX_LENGTH)
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, plain_model) -> Path:
    """A LoRA adapter directory as a lora run leaves final/, trained with data.max_length=32."""
    from pg_finetune.model import load_model, load_processor
    from pg_finetune.recipe import ModelConfig
    from pg_finetune.tuning import apply_tuning

    path = tmp_path_factory.mktemp("adapters") / "final"
    recipe = load_recipe("recipes/tiny/easyvqa_lora.yaml")
    apply_tuning(load_model(ModelConfig(name_or_path=str(plain_model))), recipe.tuning).save_pretrained(path)
    load_processor(str(plain_model)).save_pretrained(path)
    _write_recipe(path, 32)
    return path


@pytest.fixture
def collators(monkeypatch) -> list:
    """Every collator generate() builds, each with the batches it produced in `.batches`."""
    made: list = []

    class Spy(PaliGemmaCollator):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.batches: list = []
            made.append(self)

        def __call__(self, records):
            batch = super().__call__(records)
            self.batches.append(batch)
            return batch

    monkeypatch.setattr(generate_module, "PaliGemmaCollator", Spy)
    return made


def _text_tokens(collators: list) -> list[int]:
    """Text tokens (<bos> + prompt + "\\n") of every generated row: unpadded length less the image tokens."""
    return [int(n) - c.image_seq_length for c in collators for b in c.batches for n in b["attention_mask"].sum(1)]


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    Image.new("RGB", (32, 32), "red").save(root / "red.png")
    rows = [{"id": "long", "image": "red.png", "prefix": LONG_PROMPT, "answers": ["red"]},
            {"id": "short", "image": "red.png", "prefix": "answer en what color?", "answers": ["red"]}]  # fmt: skip
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "val.jsonl")


def _eval(tmp_path: Path, data: str, *args: str) -> dict:
    out = tmp_path / "out"
    argv = ["--benchmark", "vqa", "--data", data, "--max-new-tokens", "2", "--out", str(out), *args]
    assert eval_main(argv) == 0
    return json.loads((out / "report.json").read_text())


def _predict(capsys, *args: str, image: Path) -> dict:
    Image.new("RGB", (32, 32), "blue").save(image)
    argv = ["--image", str(image), "--prompt", LONG_PROMPT, "--max-new-tokens", "2", "--json", *args]
    assert predict_main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ---- eval.run ---------------------------------------------------------------------------------------


def test_eval_cuts_prompts_at_the_model_directorys_recipe_max_length(tmp_path, trained_model, vqa_data, collators):
    report = _eval(tmp_path, vqa_data, "--model", str(trained_model))
    assert {c.max_length for c in collators} == {RECIPE_MAX_LENGTH}
    # The long prompt fills the recipe's budget exactly; the short one is left whole.
    tokens = _text_tokens(collators)
    assert max(tokens) == RECIPE_MAX_LENGTH and min(tokens) < RECIPE_MAX_LENGTH
    assert sum(c.stats.truncated_prefix for c in collators) == 1
    assert report["max_length"] == RECIPE_MAX_LENGTH
    assert report["max_length_source"] == f"recipe {trained_model / 'recipe.yaml'}"


def test_eval_flag_overrides_the_recipe(tmp_path, trained_model, vqa_data, collators):
    report = _eval(tmp_path, vqa_data, "--model", str(trained_model), "--max-length", "40")
    assert {c.max_length for c in collators} == {40}
    assert max(_text_tokens(collators)) == 40
    assert report["max_length"] == 40 and report["max_length_source"] == "flag"


def test_eval_without_a_recipe_keeps_512_and_says_so(tmp_path, plain_model, vqa_data, collators, capsys):
    report = _eval(tmp_path, vqa_data, "--model", str(plain_model))
    assert {c.max_length for c in collators} == {512}
    assert sum(c.stats.truncated_prefix for c in collators) == 0
    assert report["max_length"] == 512 and report["max_length_source"] == "default"
    assert "max_length 512 text tokens (default)" in capsys.readouterr().err


def test_eval_reads_the_adapters_recipe_before_the_models(tmp_path, trained_model, adapter_dir, vqa_data, collators):
    report = _eval(tmp_path, vqa_data, "--model", str(trained_model), "--adapter", str(adapter_dir))
    assert {c.max_length for c in collators} == {32}
    assert max(_text_tokens(collators)) == 32
    assert report["max_length_source"] == f"recipe {adapter_dir / 'recipe.yaml'}"


# ---- predict ----------------------------------------------------------------------------------------


def test_predict_uses_the_recipe_and_reports_it(tmp_path, trained_model, collators, capsys):
    result = _predict(capsys, "--model", str(trained_model), image=tmp_path / "img.png")
    assert result["max_length"] == RECIPE_MAX_LENGTH
    assert result["max_length_source"] == f"recipe {trained_model / 'recipe.yaml'}"
    assert _text_tokens(collators) == [RECIPE_MAX_LENGTH]


def test_predict_flag_overrides_and_no_recipe_means_512(tmp_path, trained_model, plain_model, collators, capsys):
    result = _predict(capsys, "--model", str(trained_model), "--max-length", "40", image=tmp_path / "img.png")
    assert (result["max_length"], result["max_length_source"]) == (40, "flag")
    assert _text_tokens(collators) == [40]
    result = _predict(capsys, "--model", str(plain_model), image=tmp_path / "img.png")
    assert (result["max_length"], result["max_length_source"]) == (512, "default")
    assert collators[-1].max_length == 512 and collators[-1].stats.truncated_prefix == 0


# ---- the flag ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cli", [eval_main, predict_main], ids=["eval.run", "predict"])
@pytest.mark.parametrize("value", ["0", "3", "-5", "many"])
def test_a_too_small_or_non_integer_flag_is_a_usage_error(cli, value, tmp_path, capsys):
    argv = ["--benchmark", "vqa"] if cli is eval_main else ["--image", "x.png", "--prompt", "caption en"]
    with pytest.raises(SystemExit) as exit_info:
        cli([*argv, "--model", "tiny", "--max-length", value, "--out" if cli is eval_main else "--json",
             *([str(tmp_path)] if cli is eval_main else [])])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-length" in err and ("at least 8" in err or "expected an integer" in err)


@pytest.mark.parametrize("cli", [eval_main, predict_main], ids=["eval.run", "predict"])
def test_help_states_the_precedence(cli, capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Precedence: this flag > data.max_length of the training recipe.yaml in --adapter, else in a local " \
           "--model directory > 512" in text  # fmt: skip


# ---- finding the recipe -----------------------------------------------------------------------------


def test_an_old_recipe_with_keys_this_version_rejects_still_gives_max_length(tmp_path):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"data": {"max_length": 48, "long_gone_key": 1},
                                                         "retired_section": {"x": 1}}))  # fmt: skip
    assert training_max_length(str(tmp_path)) == (48, tmp_path / "recipe.yaml")


@pytest.mark.parametrize("text", ["data: [unclosed", "just a string", "data:\n  max_length: 0",
                                  "data:\n  max_length: true", "data:\n  max_length: '64'"])  # fmt: skip
def test_an_unusable_recipe_warns_and_falls_back_to_512(tmp_path, text, caplog):
    (tmp_path / "recipe.yaml").write_text(text)
    with caplog.at_level(logging.WARNING, logger="pg_finetune.model"):
        assert resolve_max_length(None, str(tmp_path)) == (512, "default")
    assert str(tmp_path / "recipe.yaml") in caplog.text


def test_only_local_directories_are_searched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # `--model tiny` loads the built-in model, not ./tiny
    (tmp_path / "tiny" / "recipe.yaml").write_text("data:\n  max_length: 16\n")
    assert training_max_length("tiny") is None
    assert training_max_length("google/paligemma2-3b-pt-224") is None
    assert training_max_length("tiny", str(tmp_path / "tiny")) == (16, tmp_path / "tiny" / "recipe.yaml")
