"""The embedded default (`make finetune`): offline, and the model really learns.

This runs the shipped default recipe unchanged (about 2.5 min on two CPU cores).
Chance on easy-VQA is about 0.5 for yes/no questions and 1/8 or 1/3 for colour and
shape questions; a random model scores 0 (it does not even answer in the format).
"""

from __future__ import annotations

import json
from pathlib import Path

from pg_finetune.train import DEFAULT_RECIPE, main


def test_default_recipe_learns_to_answer_from_the_image(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = Path(__file__).resolve().parents[1]
    assert main(["--recipe", str(root / DEFAULT_RECIPE), f"training.output_dir={tmp_path / 'run'}"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert after["exact_match"] >= before["exact_match"] + 0.4
    # yes/no questions ask about the image ("is there a red shape?"): well above the 0.5 of guessing
    assert after["exact_match_yes_no"] >= 0.75
    # colour and shape answers need the pixels: well above the 1/8 to 1/3 of guessing
    assert after["exact_match_other"] >= 0.4
