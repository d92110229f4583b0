"""Every non-VQA tiny recipe runs end to end through the training entry: a few steps, offline.

Each run trains 3 steps on 16 records and evaluates 6 before and after; the check is that the
recipe's task, data source and metrics fit together, not that the model learns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pg_finetune.prep.count_intersections import main as make_count_intersections
from pg_finetune.train import main

ROOT = Path(__file__).resolve().parents[1]

# recipe -> the task's headline metric
RECIPES = {
    "easyvqa_caption": "cider",
    "easyvqa_detect": "miou",
    "count_intersections": "accuracy",
}


def _count_intersections_data(tmp_path: Path) -> Path:
    out = tmp_path / "count_intersections"
    common = ["--out", str(out), "--size", "96", "--line-width", "3", "--no-progress"]
    make_count_intersections([*common, "--split", "train", "--num", "12", "--seed", "0"])
    make_count_intersections([*common, "--split", "test", "--num", "6", "--seed", "1"])
    return out


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_tiny_recipe_runs_and_reports_its_metric(tmp_path, recipe):
    run = tmp_path / "run"
    overrides = [
        f"training.output_dir={run}",
        "training.max_steps=3",
        "training.per_device_train_batch_size=4",
        "training.logging_steps=1",
        "data.train_split=train[:16]",
        "data.eval_split=test[:6]",
        "eval.max_samples=6",
        "eval.batch_size=3",
    ]
    if recipe == "count_intersections":
        overrides.append(f"data.train={_count_intersections_data(tmp_path)}")
    assert main(["--recipe", str(ROOT / f"recipes/tiny/{recipe}.yaml"), *overrides]) == 0

    metrics = json.loads((run / "metrics.json").read_text())
    key = RECIPES[recipe]
    assert key in metrics["before"] and key in metrics["after"], metrics
    assert isinstance(metrics["after"][key], float)
    rows = [json.loads(line) for line in (run / "predictions_after.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all({"id", "prediction", "references"} <= set(r) for r in rows)


def test_what_a_benchmark_reads_trains_too_a_karpathy_caption_json(tmp_path):
    """cococap's data (Karpathy's dataset_coco.json) through the training entry, images under data.image_root."""
    from PIL import Image

    root = tmp_path / "coco"
    images = []
    for split, n in (("train", 6), ("val", 3)):
        for k in range(n):
            (root / "train2014").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (40 * k, 90, 200)).save(root / "train2014" / f"{split}{k}.png")
            images.append({"filepath": "train2014", "filename": f"{split}{k}.png", "split": split, "cocoid": len(images),
                           "sentences": [{"raw": f"a blue square number {k}"}, {"raw": "a square"}]})  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    run = tmp_path / "run"
    overrides = [f"training.output_dir={run}", "training.max_steps=2", "training.per_device_train_batch_size=3",
                 f"data.train={tmp_path / 'dataset_coco.json'}", f"data.image_root={root}", "data.train_split=train",
                 "data.eval_split=val", "eval.batch_size=3", "logging.html_report=false"]  # fmt: skip
    assert main(["--recipe", str(ROOT / "recipes/tiny/easyvqa_caption.yaml"), *overrides]) == 0
    rows = [json.loads(line) for line in (run / "predictions_after.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["6", "7", "8"]  # the val images, by cocoid
    assert rows[0]["references"] == ["a blue square number 0", "a square"]  # every caption is a reference
    assert "cider" in json.loads((run / "metrics.json").read_text())["after"]
