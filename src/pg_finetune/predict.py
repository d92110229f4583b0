"""Run a PaliGemma model on one image and a prompt.

    python -m pg_finetune.predict --model runs/tiny_easyvqa_full/final --image shape.png \\
        --prompt "answer en what color is the shape?"
    python -m pg_finetune.predict --model google/paligemma2-3b-pt-224 --adapter runs/x/final \\
        --image street.jpg --prompt "detect car ; person" --save-overlay boxes.png --constrained

Greedy decoding unless --do-sample (then --temperature and --top-p apply). For
`detect ...` prompts the parsed boxes are printed (pixels, x1 y1 x2 y2) and
--save-overlay draws them on the image; --constrained masks the decoding so the
output always parses as boxes with the prompt's labels (`pg_finetune.constrained`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pg_finetune.generate import GenerationSettings, generate
from pg_finetune.images import BadRecordError, open_image
from pg_finetune.loc import parse_detections
from pg_finetune.model import ModelLoadError, load_for_inference


def draw_detections(image: Image.Image, detections) -> Image.Image:
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(min(image.size) / 150))
    for det in detections:
        x1, y1, x2, y2 = det.box
        draw.rectangle((x1, y1, x2, y2), outline=(255, 40, 40), width=width)
        draw.text((x1 + width, y1 + width), det.label, fill=(255, 40, 40))
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pg_finetune.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="hub id, local directory, or 'tiny'")
    parser.add_argument("--adapter", help="PEFT adapter directory to put on --model")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", required=True, help='prefix, e.g. "caption en" or "detect cat ; dog"')
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --do-sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --do-sample")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    parser.add_argument(
        "--constrained", action="store_true",
        help="for detect prompts: only let the model write `<loc>x4 label ; ...` with the prompt's labels",
    )
    parser.add_argument("--save-overlay", help="for detect prompts: write the image with boxes drawn here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be > 0 and --top-p in (0, 1]")

    try:
        image = open_image(args.image, where=args.image)
    except BadRecordError as err:  # the dataset hint (skip_bad_records) means nothing here
        print(f"error: --image {err.problem}", file=sys.stderr)
        return 2
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
    text = generate(model, processor, [{"image": image, "prefix": args.prompt}], settings, progress=False)[0]
    result: dict = {"prompt": args.prompt, "output": text}
    if args.prompt.strip().startswith("detect"):
        labels = [s.strip() for s in args.prompt.strip()[len("detect") :].split(";") if s.strip()]
        parsed = parse_detections(text, image.width, image.height, allowed_labels=labels or None)
        result["detections"] = [{"label": d.label, "box_xyxy": [round(v, 1) for v in d.box]} for d in parsed.detections]
        result["malformed"] = parsed.malformed
        if args.save_overlay:
            draw_detections(image, parsed.detections).save(args.save_overlay)
            result["overlay"] = str(Path(args.save_overlay))
    if args.json:
        print(json.dumps(result))
    else:
        print(text)
        for det in result.get("detections", []):
            print(f"  {det['label']}: {det['box_xyxy']}")
        if result.get("malformed"):
            print(f"  ({result['malformed']} malformed segments ignored)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
