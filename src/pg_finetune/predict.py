"""Run a PaliGemma model on one image, a folder of images, or a JSONL file of records.

    python -m pg_finetune.predict --model runs/tiny_easyvqa_full/final --image shape.png \\
        --prompt "answer en what color is the shape?"
    python -m pg_finetune.predict --model google/paligemma2-3b-pt-224 --adapter runs/x/final \\
        --image street.jpg --prompt "detect car ; person" --save-overlay boxes.png --constrained
    python -m pg_finetune.predict --model runs/x/final --images photos/ --prompt "detect car ; person" \\
        --out predictions.jsonl --overlays boxes/
    python -m pg_finetune.predict --model runs/tiny_easyvqa_segment/final --image shape.png \\
        --prompt "segment circle" --save-overlay mask.png --constrained
    python -m pg_finetune.predict --model runs/x/final --records questions.jsonl --out answers.jsonl

Inputs. --image FILE: the output is printed (--json: one JSON object). --images DIR: every image
file directly in DIR, sorted by name (id: the file name). --records FILE.jsonl: one
{"image": path relative to the file, "prompt" (or "prefix"), "id"} per line (id: the line
number when absent); --prompt is used for records without a prompt. Each input gives one JSON
line {"id", "image", "prompt", "output"} in --out (else on stdout), in batches of --batch-size
with a progress bar on stderr. An image (or record line) that cannot be used is listed on stderr
and skipped: the exit code is 0 when any input got an output, else 2.

Parsed results, by the prompt's first word: `detect a ; b` adds "detections"
([{"label", "box_xyxy"}], pixels x1 y1 x2 y2) and "malformed" (segments ignored), and
--save-overlay (--image) / --overlays DIR (any input) draw the boxes on the image;
`count ...` adds "count" (an integer, null when the output is not one); `segment X` adds
"segmentation" ({"box_xyxy", "area", "mask": COCO RLE}, the mask decoded by --mask-codec; null
with a "problem" when the output is not 4 loc + 16 seg tokens), and the overlay flags draw the mask.

Decoding: greedy unless --num-beams > 1 or --do-sample (then --temperature, --top-p and --top-k
apply); --repetition-penalty applies to all three. --constrained masks the decoding of detect
prompts so the output always parses as boxes with the prompt's labels
(`pg_finetune.tasks.detect.constrained`), and of segment prompts so it is 4 loc + 16 seg tokens
(`pg_finetune.tasks.segment.constrained`). The prompt is cut at --max-length text tokens; without
the flag, at the `data.max_length` of the recipe.yaml a trained model directory carries
(--adapter's, else --model's), else 512.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image
from tqdm.auto import tqdm

from pg_finetune.draw import draw_boxes, draw_masks
from pg_finetune.generate import GenerationSettings, generate
from pg_finetune.images import BadRecordError, open_image
from pg_finetune.jsonl import jsonl_objects
from pg_finetune.loc import DETECT_PREFIX, ParseResult, parse_detections
from pg_finetune.metrics.counting import read_count
from pg_finetune.model import ModelLoadError, load_for_inference, max_length_arg, resolve_max_length
from pg_finetune.prep.od_dataset import IMAGE_EXTENSIONS
from pg_finetune.tasks.count import COUNT
from pg_finetune.tasks.detect import DETECT, prompt_classes
from pg_finetune.tasks.segment import SEGMENT, SEGMENT_PREFIX


def draw_detections(image: Image.Image, detections) -> Image.Image:
    """A copy of `image` at full size with the parsed `detections` drawn as predictions (red)."""
    return draw_boxes(image, predicted=[(d.box, d.label) for d in detections])


# ---- what an output is parsed into ---------------------------------------------------------------


def _parse_boxes(text: str, prompt: str, image: Image.Image) -> ParseResult:
    labels = prompt_classes(prompt.strip())
    return parse_detections(text, image.width, image.height, allowed_labels=labels or None)


def _detection_fields(text: str, prompt: str, image: Image.Image) -> dict[str, Any]:
    parsed = _parse_boxes(text, prompt, image)
    detections = [{"label": d.label, "box_xyxy": [round(v, 1) for v in d.box]} for d in parsed.detections]
    return {"detections": detections, "malformed": parsed.malformed}


def _count_fields(text: str, prompt: str, image: Image.Image) -> dict[str, Any]:
    return {"count": read_count(text)}


# The mask codec that decodes `segment` outputs (--mask-codec; None: the scoring default).
_MASK_CODEC: dict[str, Path | None] = {"path": None}


def _segment_mask(text: str, image: Image.Image) -> tuple[Any, list[int] | None, str | None]:
    """(full-image bool mask or None, pixel box or None, why invalid or None) of a segment output."""
    from pg_finetune.tasks.segment.masks import box_pixels, paste_logits
    from pg_finetune.tasks.segment.parse import parse_segmentation
    from pg_finetune.tasks.segment.scoring import default_codec_path, load_codec

    parsed = parse_segmentation(text)
    if parsed.problem is not None:
        return None, None, parsed.problem
    codec = load_codec(_MASK_CODEC["path"] or default_codec_path())
    box = box_pixels(parsed.bins, image.width, image.height)
    mask = paste_logits(codec.decode([list(parsed.codes)])[0], box, image.width, image.height)
    return mask, list(box), None


def _segment_fields(text: str, prompt: str, image: Image.Image) -> dict[str, Any]:
    from pg_finetune.tasks.segment.masks import mask_rle

    mask, box, problem = _segment_mask(text, image)
    if mask is None:
        return {"segmentation": None, "problem": problem}
    return {"segmentation": {"box_xyxy": box, "area": int(mask.sum()), "mask": mask_rle(mask)}}


def draw_segmentation(image: Image.Image, text: str, prompt: str) -> Image.Image:
    """A copy of `image` at full size with the decoded mask (red, translucent) and its box."""
    mask, box, _ = _segment_mask(text, image)
    label = " ".join(prompt.split()[1:])
    return draw_masks(image, predicted=[(box, label, "", mask)] if mask is not None else [])


# A prompt's first word -> the task that reads its output. Prompts of other tasks give the text only.
PROMPT_TASKS: dict[str, str] = {DETECT_PREFIX: DETECT.name, "count": COUNT.name, SEGMENT_PREFIX: SEGMENT.name}
# Task name -> (output, prompt, image) -> the fields its parsed output adds to a result.
PARSED_FIELDS: dict[str, Callable[[str, str, Image.Image], dict[str, Any]]] = {
    DETECT.name: _detection_fields,
    COUNT.name: _count_fields,
    SEGMENT.name: _segment_fields,
}


def prompt_task(prompt: str) -> str | None:
    """Name of the task whose output `prompt` asks for (`detect cat` -> "detect"); None: not parsed."""
    words = prompt.split(maxsplit=1)
    return PROMPT_TASKS.get(words[0]) if words else None


# ---- inputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    id: Any  # as the record gives it (the file name for --images)
    image: str  # path of the image file, as opened
    prompt: str


def folder_inputs(folder: Path, prompt: str) -> list[Input]:
    """One input per image file directly in `folder` (by extension, hidden files left out), sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    files = [p for p in files if not p.name.startswith(".")]
    return [Input(id=p.name, image=str(p), prompt=prompt) for p in files]


def records_inputs(path: Path, prompt: str | None) -> tuple[list[Input], list[tuple[str, str]]]:
    """(inputs, [(where, problem)] of the lines that give none) from a JSONL file of records."""
    inputs, problems = [], []
    for number, record, problem in jsonl_objects(path):
        where = f"{path} line {number}"
        if record is None:
            problems.append((where, problem or "unreadable"))
            continue
        image = record.get("image")
        text = record.get("prompt", record.get("prefix", prompt))
        if not isinstance(image, str) or not image:
            problems.append((where, "no 'image' path (a string relative to the records file)"))
        elif not isinstance(text, str) or not text.strip():
            problems.append((where, "no 'prompt' (or 'prefix'), and no --prompt to use instead"))
        else:
            item_id = record.get("id", str(number))
            inputs.append(Input(id=item_id, image=str(path.parent / image), prompt=text))
    return inputs, problems


class OverlayNames:
    """DIR/<id>.png for each input, an image extension dropped, unique (a.jpg, a.png -> a.png, a-2.png)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.used: set[str] = set()

    def __call__(self, item: Input) -> Path:
        name = str(item.id)
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
            name = name[: -len(Path(name).suffix)]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"
        candidate, n = stem, 1
        while candidate in self.used:
            n += 1
            candidate = f"{stem}-{n}"
        self.used.add(candidate)
        return self.folder / f"{candidate}.png"


def _no_overlay(item: Input) -> None:
    return None


def _one_overlay(path: Path) -> Callable[[Input], Path]:
    return lambda item: path


# ---- the run -------------------------------------------------------------------------------------------


def predict_inputs(
    model: torch.nn.Module,
    processor: Any,
    inputs: list[Input],
    settings: GenerationSettings,
    *,
    max_length: int,
    write: Callable[[dict], None],
    overlay_path: Callable[[Input], Path | None] = lambda item: None,
    progress: bool = True,
) -> list[tuple[str, str]]:
    """Generate for `inputs` in batches of `settings.batch_size`, `write` each result as it is ready;
    return [(image, problem)] of the images that could not be read (skipped).

    Images are opened one batch at a time, so a folder of any size fits in memory.
    """
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(inputs), desc="predicting", unit="img", disable=not progress)
    try:
        for start in range(0, len(inputs), settings.batch_size):
            chunk = inputs[start : start + settings.batch_size]
            opened = []
            for item in chunk:
                try:
                    opened.append((item, open_image(item.image, where=item.image)))
                except BadRecordError as err:
                    skipped.append((item.image, err.problem))
            records = [{"image": image, "prefix": item.prompt} for item, image in opened]
            texts = []
            if records:
                texts = generate(model, processor, records, settings, max_length=max_length, progress=False)
            for (item, image), text in zip(opened, texts, strict=True):
                write(_result(item, text, image, overlay_path))
            bar.update(len(chunk))
    finally:
        bar.close()
    return skipped


def _result(item: Input, text: str, image: Image.Image, overlay_path: Callable[[Input], Path | None]) -> dict:
    result = {"id": item.id, "image": item.image, "prompt": item.prompt, "output": text}
    task = prompt_task(item.prompt)
    if task is not None:
        result.update(PARSED_FIELDS[task](text, item.prompt, image))
    if task == DETECT.name and (path := overlay_path(item)) is not None:
        draw_detections(image, _parse_boxes(text, item.prompt, image).detections).save(path)
        result["overlay"] = str(path)
    if task == SEGMENT.name and (path := overlay_path(item)) is not None:
        draw_segmentation(image, text, item.prompt).save(path)
        result["overlay"] = str(path)
    return result


# ---- the command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pg_finetune.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", required=True, help="hub id, local directory, or 'tiny'")
    add("--adapter", help="PEFT adapter directory to put on --model")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", help="one image file")
    inputs.add_argument("--images", metavar="DIR", help="every image file in DIR (not subfolders), sorted")
    inputs.add_argument(
        "--records", metavar="FILE.jsonl", help='JSONL of {"image" (relative to it), "prompt"/"prefix", "id"}'
    )
    add("--prompt", help='prefix, e.g. "caption en" or "detect cat ; dog" (--records: for those without one)')
    add("--out", metavar="FILE.jsonl", help="one JSON line per input (--images/--records: else on stdout)")
    add("--batch-size", type=int, default=16, help="images per generate call (default: %(default)s)")
    add("--max-new-tokens", type=int, default=64, help="generation budget, >= 1 (default: %(default)s)")
    add("--max-length", type=max_length_arg, metavar="N",
        help="prompt budget in text tokens (<bos> + prompt + '\\n'; a longer prompt is cut). Precedence: "
        "this flag > data.max_length of the training recipe.yaml in --adapter, else in a local --model "
        "directory > 512")  # fmt: skip
    add("--num-beams", type=int, default=1, help="beam count; 1 = greedy (default: %(default)s)")
    add("--do-sample", action="store_true", help="sample instead of greedy decoding (default: off)")
    add("--temperature", type=float, default=1.0, help="with --do-sample, > 0 (default: %(default)s)")
    add("--top-p", type=float, default=1.0, help="with --do-sample, in (0, 1]; 1: off (default: %(default)s)")
    add("--top-k", type=int, default=50, help="with --do-sample, >= 0; 0: off (default: %(default)s)")
    add("--repetition-penalty", type=float, default=1.0,
        help="> 0; above 1 discourages repeating tokens, 1: off (default: %(default)s)")  # fmt: skip
    add("--seed", type=int, default=0, help="seed for sampling (default: %(default)s)")
    add("--constrained", "--constrained-detection", dest="constrained", action="store_true",
        help="for detect prompts: only let the model write `<loc>x4 label ; ...` with the prompt's labels; "
        "for segment prompts: `<loc>x4 <seg>x16`, a non-empty box",
    )
    add("--save-overlay", metavar="FILE.png",
        help="with --image, detect / segment prompts: the image with boxes / the mask drawn")  # fmt: skip
    add("--overlays", metavar="DIR",
        help="detect / segment prompts: write each image with its boxes / mask as DIR/<id>.png")  # fmt: skip
    add("--mask-codec", metavar="FILE.npz",
        help="segment prompts: the mask codec the model was trained with (default: $PG_FINETUNE_MASK_CODEC, "
        "else vae-oid.npz or the tiny offline codec in the cache dir)")  # fmt: skip
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
        help="weights dtype (default: %(default)s)")  # fmt: skip
    add("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    add("--json", action="store_true", help="with --image: print one JSON object instead of text")
    add("--quiet", action="store_true", help="print only the outputs (no progress bar, no notes on stderr)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every usage error, before a model is loaded (argparse's exit 2)."""
    if args.prompt is None and not args.records:
        parser.error("--prompt is required with --image and --images")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty: give the task prefix, e.g. 'caption en' or 'detect cat ; dog'")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_beams < 1:
        parser.error(f"--num-beams must be at least 1, got {args.num_beams}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be > 0 and --top-p in (0, 1]")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if args.repetition_penalty <= 0:
        parser.error(f"--repetition-penalty must be > 0 (1: off), got {args.repetition_penalty}")
    if args.mask_codec and not Path(args.mask_codec).is_file():
        parser.error(f"--mask-codec: no such file: {args.mask_codec}")
    if args.save_overlay and not args.image:
        parser.error("--save-overlay is for --image; use --overlays DIR with --images or --records")
    if args.save_overlay and not Path(args.save_overlay).resolve().parent.is_dir():
        parser.error(f"--save-overlay: folder {Path(args.save_overlay).parent} does not exist")
    if args.images and not Path(args.images).is_dir():
        parser.error(f"--images: {args.images} is not a folder")
    if args.records and not Path(args.records).is_file():
        parser.error(f"--records: no such file: {args.records}")


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """The model and processor; with --quiet, without transformers' weight-loading bar."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        return load_for_inference(args.model, args.adapter, dtype=args.dtype, cpu=args.cpu)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _list_problems(what: str, problems: list[tuple[str, str]], total: int) -> None:
    print(f"skipped {len(problems)} of {total} {what}:", file=sys.stderr)
    for where, problem in problems[:20]:
        print(f"  {where}: {problem}", file=sys.stderr)
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    # ---- inputs: checked before the model is loaded
    bad_lines: list[tuple[str, str]] = []
    if args.image:
        try:
            open_image(args.image, where=args.image)
        except BadRecordError as err:  # the dataset hint (skip_bad_records) means nothing here
            print(f"error: --image {err.problem}", file=sys.stderr)
            return 2
        inputs = [Input(id=Path(args.image).name, image=args.image, prompt=args.prompt)]
    elif args.images:
        inputs = folder_inputs(Path(args.images), args.prompt)
        if not inputs:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            print(f"error: --images: no image files ({kinds}) in {args.images}", file=sys.stderr)
            return 2
    else:
        inputs, bad_lines = records_inputs(Path(args.records), args.prompt)
        if bad_lines:
            _list_problems("record lines", bad_lines, len(inputs) + len(bad_lines))
        if not inputs:
            print(f"error: --records: no usable record in {args.records}", file=sys.stderr)
            return 2
    overlay_path: Callable[[Input], Path | None] = _no_overlay
    if args.save_overlay:
        overlay_path = _one_overlay(Path(args.save_overlay))
    elif args.overlays:
        try:
            Path(args.overlays).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = err.strerror or err
            print(f"error: --overlays {args.overlays}: cannot create the folder ({problem})", file=sys.stderr)
            return 2
        overlay_path = OverlayNames(Path(args.overlays))
    out: TextIO | None = None
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            out = open(args.out, "w", encoding="utf-8")  # closed after generation
        except OSError as err:
            print(f"error: --out {args.out}: cannot write ({err.strerror or err})", file=sys.stderr)
            return 2

    _MASK_CODEC["path"] = Path(args.mask_codec) if args.mask_codec else None
    if any(prompt_task(item.prompt) == SEGMENT.name for item in inputs):
        from pg_finetune.tasks.segment.scoring import default_codec_path, load_codec

        try:  # a segment output is decoded by the mask codec: fail before the model loads
            load_codec(_MASK_CODEC["path"] or default_codec_path())
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    # ---- model and generation
    # The prompt budget the model was trained with, as training-time eval used it, not a fixed 512.
    max_length, max_length_source = resolve_max_length(args.max_length, args.model, args.adapter)
    try:
        model, processor = _load(args)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"max_length {max_length} text tokens ({max_length_source})", file=sys.stderr)
    torch.manual_seed(args.seed)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, batch_size=args.batch_size,
        constrain_detection=args.constrained,
    )  # fmt: skip
    results: list[dict] = []

    def write(result: dict) -> None:
        line = json.dumps(result)
        if out is not None:
            out.write(line + "\n")
            out.flush()  # an interrupted run keeps what it has done
        elif not args.image:
            print(line, flush=True)
        results.append(result)

    try:
        skipped = predict_inputs(
            model, processor, inputs, settings, max_length=max_length, write=write,
            overlay_path=overlay_path, progress=not (args.quiet or args.image),
        )  # fmt: skip
    finally:
        if out is not None:
            out.close()

    if args.image:
        if not results:  # readable when checked, gone or changed since
            print(f"error: --image {skipped[0][1]}", file=sys.stderr)
            return 2
        return _print_one(results[0], args, max_length, max_length_source)
    if skipped:
        _list_problems("images (unreadable)", skipped, len(inputs))
    if not args.quiet:
        where = f" in {args.out}" if args.out else ""
        skipped_count = len(skipped) + len(bad_lines)
        print(f"{len(results)} outputs{where}; {skipped_count} inputs skipped", file=sys.stderr)
    return 0 if results else 2


def _print_one(result: dict, args: argparse.Namespace, max_length: int, max_length_source: str) -> int:
    """--image: the output as text (with the parsed boxes / count), or one JSON object with --json."""
    if args.json:
        print(json.dumps({**result, "max_length": max_length, "max_length_source": max_length_source}))
        return 0
    print(result["output"])
    for det in result.get("detections", []):
        print(f"  {det['label']}: {det['box_xyxy']}")
    if result.get("malformed"):
        print(f"  ({result['malformed']} malformed segments ignored)")
    if "count" in result:
        print(f"  count: {result['count']}")
    if "segmentation" in result:
        seg = result["segmentation"]
        print(f"  mask: {seg['area']} px in box {seg['box_xyxy']}" if seg else f"  no mask: {result['problem']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
