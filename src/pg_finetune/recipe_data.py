"""The datasets a recipe names: its training records and its held-out eval records.

Training (`pg_finetune.train`) and the run report (`pg_finetune.report`) both need the
eval records a run scored, picked by the same rules: one place keeps those rules.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pg_finetune.data import RecordDataset, is_karpathy, load_records
from pg_finetune.recipe import Recipe
from pg_finetune.tasks import get_task

logger = logging.getLogger(__name__)


def _record_options(recipe: Recipe) -> dict[str, Any]:
    d = recipe.data
    return dict(
        image_column=d.image_column,
        prefix_column=d.prefix_column,
        suffix_column=d.suffix_column,
        default_prefix=recipe.task.prefix or get_task(recipe.task.name).default_prefix,
        skip_bad_records=d.skip_bad_records,
        image_root=d.image_root,
        check_target=get_task(recipe.task.name).check_target,
        lowercase_suffix=d.lowercase_suffix,
    )


def train_dataset(recipe: Recipe) -> RecordDataset:
    d = recipe.data
    return load_records(
        d.train, d.train_split, limit=d.max_train_samples, require_suffix=True, config=d.train_config,
        **_record_options(recipe),
    )


def eval_dataset(recipe: Recipe) -> RecordDataset | None:
    """The held-out split a run evaluates on (images not decoded yet), or None when it has none."""
    d = recipe.data
    eval_split = d.eval_split
    if eval_split and d.eval is None and Path(d.train).is_file() and not is_karpathy(d.train):
        # one JSONL file has no splits: its "test" would be the training data again (a Karpathy JSON has them)
        logger.warning("data.train is a single file and data.eval is not set: no held-out evaluation")
        eval_split = None
    if not eval_split:
        return None
    same_source = d.eval is None or d.eval == d.train
    return load_records(
        d.eval or d.train,
        eval_split,
        limit=recipe.eval.max_samples,
        require_suffix=False,
        config=d.eval_config if d.eval_config is not None else (d.train_config if same_source else None),
        **_record_options(recipe),
    )


def load_eval_records(recipe: Recipe) -> list[dict]:
    """The eval records a run scores (images decoded; bad ones dropped when data.skip_bad_records)."""
    dataset = eval_dataset(recipe)
    if dataset is None:
        return []
    return [r for r in (dataset[i] for i in range(len(dataset))) if r is not None]
