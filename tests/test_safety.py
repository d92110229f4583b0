"""Safe loading and no leaked secrets.

- The package sources never unpickle: no `yaml.load(`, `pickle.load(s)`, `trust_remote_code=True`,
  and every `torch.load(` passes `weights_only=True`.
- A saved run holds weights only as safetensors (full and LoRA). Checkpoints also hold the
  Trainer's resume states (optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin): these
  are our own files, and transformers 5.23 reads the first three with `torch.load(...,
  weights_only=True)` and never reads training_args.bin back.
- A hub token in the environment or in a recipe never reaches recipe.yaml, the logs or stdout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pg_finetune.recipe import RecipeError, load_recipe, save_recipe

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("src", "eval", "data_prep", "bench")
TOKEN = "hf_" + "TestTokenThatMustNeverLeak0123456789"

FORBIDDEN = {
    "yaml.load(": re.compile(r"\byaml\.load\("),
    "yaml.unsafe_load": re.compile(r"\byaml\.(unsafe_load|full_load)\b|Loader=yaml\.(Unsafe)?Loader\b"),
    "pickle.load": re.compile(r"\b(c?pickle|dill|joblib)\.loads?\("),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
}


def _sources() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20  # the scan really looks at the package
    return files


def _torch_load_calls(text: str) -> list[str]:
    """Each `torch.load(...)` call's text, parentheses balanced."""
    calls = []
    for match in re.finditer(r"\btorch\.load\(", text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        calls.append(text[match.start() : i])
    return calls


def test_sources_never_unpickle_or_trust_remote_code():
    found = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for name, pattern in FORBIDDEN.items():
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {name}")
        for call in _torch_load_calls(text):
            if not re.search(r"weights_only\s*=\s*True", call):
                found.append(f"{path.relative_to(ROOT)}: {call!r} without weights_only=True")
    assert not found, "\n".join(found)


def test_the_scanner_catches_what_it_looks_for():
    text = "x = torch.load(path, map_location='cpu')\ny = torch.load(p, weights_only=True)\n"
    assert [c for c in _torch_load_calls(text) if "weights_only=True" not in c] == [
        "torch.load(path, map_location='cpu')"
    ]
    for bad in ("yaml.load(f)", "pickle.loads(b)", "from_pretrained(x, trust_remote_code = True)"):
        assert any(p.search(bad) for p in FORBIDDEN.values()), bad


def _run_tiny(tmp_path: Path, method: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yaml"
    text = (ROOT / "recipes/tiny/easyvqa_lora.yaml").read_text()
    data = yaml.safe_load(text)
    data["description"] = f"uses {TOKEN}"  # a token pasted into free text, say
    recipe.write_text(yaml.safe_dump(data))
    args = [sys.executable, "-m", "pg_finetune.train", "--recipe", str(recipe),
            f"training.output_dir={tmp_path / 'run'}", f"tuning.method={method}", "data.train_split=train[:8]",
            "data.eval_split=test[:2]", "eval.max_samples=2", "eval.batch_size=2", "training.max_steps=2",
            "eval.max_new_tokens=2",
            "training.save_steps=1", "training.per_device_train_batch_size=4", "training.logging_steps=1",
            "logging.report_to=tensorboard", "logging.log_level=debug"]
    if method == "lora":
        args.append("training.merge_lora=true")
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method", ["full", pytest.param("lora", marks=pytest.mark.slow)])
def test_a_run_saves_only_safetensors_weights_and_never_leaks_the_token(tmp_path, method):
    env = dict(os.environ, HF_TOKEN=TOKEN, HUGGING_FACE_HUB_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
    proc = _run_tiny(tmp_path, method, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr

    run = tmp_path / "run"
    files = [p for p in run.rglob("*") if p.is_file()]
    for path in files:  # recipe.yaml, logs, model card, trainer_state.json, metrics.json, event files, ...
        assert TOKEN.encode() not in path.read_bytes(), f"token written into {path}"
    assert yaml.safe_load((run / "final" / "recipe.yaml").read_text())["description"] == "uses <redacted>"

    weights = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
    state_files = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "scaler.pt"}
    for path in files:
        if path.suffix in weights and path.suffix != ".safetensors":
            # only the Trainer's own resume states, only inside checkpoints
            assert path.name in state_files and path.parent.name.startswith("checkpoint-"), path
    final = {p.name for p in (run / "final").iterdir()}
    expected = {"adapter_model.safetensors"} if method == "lora" else {"model.safetensors"}
    assert expected <= final and not {n for n in final if Path(n).suffix in weights - {".safetensors"}}
    if method == "lora":
        merged = {p.name for p in (run / "merged").iterdir()}
        assert "model.safetensors" in merged and not {n for n in merged if Path(n).suffix in weights - {".safetensors"}}
    for checkpoint in run.glob("checkpoint-*"):
        names = {p.name for p in checkpoint.iterdir()}
        assert expected <= names and not names & {"pytorch_model.bin", "adapter_model.bin", "model.pt"}


def test_a_token_in_an_override_is_not_echoed_in_the_error(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes/tiny/easyvqa_lora.yaml", [f"model.token={TOKEN}", f"model.hub_token={TOKEN}"])
    assert TOKEN not in str(err.value) and "model.token" in str(err.value) and "<redacted>" in str(err.value)


def test_save_recipe_redacts_token_values(tmp_path):
    recipe = load_recipe(ROOT / "recipes/tiny/easyvqa_lora.yaml", [f"model.revision={TOKEN}"])
    text = save_recipe(recipe, tmp_path).read_text()
    assert TOKEN not in text and "revision: <redacted>" in text


def test_model_card_never_carries_a_token_from_the_recipe(tmp_path):
    from pg_finetune.model_card import write_model_card
    from pg_finetune.recipe import recipe_from_dict

    token = "hf_" + "Ab3" * 10
    recipe = recipe_from_dict({"name": "t", "description": f"trained with {token} by mistake", "model": {"name_or_path": "tiny"}})
    card = write_model_card(tmp_path, recipe, is_adapter=False, trainable=None, example_prompt="answer en what?",
                            max_new_tokens=4, before=None, after=None).read_text()
    assert token not in card and "<redacted>" in card
