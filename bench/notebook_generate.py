"""A plain one-at-a-time evaluation script, as the HF docs/notebooks write inference: the baseline of
bench/startup.py's eval figures.

    python bench/notebook_generate.py --model ~/.cache/pg_finetune/tiny-paligemma-seed0 --limit 200

For each easy-VQA test question in turn: open the image, `PaliGemmaProcessor(text=, images=)`,
`model.generate(max_new_tokens=8, do_sample=False)`, decode the new tokens, exact-match against the
answer. Prints the accuracy and a `BENCH {json}` line (when the first answer was decoded, when done).
"""

import time  # noqa: I001  (first, as a script's first line)

import argparse
import sys
from pathlib import Path

import torch
from easy_vqa import get_test_image_paths, get_test_questions
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    processor = PaliGemmaProcessor.from_pretrained(args.model)
    model = PaliGemmaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    questions, answers, image_ids = get_test_questions()
    paths = get_test_image_paths()
    first_answer, correct = None, 0
    for question, answer, image_id in list(zip(questions, answers, image_ids, strict=True))[: args.limit]:
        image = Image.open(paths[image_id]).convert("RGB")
        inputs = processor(text="<image>answer en " + question, images=image, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        text = processor.decode(output[0][inputs["input_ids"].shape[-1]:], skip_special_tokens=True).strip()
        correct += text == answer
        if first_answer is None:
            first_answer = time.time()
    print(f"accuracy {correct / args.limit:.4f} on {args.limit}")
    report(first_answer=first_answer, end=time.time(), imported_bitsandbytes="bitsandbytes" in sys.modules)


if __name__ == "__main__":
    main()
