"""The HF notebook recipe for PaliGemma fine-tuning, as a plain script: the baseline of the benchmarks.

    python bench/notebook_train.py --data /tmp/easyvqa.jsonl --model ~/.cache/pg_finetune/tiny-... \
        --method lora --max-steps 200 [--matched] [--threads 0]

What the Hugging Face blog/notebook ("Fine-tune PaliGemma", merve) does, with the Trainer's own
defaults as a user gets them: the whole `PaliGemmaProcessor(text=, images=, suffix=)` in the collate
function, images opened on every read, `model(**batch).loss` over every position (the Trainer's
loss), the optimizer the Trainer picks (`adamw_torch_fused` with torch >= 2.8), torch's default
thread count, LoRA r=8 on `q/k/v/o/gate/up/down_proj` (which also hits SigLIP's attention) without
dropout (peft's default), or for `--method full` the decoder trained with the vision tower and
projector frozen. `--matched` instead uses the tiny recipe's choices (recipes/tiny/easyvqa_lora.yaml or
easyvqa_full.yaml: adapters on the decoder only, r=16, alpha 32, the recipe's dropout and optimizer;
full: the vision tower and projector train too), so only the pipeline differs.

Records: a JSONL file (`image` path, `prefix`, `suffix`), see bench/_common.py. Prints the Trainer's
train metrics and a `BENCH {json}` line (first step's wall-clock end, samples/s) for the parent.
"""

import time  # noqa: I001  (the clock starts before the heavy imports, as a notebook's first cell does)

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from peft import LoraConfig, get_peft_model
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import StepClock, report  # noqa: E402

NOTEBOOK_TARGETS = ["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


class JsonlImages(torch.utils.data.Dataset):
    def __init__(self, path: str):
        self.rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return {"image": Image.open(row["image"]).convert("RGB"), "prefix": row["prefix"], "suffix": row["suffix"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="JSONL records (image, prefix, suffix)")
    parser.add_argument("--model", required=True, help="model directory (the tiny model: pg_finetune.model.tiny_model_dir)")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--matched", action="store_true", help="the tiny recipe's adapters/optimizer/trained parts")
    parser.add_argument("--lora-dropout", type=float, default=None, help="--matched: the recipe's value (default 0)")
    parser.add_argument("--optim", default=None, help="--matched: the recipe's training.optim")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--output-dir", default="/tmp/notebook_train")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    processor = PaliGemmaProcessor.from_pretrained(args.model)
    model = PaliGemmaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    if args.method == "lora":
        if args.matched:
            from pg_finetune.recipe import TuningConfig
            from pg_finetune.tuning import lora_target_regex

            config = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout or 0.0,
                                target_modules=lora_target_regex(TuningConfig()), task_type="CAUSAL_LM")
        else:
            config = LoraConfig(r=8, target_modules=NOTEBOOK_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    elif not args.matched:  # the notebook's full fine-tune: decoder only
        for param in model.model.vision_tower.parameters():
            param.requires_grad = False
        for param in model.model.multi_modal_projector.parameters():
            param.requires_grad = False

    def collate_fn(examples):
        return processor(
            text=["<image>" + e["prefix"] for e in examples],
            images=[e["image"] for e in examples],
            suffix=[e["suffix"] for e in examples],
            return_tensors="pt",
            padding="longest",
        )

    options = {"optim": args.optim} if args.matched and args.optim else {}
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=2e-3, lr_scheduler_type="cosine", logging_steps=50, save_strategy="no", report_to="none",
        remove_unused_columns=False, dataloader_pin_memory=False, seed=42, **options,
    )
    clock = StepClock()
    trainer = Trainer(model=model, args=training_args, train_dataset=JsonlImages(args.data), data_collator=collate_fn,
                      callbacks=[clock])
    metrics = trainer.train().metrics
    print(metrics)
    report(first_step_end=clock.first_step_end, samples_per_s=metrics["train_samples_per_second"],
           optim=str(training_args.optim), threads=torch.get_num_threads(), method=args.method, matched=args.matched,
           imported_bitsandbytes="bitsandbytes" in sys.modules, end=time.time())


if __name__ == "__main__":
    main()
