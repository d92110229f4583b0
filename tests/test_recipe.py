"""Recipe schema: shipped recipes load, and every kind of mistake is reported by key with a fix."""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from pg_finetune.recipe import (
    Recipe,
    RecipeError,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    save_recipe,
    validate_recipe,
)

REPO = Path(__file__).parents[1]
SHIPPED_RECIPES = sorted(REPO.glob("recipes/**/*.yaml"))


def problems_of(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, source="t.yaml")
    return info.value.problems


def only_problem(data: dict) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------------------
# Shipped recipes
# ---------------------------------------------------------------------------


def test_recipes_are_shipped():
    names = {p.relative_to(REPO).as_posix() for p in SHIPPED_RECIPES}
    assert {"recipes/tiny/easyvqa_lora.yaml", "recipes/longcap_attention_only.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_shipped_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert "{name}" not in recipe.training.output_dir
    text = path.read_text()
    # STYLE.md item 3: the header says how to run it
    assert f"make finetune RECIPE={path.relative_to(REPO).as_posix()}" in text
    assert f"accelerate launch -m pg_finetune.train --recipe {path.relative_to(REPO).as_posix()}" in text
    # nothing in the YAML was silently dropped: every key written is in the resolved recipe
    raw = yaml.safe_load(text)
    resolved = recipe_to_dict(recipe)
    for section, values in raw.items():
        if isinstance(values, dict):
            assert set(values) <= set(resolved[section]), section


def test_longcap_recipe_mirrors_big_vision_colab():
    recipe = load_recipe(REPO / "recipes/longcap_attention_only.yaml")
    assert recipe.tuning.method == "attention_only"
    assert recipe.training.optim == "sgd"
    assert recipe.training.learning_rate == pytest.approx(0.03)
    assert recipe.training.lr_scheduler_type == "cosine"
    assert recipe.training.warmup_ratio == pytest.approx(0.1)
    assert recipe.training.per_device_train_batch_size == 8
    assert recipe.data.max_length == 128
    assert recipe.task.name == "caption"


def test_every_field_has_help_text():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp)

    walk(Recipe)


# ---------------------------------------------------------------------------
# Keys and types
# ---------------------------------------------------------------------------


def test_defaults_are_valid():
    recipe = recipe_from_dict({})
    assert recipe.tuning.method == "lora"
    assert recipe.training.output_dir == "runs/run"


def test_unknown_key_suggests_closest():
    msg = only_problem({"tuning": {"lora_rank": 8}})
    assert "unknown key 'tuning.lora_rank'" in msg
    assert "did you mean 'lora_r'?" in msg


def test_key_in_wrong_section_names_its_section():
    msg = only_problem({"model": {"gradient_checkpointing": True}})
    assert "unknown key 'model.gradient_checkpointing'" in msg
    assert "training.gradient_checkpointing" in msg


def test_unknown_section_lists_valid_sections():
    msg = only_problem({"trainer": {"learning_rate": 1e-4}})
    assert "unknown section 'trainer'" in msg
    assert "did you mean 'training'?" in msg
    for section in ("model", "task", "data", "tuning", "training", "eval", "logging"):
        assert section in msg


def test_wrong_type_names_key_and_value():
    msg = only_problem({"training": {"learning_rate": "fast"}})
    assert msg == "training.learning_rate: expected a number, got 'fast' (str)"


def test_literal_mismatch_lists_allowed_values():
    msg = only_problem({"tuning": {"method": "lorra"}})
    assert msg.startswith("tuning.method:")
    for allowed in ("'full'", "'attention_only'", "'lora'", "'qlora'"):
        assert allowed in msg
    assert "did you mean 'lora'?" in msg


def test_yaml_string_float_is_accepted():
    # PyYAML (YAML 1.1) reads 2e-5 without a dot as a string
    data = yaml.safe_load("training:\n  learning_rate: 2e-5\n")
    assert data["training"]["learning_rate"] == "2e-5"
    recipe = recipe_from_dict(data)
    assert recipe.training.learning_rate == pytest.approx(2e-5)
    assert isinstance(recipe.training.learning_rate, float)


def test_int_accepted_for_float_field():
    recipe = recipe_from_dict({"training": {"num_train_epochs": 3}})
    assert recipe.training.num_train_epochs == 3.0
    assert isinstance(recipe.training.num_train_epochs, float)


def test_bool_rejected_for_int_and_float():
    problems = problems_of({"tuning": {"lora_r": True}, "training": {"learning_rate": False}})
    assert "tuning.lora_r: expected an integer, got True (bool)" in problems
    assert "training.learning_rate: expected a number, got False (bool)" in problems


def test_null_rejected_for_non_optional_field():
    msg = only_problem({"data": {"train_split": None}})
    assert msg.startswith("data.train_split: expected a string, got null")


def test_non_mapping_section_is_reported():
    msg = only_problem({"training": [1, 2]})
    assert msg.startswith("training: expected a mapping")


# ---------------------------------------------------------------------------
# Range and combination checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [-1e-4, 0, 5])
def test_learning_rate_range(lr):
    msg = only_problem({"training": {"learning_rate": lr}})
    assert msg.startswith("training.learning_rate: must be > 0 and <= 1")
    assert str(lr) in msg


def test_qlora_alone_means_4_bit():
    tuning = recipe_from_dict({"tuning": {"method": "qlora"}}).tuning
    assert tuning.method_spec.quantized and tuning.method_spec.is_adapter


@pytest.mark.parametrize(
    ("section", "key", "value", "replacement"),
    [
        ("tuning", "load_in_4bit", True, "method qlora implies 4-bit"),
        ("training", "per_device_eval_batch_size", 16, "eval.batch_size"),
        ("data", "max_eval_samples", 10, "eval.max_samples"),
    ],
)
def test_removed_keys_say_what_replaced_them(section, key, value, replacement):
    msg = only_problem({section: {key: value}})
    assert msg.startswith(f"unknown key '{section}.{key}'") and f"{section}.{key} was removed" in msg
    assert replacement in msg
    with pytest.raises(RecipeError) as info:  # the same on the command line
        load_recipe(REPO / "recipes/tiny/easyvqa_lora.yaml", [f"{section}.{key}={value}"])
    assert len(info.value.problems) == 1 and replacement in info.value.problems[0]


def test_qlora_without_bitsandbytes(monkeypatch):
    import pg_finetune.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "_has_module", lambda name: name != "bitsandbytes")
    msg = only_problem({"tuning": {"method": "qlora"}})
    assert "pip install -e '.[qlora]'" in msg


def test_lora_r_zero():
    msg = only_problem({"tuning": {"method": "lora", "lora_r": 0}})
    assert msg.startswith("tuning.lora_r: must be >= 1")
    assert "got 0" in msg


def test_lora_r_zero_is_fine_for_full():
    recipe = recipe_from_dict({"tuning": {"method": "full", "lora_r": 0}})
    assert recipe.tuning.method == "full"


def test_flash_attention_refused():
    msg = only_problem({"model": {"attn_implementation": "flash_attention_2"}})
    assert msg.startswith("model.attn_implementation:")
    assert "prefix" in msg
    assert "use sdpa or eager" in msg


def test_bf16_and_fp16():
    msg = only_problem({"training": {"bf16": True, "fp16": True}})
    assert "training.bf16" in msg and "training.fp16" in msg


def test_merge_lora_with_full():
    msg = only_problem({"tuning": {"method": "full"}, "training": {"merge_lora": True}})
    assert msg.startswith("training.merge_lora:")
    assert "'full'" in msg


def test_lora_vision_with_attention_only():
    msg = only_problem({"tuning": {"method": "attention_only", "lora_vision": True}})
    assert msg.startswith("tuning.lora_vision:")


def test_unknown_task_lists_valid_names():
    msg = only_problem({"task": {"name": "vqaa"}})
    assert msg.startswith("task.name:")
    assert "caption" in msg and "vqa" in msg


def test_detection_augment_defaults():
    assert recipe_from_dict({}).task.shuffle_objects is None
    assert recipe_from_dict({}).task.negatives == 0
    task = recipe_from_dict({"task": {"name": "detect", "shuffle_objects": True, "negatives": 3}}).task
    assert (task.shuffle_objects, task.negatives) == (True, 3)
    assert recipe_from_dict({"task": {"name": "vqa", "shuffle_objects": False}}).task.shuffle_objects is False


def test_shuffle_objects_needs_detect():
    msg = only_problem({"task": {"name": "vqa", "shuffle_objects": True}})
    assert msg.startswith("task.shuffle_objects:") and "detect" in msg and "'vqa'" in msg


def test_negatives_need_detect():
    msg = only_problem({"task": {"name": "caption", "negatives": 2}})
    assert msg.startswith("task.negatives:") and "detect" in msg and "'caption'" in msg


def test_negatives_not_negative():
    msg = only_problem({"task": {"name": "detect", "negatives": -1}})
    assert msg.startswith("task.negatives:") and ">= 0" in msg


def test_empty_train_source():
    msg = only_problem({"data": {"train": "  "}})
    assert msg.startswith("data.train:")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("training", "per_device_train_batch_size", 0),
        ("training", "gradient_accumulation_steps", 0),
        ("training", "logging_steps", 0),
        ("training", "save_steps", 0),
        ("training", "max_steps", 0),
        ("training", "num_train_epochs", 0),
        ("training", "warmup_ratio", 1.0),
        ("training", "weight_decay", -0.1),
        ("training", "max_grad_norm", -1.0),
        ("training", "save_total_limit", 0),
        ("training", "dataloader_num_workers", -1),
        ("training", "seed", -1),
        ("training", "seed", 2**32),
        ("tuning", "lora_dropout", 1.0),
        ("data", "max_length", 7),
        ("data", "max_train_samples", 0),
        ("eval", "batch_size", 0),
        ("eval", "num_beams", 0),
        ("eval", "eval_steps", 0),
        ("eval", "max_samples", 0),
    ],
)
def test_range_checks(section, key, value):
    msg = only_problem({section: {key: value}})
    assert msg.startswith(f"{section}.{key}:")


def _numeric_fields() -> list[tuple[str, str, type]]:
    """(section, key, int or float) for every number in the schema, optional ones included."""
    from pg_finetune.recipe import SECTIONS, _is_optional

    found = []
    for section, cls in SECTIONS.items():
        for key, tp in typing.get_type_hints(cls).items():
            inner = _is_optional(tp)[1]
            if inner in (int, float):
                found.append((section, key, inner))
    return found


@pytest.mark.parametrize(("section", "key", "kind"), _numeric_fields(), ids=lambda v: getattr(v, "__name__", v))
def test_every_numeric_field_has_a_range_rule(section, key, kind):
    # A field added without a rule accepts both extremes and fails here: add its rule to _check_combinations.
    extremes = [-(2**31), 2**40] if kind is int else [-1e9, 1e9]
    refused = []
    for value in extremes:
        try:
            recipe_from_dict({section: {key: value}})
        except RecipeError as err:
            refused += [p for p in err.problems if p.startswith(f"{section}.{key}:")]
    assert refused, f"{section}.{key} accepts both {extremes}: it has no range rule"


def test_all_problems_reported_at_once():
    data = {
        "nmae": "x",
        "model": {"attn_implementation": "flash_attention_2"},
        "tuning": {"lora_rank": 4, "method": "qlora", "load_in_4bit": True},
        "training": {"learning_rate": -1, "bf16": True, "fp16": True, "optim": "adam"},
        "eval": {"num_beams": 0},
    }
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, source="recipes/x.yaml")
    err = info.value
    text = str(err)
    assert text.splitlines()[0] == f"recipe recipes/x.yaml has {len(err.problems)} problems:"
    assert len(err.problems) == 8, err.problems
    for key in (
        "'nmae'",
        "model.attn_implementation",
        "tuning.lora_rank",
        "tuning.load_in_4bit",
        "training.learning_rate",
        "training.bf16",
        "training.optim",
        "eval.num_beams",
    ):
        assert key in text, key
    assert all(line.startswith("  - ") for line in text.splitlines()[1:])


def test_type_error_does_not_trigger_rules_on_the_default():
    # method fails its type check and keeps the default 'lora'; the LoRA rank rule must not fire on it
    problems = problems_of({"tuning": {"method": "fulll", "lora_r": 0}})
    assert len(problems) == 1 and problems[0].startswith("tuning.method:"), problems


# ---------------------------------------------------------------------------
# Files, overrides, saving
# ---------------------------------------------------------------------------


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: exp\ntuning:\n  method: lora\ntraining:\n  learning_rate: 1e-4\n")
    return path


def test_load_error_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  learning_rat: 1e-4\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"recipe {path} has 1 problem:")
    assert "did you mean 'learning_rate'?" in str(info.value)


def test_duplicate_keys_are_collected_with_the_other_problems(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("tuning:\n  lora_r: 8\n  lora_r: 16\ntraining:\n  learning_rate: 5\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems[0].startswith("tuning.lora_r: written twice (lines 2 and 3)")
    assert any(p.startswith("training.learning_rate:") for p in info.value.problems)


def test_yaml_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("training: &t\n  seed: 3\neval:\n  <<: {batch_size: 2}\n  batch_size: 4\n")
    assert load_recipe(path).eval.batch_size == 4


def test_a_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("\ufeffname: bom\n".encode())
    assert load_recipe(path).name == "bom"


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert recipe_to_dict(load_recipe(path)) == recipe_to_dict(recipe_from_dict({}))


def test_overrides_apply_and_are_typed(recipe_file):
    recipe = load_recipe(
        recipe_file,
        [
            "training.learning_rate=3e-5",
            "training.max_steps=5",
            "tuning.method=full",
            "data.train_split=train[:10]",
            "data.eval_split=null",
            "model.revision=0123",
            "name=other",
        ],
    )
    assert recipe.training.learning_rate == pytest.approx(3e-5)
    assert recipe.training.max_steps == 5 and isinstance(recipe.training.max_steps, int)
    assert recipe.tuning.method == "full"
    assert recipe.data.train_split == "train[:10]"
    assert recipe.data.eval_split is None
    assert recipe.model.revision == "0123"  # text field: not read as the octal-ish int 83
    assert recipe.name == "other"
    assert recipe.training.output_dir == "runs/other"


def test_override_into_missing_section(recipe_file):
    recipe = load_recipe(recipe_file, ["eval.max_samples=5"])
    assert recipe.eval.max_samples == 5


def test_override_bad_key(recipe_file):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file, ["training.lerning_rate=1e-4"])
    (msg,) = info.value.problems
    assert "training.lerning_rate" in msg
    assert "did you mean 'learning_rate'?" in msg


def test_override_bad_section_and_syntax(recipe_file):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file, ["trainig.seed=1", "training.seed"])
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert "unknown section 'trainig'" in problems[0]
    assert "expected 'section.key=value'" in problems[1]


def test_override_bad_value(recipe_file):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file, ["training.max_steps=many", "training.learning_rate=0"])
    text = str(info.value)
    assert "training.max_steps: expected an integer, got 'many' (str)" in text
    assert "training.learning_rate: must be > 0" in text


def test_output_dir_name_substitution():
    recipe = recipe_from_dict({"name": "exp1", "training": {"output_dir": "/tmp/x/{name}/out"}})
    assert recipe.training.output_dir == "/tmp/x/exp1/out"


def test_save_load_round_trip(tmp_path, recipe_file):
    recipe = load_recipe(recipe_file, ["training.max_steps=7", "data.eval_split=null"])
    path = save_recipe(recipe, tmp_path / "out" / "saved.yaml")
    assert path == tmp_path / "out" / "saved.yaml"
    text = path.read_text()
    assert text.startswith("# ")
    assert "accelerate launch -m pg_finetune.train --recipe" in text
    again = load_recipe(path)
    assert recipe_to_dict(again) == recipe_to_dict(recipe)
    # resolved: every default is written out
    assert set(yaml.safe_load(text)["training"]) == {f.name for f in dataclasses.fields(recipe.training)}


def test_save_into_directory(tmp_path):
    path = save_recipe(recipe_from_dict({"name": "d"}), tmp_path)
    assert path == tmp_path / "recipe.yaml"
    assert load_recipe(tmp_path).name == "d"


def test_save_never_writes_tokens(tmp_path, monkeypatch):
    import pg_finetune.recipe as recipe_module

    secret = "hf_" + "a1B2c3D4" * 4
    recipe = recipe_from_dict({"name": "s"})
    recipe.logging.run_name = secret  # a token pasted in the wrong place
    original = recipe_module.recipe_to_dict

    def with_token_field(r):
        data = copy.deepcopy(original(r))
        data["model"]["hub_token"] = "hf_short"
        return data

    monkeypatch.setattr(recipe_module, "recipe_to_dict", with_token_field)
    text = save_recipe(recipe, tmp_path / "s.yaml").read_text()
    assert "hf_" not in text
    assert "<redacted>" in text


def test_validate_recipe_catches_edits_in_code():
    recipe = recipe_from_dict({})
    recipe.training.learning_rate = -1.0
    with pytest.raises(RecipeError, match="training.learning_rate"):
        validate_recipe(recipe)


def test_recipe_error_pickles():
    import pickle

    err = RecipeError(["a.b: bad"], "x.yaml")
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == ["a.b: bad"] and str(again) == str(err)


def test_task_metric_picks_one_of_the_tasks_metrics():
    recipe = recipe_from_dict({"task": {"name": "vqa", "metric": "vqav2_accuracy"}})
    assert recipe.task.metric == "vqav2_accuracy"
    with pytest.raises(RecipeError, match=r"task.metric: task 'caption' has no metric 'vqav2_accuracy'; valid: captions"):
        recipe_from_dict({"task": {"name": "caption", "metric": "vqav2_accuracy"}})
