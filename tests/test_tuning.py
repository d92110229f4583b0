"""Tuning methods on the tiny PaliGemma: exactly the intended parameters train.

Each case applies a method, takes 3 AdamW steps on a real processor batch, and
compares every state_dict entry before and after: the set that changed must be
the set the rule below names, and everything else must be bit-identical.
The rules are written here from parameter names, independently of tuning.py.
"""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import PaliGemmaForConditionalGeneration

from pg_finetune.tiny import build_tiny, save_tiny
from pg_finetune.tuning import (
    METHODS,
    apply_tuning,
    count_parameters,
    describe_parameters,
    merge_adapter_into_base,
    merge_lora,
    quantization_config,
)

DEFAULT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_R, LORA_ALPHA = 4, 8


def make_cfg(**overrides) -> SimpleNamespace:
    fields = dict(
        method="full",
        train_vision_tower=False,
        train_projector=False,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.05,
        lora_target_modules=DEFAULT_TARGETS,
        lora_vision=False,
        lora_projector=False,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype="float32",
        bnb_4bit_use_double_quant=True,
    )
    unknown = set(overrides) - set(fields)
    assert not unknown, f"make_cfg: unknown fields {unknown}"
    return SimpleNamespace(**{**fields, **overrides})


# --- rules, from names (state_dict keys with peft's "base_model.model." stripped) -------------

VISION = "model.vision_tower."
PROJECTOR = "model.multi_modal_projector."
DECODER_ATTENTION = re.compile(r"model\.language_model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight")
VISION_ATTENTION = re.compile(r"model\.vision_tower\..*self_attn\..*")
DECODER_LORA = re.compile(
    r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    r"\.lora_[AB]\.default\.weight"
)
VISION_LORA = re.compile(
    r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
    r"\.lora_[AB]\.default\.weight"
)
PROJECTOR_COPY = re.compile(r"model\.multi_modal_projector\.modules_to_save\.default\.linear\.(weight|bias)")
VISION_COPY = re.compile(r"model\.vision_tower\.modules_to_save\.default\..+")
NUM_LAYERS = 2  # build_tiny's default, decoder and vision tower alike


def rule_full(name: str) -> bool:
    return not name.startswith((VISION, PROJECTOR))


def rule_full_with_vision(name: str) -> bool:
    return not name.startswith(PROJECTOR)


def rule_attention_only(name: str) -> bool:
    return bool(DECODER_ATTENTION.fullmatch(name))


def rule_lora(name: str) -> bool:
    return bool(DECODER_LORA.fullmatch(name))


def rule_lora_vision(name: str) -> bool:
    return bool(DECODER_LORA.fullmatch(name) or VISION_LORA.fullmatch(name))


def rule_lora_projector_trained(name: str) -> bool:
    return bool(DECODER_LORA.fullmatch(name) or PROJECTOR_COPY.fullmatch(name))


def rule_lora_vision_trained(name: str) -> bool:
    return bool(DECODER_LORA.fullmatch(name) or VISION_COPY.fullmatch(name))


# --- helpers ---------------------------------------------------------------------------------


def _image(shape: str, color: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((12, 12, 52, 52), fill=color)
    else:
        draw.rectangle((16, 16, 48, 48), fill=color)
    return image


@pytest.fixture(scope="module")
def processor():
    return build_tiny(seed=0)[1]


@pytest.fixture(scope="module")
def batch(processor):
    return processor(
        images=[_image("circle", (220, 20, 20)), _image("square", (20, 20, 220))],
        text=["caption en", "answer en what?"],
        suffix=["a red circle", "yes"],
        return_tensors="pt",
        padding="longest",
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), variant="paligemma", seed=0)


def _base_model(variant: str, method: str, tiny_dir) -> PaliGemmaForConditionalGeneration:
    if method == "qlora":
        cfg = make_cfg(method="qlora")
        model = PaliGemmaForConditionalGeneration.from_pretrained(
            tiny_dir, quantization_config=quantization_config(cfg), dtype=torch.float32
        )
    else:
        model = build_tiny(variant=variant, seed=0)[0]
    if variant == "paligemma2":
        # Gemma 2's attention soft-capping is implemented by the eager path only.
        model.config._attn_implementation = "eager"
        model.config.text_config._attn_implementation = "eager"
    return model


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_plain(k): v.detach().clone() for k, v in model.state_dict().items()}


def _plain(name: str) -> str:
    return name.removeprefix("base_model.model.")


def _train(model: torch.nn.Module, batch, steps: int = 3) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


# --- which parameters train --------------------------------------------------------------------

CASES = [
    # id, variant, cfg overrides, rule for what changes, gradient checkpointing
    ("full", "paligemma", dict(method="full"), rule_full, False),
    (
        "full+vision+gc",
        "paligemma",
        dict(method="full", train_vision_tower=True),
        rule_full_with_vision,
        True,
    ),
    ("attention_only", "paligemma", dict(method="attention_only"), rule_attention_only, False),
    ("attention_only-pg2+gc", "paligemma2", dict(method="attention_only"), rule_attention_only, True),
    ("lora", "paligemma", dict(method="lora"), rule_lora, False),
    ("lora+vision", "paligemma", dict(method="lora", lora_vision=True), rule_lora_vision, False),
    (
        "lora+train_projector+gc",
        "paligemma",
        dict(method="lora", train_projector=True),
        rule_lora_projector_trained,
        True,
    ),
    (
        "lora+train_vision_tower",
        "paligemma",
        dict(method="lora", train_vision_tower=True),
        rule_lora_vision_trained,
        False,
    ),
    ("qlora", "paligemma", dict(method="qlora"), rule_lora, False),
    ("qlora+gc", "paligemma", dict(method="qlora"), rule_lora, True),
]


@pytest.mark.parametrize(
    "variant, overrides, rule, gradient_checkpointing",
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_exactly_the_intended_parameters_change(
    variant, overrides, rule, gradient_checkpointing, batch, tiny_dir
):
    cfg = make_cfg(**overrides)
    model = apply_tuning(
        _base_model(variant, cfg.method, tiny_dir), cfg, gradient_checkpointing=gradient_checkpointing
    )
    before = _snapshot(model)
    expected = {name for name in before if rule(name)}
    assert expected, "the rule names no parameter: the test would prove nothing"

    losses = _train(model, batch)
    assert all(torch.isfinite(torch.tensor(losses)))

    changed = _changed(before, _snapshot(model))
    assert sorted(changed - expected) == [], "parameters changed that should be frozen"
    assert sorted(expected - changed) == [], "parameters that should train did not change"

    if cfg.method == "attention_only":
        assert not {name for name in changed if VISION_ATTENTION.fullmatch(name)}
        assert len(expected) == 4 * NUM_LAYERS  # q, k, v, o per decoder layer
    if cfg.method in ("lora", "qlora"):
        assert (
            sum(bool(DECODER_LORA.fullmatch(n)) for n in expected) == 2 * 7 * NUM_LAYERS
        )  # A, B x 7 x layers
        assert all(".base_layer." not in name for name in changed), "LoRA must leave base weights alone"
    if cfg.method in ("lora", "qlora") and cfg.train_projector:
        assert sum(bool(PROJECTOR_COPY.fullmatch(n)) for n in expected) == 2  # weight, bias
    if cfg.method in ("lora", "qlora") and cfg.train_vision_tower:
        vision_params = sum(n.startswith(VISION) for n, _ in build_tiny(seed=0)[0].named_parameters())
        assert sum(bool(VISION_COPY.fullmatch(n)) for n in expected) == vision_params
    if cfg.lora_vision:
        assert sum(bool(VISION_LORA.fullmatch(n)) for n in expected) == 2 * 6 * NUM_LAYERS


def test_qlora_quantises_only_the_decoder_linears(tiny_dir, batch):
    model = apply_tuning(_base_model("paligemma", "qlora", tiny_dir), make_cfg(method="qlora"))
    before = _snapshot(model)
    params = {_plain(name): param for name, param in model.named_parameters()}
    four_bit = {name for name, p in params.items() if p.__class__.__name__ == "Params4bit"}

    expected_4bit = {
        f"model.language_model.layers.{i}.{module}.base_layer.weight"
        for i in range(NUM_LAYERS)
        for module in [f"self_attn.{p}_proj" for p in "qkvo"]
        + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    }
    assert four_bit == expected_4bit
    assert all(params[name].dtype == torch.uint8 for name in four_bit)
    for name, param in params.items():
        if name.startswith((VISION, PROJECTOR)):
            assert type(param) is torch.nn.Parameter and param.dtype == torch.float32, name
    lm_head = model.get_base_model().lm_head.weight
    assert type(lm_head) is torch.nn.Parameter and lm_head.dtype == torch.float32
    assert lm_head is model.get_base_model().get_input_embeddings().weight  # still tied

    _train(model, batch)
    after = _snapshot(model)
    for name in four_bit:
        assert after[name].dtype == torch.uint8 and torch.equal(before[name], after[name]), name


@pytest.mark.parametrize(
    "overrides, vision_gets_grad",
    [
        (dict(method="lora"), False),
        (dict(method="attention_only"), False),
        (dict(method="full", train_vision_tower=True), True),
    ],
    ids=["lora", "attention_only", "full+vision"],
)
def test_gradient_checkpointing_is_non_reentrant_and_skips_a_frozen_vision_tower(
    overrides, vision_gets_grad, batch
):
    model = build_tiny(seed=0)[0]
    tuned = apply_tuning(model, make_cfg(**overrides), gradient_checkpointing=True)
    layers = list(model.model.language_model.layers) + list(model.model.vision_tower.encoder.layers)
    for layer in layers:
        assert layer.gradient_checkpointing
        assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}

    # Backward through a frozen SigLIP computes nothing anyone uses: its output must not need grad.
    # The decoder's token embeddings keep the requires-grad hook peft's recipes expect.
    seen, token_embeddings_need_grad = [], []
    hooks = [
        model.model.multi_modal_projector.register_forward_pre_hook(
            lambda module, args: seen.append(args[0].requires_grad)
        ),
        model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: token_embeddings_need_grad.append(output.requires_grad)
        ),
    ]
    tuned.train()
    tuned(**batch).loss.backward()
    for hook in hooks:
        hook.remove()
    assert seen == [vision_gets_grad]
    assert token_embeddings_need_grad == [True]


def test_no_gradient_checkpointing_unless_asked():
    model = build_tiny(seed=0)[0]
    apply_tuning(model, make_cfg(method="lora"))
    assert not any(layer.gradient_checkpointing for layer in model.model.language_model.layers)


def test_lora_at_init_computes_the_base_model_loss(batch):
    # lora_B starts at zero, so the wrapped model must give the base model's loss exactly;
    # it would not if peft's wrapper dropped pixel_values or token_type_ids (the prefix mask).
    model = build_tiny(seed=0)[0].eval()
    with torch.no_grad():
        base_loss = model(**batch).loss
        no_prefix_mask = model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).loss
    assert (base_loss - no_prefix_mask).abs() > 1e-5  # random weights: the mask moves the loss a little
    tuned = apply_tuning(model, make_cfg(method="lora")).eval()
    with torch.no_grad():
        assert torch.equal(tuned(**batch).loss, base_loss)


def test_lora_and_train_flag_on_the_same_module_is_refused():
    with pytest.raises(ValueError, match="lora_vision.*train_vision_tower"):
        apply_tuning(
            build_tiny(seed=0)[0], make_cfg(method="lora", lora_vision=True, train_vision_tower=True)
        )


def test_qlora_needs_a_4bit_base():
    with pytest.raises(ValueError, match="quantization_config"):
        apply_tuning(build_tiny(seed=0)[0], make_cfg(method="qlora"))


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        apply_tuning(build_tiny(seed=0)[0], make_cfg(method="prefix_tuning"))
    assert "prefix_tuning" in str(info.value)
    for name in ("full", "attention_only", "lora", "qlora"):
        assert name in str(info.value)
    assert set(METHODS) == {"full", "attention_only", "lora", "qlora"}


# --- quantization_config -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype_name, dtype",
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_quantization_config_fields(dtype_name, dtype):
    config = quantization_config(
        make_cfg(
            method="qlora",
            bnb_4bit_compute_dtype=dtype_name,
            bnb_4bit_quant_type="fp4",
            bnb_4bit_use_double_quant=False,
        )
    )
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_compute_dtype == dtype
    assert config.bnb_4bit_quant_type == "fp4"
    assert config.bnb_4bit_use_double_quant is False
    assert config.llm_int8_skip_modules == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


@pytest.mark.parametrize("method", ["full", "attention_only", "lora"])
def test_quantization_config_is_none_without_qlora(method):
    assert quantization_config(make_cfg(method=method)) is None


def test_the_method_record_alone_decides_4_bit_loading():
    # tuning.load_in_4bit is gone: a quantized method loads in 4 bit, the others never do
    for name, method in METHODS.items():
        assert (quantization_config(make_cfg(method=name)) is not None) == method.quantized, name
    assert [name for name, method in METHODS.items() if method.quantized] == ["qlora"]


def test_the_registry_records_agree_with_their_keys_and_with_the_schema():
    import typing

    from pg_finetune.recipe import TuningConfig

    assert all(name == method.name and method.trains for name, method in METHODS.items())
    assert {name for name, method in METHODS.items() if method.is_adapter} == {"lora", "qlora"}
    assert typing.get_args(typing.get_type_hints(TuningConfig)["method"]) == tuple(METHODS)


@pytest.mark.parametrize("name", ["full", "attention_only", "lora"])
def test_is_adapter_says_whether_the_method_returns_a_peft_model(name):
    from peft import PeftModel

    tuned = apply_tuning(build_tiny(seed=0)[0], make_cfg(method=name))
    assert isinstance(tuned, PeftModel) == METHODS[name].is_adapter


def test_quantization_config_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match=re.escape("pip install -e '.[qlora]'")):
        quantization_config(make_cfg(method="qlora"))


# --- counting ----------------------------------------------------------------------------------


def _independent_counts():
    """(all, decoder+tied, lora adapters) element counts from a fresh full-precision model."""
    fresh = build_tiny(seed=0)[0]
    total = sum(p.numel() for p in fresh.parameters())  # parameters() yields the tied weight once
    decoder = sum(p.numel() for n, p in fresh.named_parameters() if rule_full(n))
    lora = sum(
        LORA_R * (m.in_features + m.out_features)
        for n, m in fresh.named_modules()
        if re.fullmatch(DEFAULT_TARGETS, n)
    )
    return total, decoder, lora


def test_count_parameters_full_and_attention_only():
    total, decoder, _ = _independent_counts()
    assert count_parameters(apply_tuning(build_tiny(seed=0)[0], make_cfg(method="full"))) == (decoder, total)
    fresh = build_tiny(seed=0)[0]
    attention = sum(p.numel() for n, p in fresh.named_parameters() if rule_attention_only(n))
    tuned = apply_tuning(fresh, make_cfg(method="attention_only"))
    assert count_parameters(tuned) == (attention, total)


def test_count_parameters_lora_and_qlora(tiny_dir):
    total, _, lora = _independent_counts()
    assert lora == NUM_LAYERS * LORA_R * (
        (64 + 64) + (64 + 16) * 2 + (64 + 64) + (64 + 256) * 3
    )  # q, k, v (one kv head of 16), o, gate, up, down at hidden 64
    tuned = apply_tuning(build_tiny(seed=0)[0], make_cfg(method="lora"))
    assert count_parameters(tuned) == (lora, total + lora)
    # 4-bit weights count as the values they hold, not as their packed uint8 bytes.
    qtuned = apply_tuning(_base_model("paligemma", "qlora", tiny_dir), make_cfg(method="qlora"))
    assert count_parameters(qtuned) == (lora, total + lora)


def test_describe_parameters():
    model = apply_tuning(build_tiny(seed=0)[0], make_cfg(method="lora"))
    trainable, total = count_parameters(model)
    text = describe_parameters(model)
    assert text == f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"
    assert re.fullmatch(r"trainable params: [\d,]+ / [\d,]+ \(\d+\.\d\d%\)", text)


# --- merging -----------------------------------------------------------------------------------


def test_merge_lora_matches_the_adapted_model(batch):
    tuned = apply_tuning(build_tiny(seed=0)[0], make_cfg(method="lora"))
    _train(tuned, batch)
    tuned.eval()
    with torch.no_grad():
        adapted = tuned(**batch).logits
    merged = merge_lora(tuned)
    assert type(merged) is PaliGemmaForConditionalGeneration
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted, atol=1e-4)
        base = build_tiny(seed=0)[0].eval()
        assert not torch.allclose(base(**batch).logits, adapted, atol=1e-4)


def test_merge_lora_leaves_a_model_without_adapters_alone():
    model = apply_tuning(build_tiny(seed=0)[0], make_cfg(method="full"))
    assert merge_lora(model) is model


def test_qlora_merges_only_into_a_full_precision_base(tiny_dir, batch, tmp_path):
    tuned = apply_tuning(_base_model("paligemma", "qlora", tiny_dir), make_cfg(method="qlora"))
    _train(tuned, batch)
    with pytest.raises(ValueError, match="merge_adapter_into_base"):
        merge_lora(tuned)
    tuned.save_pretrained(tmp_path / "adapter")

    lora_layer = tuned.get_base_model().model.language_model.layers[0].self_attn.q_proj
    delta = (lora_layer.lora_B["default"].weight @ lora_layer.lora_A["default"].weight) * (
        LORA_ALPHA / LORA_R
    )
    assert delta.abs().max() > 0

    with pytest.raises(ValueError, match="full-precision"):
        merge_adapter_into_base(_base_model("paligemma", "qlora", tiny_dir), tmp_path / "adapter")

    base = PaliGemmaForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    base_q = base.model.language_model.layers[0].self_attn.q_proj.weight.detach().clone()
    merged = merge_adapter_into_base(base, tmp_path / "adapter")
    assert type(merged) is PaliGemmaForConditionalGeneration
    merged_q = merged.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(merged_q, base_q + delta.detach(), atol=1e-6)
