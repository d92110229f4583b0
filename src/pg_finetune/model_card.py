"""A Hugging Face model card (README.md) for a fine-tuned checkpoint directory.

YAML front matter in the Hub's convention (`base_model`, `library_name`, `tags`,
`datasets`, `pipeline_tag`), then what was trained, on what, how, the metrics,
and a snippet that loads the checkpoint with plain transformers / peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pg_finetune.model import TINY_MODELS, resolve_model_path
from pg_finetune.recipe import redact_recipe
from pg_finetune.tuning import method_of

_SNIPPET = """```python
import torch
from PIL import Image
{imports}

{load}
processor = AutoProcessor.from_pretrained({model_dir!r})
image = Image.open("your_image.jpg").convert("RGB")
inputs = processor(images=image, text="<image>" + {prompt!r}, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""

_LOAD_FULL = "model = PaliGemmaForConditionalGeneration.from_pretrained({model_dir!r}).eval()"
_LOAD_ADAPTER = (
    "base = PaliGemmaForConditionalGeneration.from_pretrained({base!r})\n"
    "model = PeftModel.from_pretrained(base, {model_dir!r}).eval()"
)


def _snippet(*, is_adapter: bool, model_dir: str, base: str, prompt: str, max_new_tokens: int) -> str:
    imports = "from transformers import AutoProcessor, PaliGemmaForConditionalGeneration"
    if is_adapter:
        imports = "from peft import PeftModel\n" + imports
    load = (_LOAD_ADAPTER if is_adapter else _LOAD_FULL).format(model_dir=model_dir, base=base)
    return _SNIPPET.format(imports=imports, load=load, model_dir=model_dir, prompt=prompt, max_new_tokens=max_new_tokens)


def _dataset_name(source: str) -> str:
    return "easy-vqa" if source.startswith("builtin:easyvqa") else source


def model_card(
    recipe: Any,
    *,
    model_dir: str,
    is_adapter: bool,
    trainable: str,
    example_prompt: str,
    max_new_tokens: int,
    before: dict[str, float] | None = None,
    after: dict[str, float] | None = None,
) -> str:
    name = recipe.model.name_or_path
    base = resolve_model_path(name)  # the tiny model's cache dir, or the hub id / directory as given
    datasets = sorted({_dataset_name(recipe.data.train), _dataset_name(recipe.data.eval or recipe.data.train)})
    front = {
        "base_model": base,
        "library_name": "peft" if is_adapter else "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["paligemma", "pg-finetune", recipe.task.name, recipe.tuning.method],
        "datasets": datasets,
    }
    t, tu = recipe.training, recipe.tuning
    method = method_of(tu)
    lora = f"; LoRA r={tu.lora_r}, alpha={tu.lora_alpha}" if method.is_adapter else ""
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {recipe.name}",
        "",
        recipe.description or f"{name} fine-tuned for {recipe.task.name} with pg-finetune.",
        "",
        "## What was trained",
        "",
        f"- Base model: `{name}`" + (" (pg-finetune's tiny random PaliGemma: a test model)" if name in TINY_MODELS else ""),
        f"- Method: `{tu.method}` (trains {method.trains}{lora})",
        f"- {trainable}",
        f"- Task: `{recipe.task.name}`; prompts look like `{example_prompt}`",
        "",
        "## Data",
        "",
        f"- Train: `{recipe.data.train}` split `{recipe.data.train_split}`",
        f"- Eval: `{recipe.data.eval or recipe.data.train}` split `{recipe.data.eval_split}`",
        "",
        "## Training",
        "",
        f"- epochs {t.num_train_epochs}, max steps {t.max_steps}, batch {t.per_device_train_batch_size} x "
        f"accumulation {t.gradient_accumulation_steps} per device",
        f"- optimizer `{t.optim}`, learning rate {t.learning_rate}, schedule `{t.lr_scheduler_type}`, "
        f"warmup {t.warmup_ratio}, seed {t.seed}",
        "- the resolved recipe is `recipe.yaml` in this directory: "
        "`python -m pg_finetune.train --recipe recipe.yaml` reruns it",
        "",
    ]
    if after:
        lines += ["## Metrics (held-out)", "", "| metric | before | after |", "|---|---|---|"]
        for key, value in after.items():
            prior = (before or {}).get(key)
            lines.append(f"| {recipe.task.name}/{key} | {'' if prior is None else f'{prior:.4f}'} | {value:.4f} |")
        lines.append("")
    lines += [
        "## Use",
        "",
        _snippet(
            is_adapter=is_adapter, model_dir=model_dir, base=base, prompt=example_prompt,
            max_new_tokens=max_new_tokens,
        ),
        "",
    ]
    return "\n".join(lines)


def write_model_card(directory: str | Path, recipe: Any, **kwargs: Any) -> Path:
    path = Path(directory) / "README.md"
    # a token pasted into free text (description) must not reach a card people share
    path.write_text(model_card(redact_recipe(recipe), model_dir=str(directory), **kwargs))
    return path
