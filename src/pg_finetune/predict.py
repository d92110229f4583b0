"""Run a PaliGemma model on one image and a prompt.

    python -m pg_finetune.predict --model runs/tiny_easyvqa_full/final --image shape.png \\
        --prompt "answer en what color is the shape?"
    python -m pg_finetune.predict --model google/paligemma2-3b-pt-224 --adapter runs/x/final \\
        --image street.jpg --prompt "detect car ; person" --save-overlay boxes.png --constrained

Greedy decoding unless --do-sample (then --temperature and --top-p apply). For
`detect ...` prompts the parsed boxes are printed (pixels, x1 y1 x2 y2) and
--save-overlay draws them on the image; --constrained masks the decoding so the
output always parses as boxes with the prompt's labels (`pg_finetune.tasks.detect.constrained`).
The prompt is cut at --max-length text tokens; without the flag, at the `data.max_length`
of the recipe.yaml a trained model directory carries (--adapter's, else --model's), else 512.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from pg_finetune.draw import draw_boxes
from pg_finetune.generate import GenerationSettings, generate
from pg_finetune.images import BadRecordError, open_image
from pg_finetune.loc import DETECT_PREFIX, parse_detections
from pg_finetune.model import ModelLoadError, load_for_inference, max_length_arg, resolve_max_length
from pg_finetune.tasks.detect.targets import prompt_classes


def draw_detections(image: Image.Image, detections) -> Image.Image:
    """A copy of `image` at full size with the parsed `detections` drawn as predictions (red)."""
    return draw_boxes(image, predicted=[(d.box, d.label) for d in detections])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pg_finetune.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="hub id, local directory, or 'tiny'")
    parser.add_argument("--adapter", help="PEFT adapter directory to put on --model")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", required=True, help='prefix, e.g. "caption en" or "detect cat ; dog"')
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation budget, >= 1 (default: 64)")
    parser.add_argument(
        "--max-length", type=max_length_arg, metavar="N",
        help="prompt budget in text tokens (<bos> + prompt + '\\n'; a longer prompt is cut). Precedence: "
        "this flag > data.max_length of the training recipe.yaml in --adapter, else in a local --model "
        "directory > 512",
    )
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --do-sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --do-sample")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    parser.add_argument(
        "--constrained", "--constrained-detection", dest="constrained", action="store_true",
        help="for detect prompts: only let the model write `<loc>x4 label ; ...` with the prompt's labels",
    )
    parser.add_argument("--save-overlay", help="for detect prompts: write the image with boxes drawn here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--quiet", action="store_true", help="print only the output (no notes on stderr)")
    args = parser.parse_args(argv)
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be > 0 and --top-p in (0, 1]")
    if not args.prompt.strip():
        parser.error("--prompt is empty: give the task prefix, e.g. 'caption en' or 'detect cat ; dog'")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.save_overlay and not Path(args.save_overlay).resolve().parent.is_dir():
        parser.error(f"--save-overlay: folder {Path(args.save_overlay).parent} does not exist")

    try:
        image = open_image(args.image, where=args.image)
    except BadRecordError as err:  # the dataset hint (skip_bad_records) means nothing here
        print(f"error: --image {err.problem}", file=sys.stderr)
        return 2
    # The prompt budget the model was trained with, as training-time eval used it, not a fixed 512.
    max_length, max_length_source = resolve_max_length(args.max_length, args.model, args.adapter)
    try:
        model, processor = load_for_inference(args.model, args.adapter, dtype=args.dtype, cpu=args.cpu)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, batch_size=1, constrain_detection=args.constrained,
    )
    record = {"image": image, "prefix": args.prompt}
    text = generate(model, processor, [record], settings, max_length=max_length, progress=False)[0]
    result: dict = {"prompt": args.prompt, "output": text, "max_length": max_length,
                    "max_length_source": max_length_source}  # fmt: skip
    if args.prompt.strip().startswith(DETECT_PREFIX):
        labels = prompt_classes(args.prompt.strip())
        parsed = parse_detections(text, image.width, image.height, allowed_labels=labels or None)
        result["detections"] = [{"label": d.label, "box_xyxy": [round(v, 1) for v in d.box]} for d in parsed.detections]
        result["malformed"] = parsed.malformed
        if args.save_overlay:
            draw_detections(image, parsed.detections).save(args.save_overlay)
            result["overlay"] = str(Path(args.save_overlay))
    if args.json:
        print(json.dumps(result))
    else:
        if not args.quiet:
            print(f"max_length {max_length} text tokens ({max_length_source})", file=sys.stderr)
        print(text)
        for det in result.get("detections", []):
            print(f"  {det['label']}: {det['box_xyxy']}")
        if result.get("malformed"):
            print(f"  ({result['malformed']} malformed segments ignored)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
