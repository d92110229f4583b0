"""Convert TextVQA, DocVQA, ChartQA, AI2D or ScienceQA, as their authors release them, to PaliGemma JSONL.

    python data_prep/create_vqa_dataset.py --format textvqa --root TEXTVQA_DIR --out data/textvqa
    python data_prep/create_vqa_dataset.py --format docvqa --root DOCVQA_DIR --out data/docvqa
    python data_prep/create_vqa_dataset.py --format chartqa --root "ChartQA Dataset" --out data/chartqa
    python data_prep/create_vqa_dataset.py --format ai2d --root AI2D_DIR --out data/ai2d
    python data_prep/create_vqa_dataset.py --format scienceqa --root SCIENCEQA_DIR --out data/scienceqa
    pg-make-vqa-dataset ...                              # the same program, installed

Writes `OUT/{split}.jsonl` (one line per question) and `OUT/{split}_summary.json`, the records the
recipes in recipes/big_vision/ train on and `eval.run` scores. Splits keep their release names
except "val", written `validation` (the recipes' eval_split). `image` is relative to the JSONL file
(the original file, via os.path.relpath, or a copy under `OUT/images/` with --copy-images); images
big_vision changes before training (AI2D's letter labels, TextVQA's rotations) are written as new
files under `OUT/images/`. Prompts and targets are those of big_vision's PaliGemma transfer configs
(`big_vision/configs/proj/paligemma/transfers/{textvqa,docvqa,chartqa,ai2d,science_qa}.py`) over
the TFDS builders that read these same files (`big_vision/datasets/<name>/<name>.py`).

Inputs (--root) and output lines:

- textvqa (textvqa.org, v0.5.1): `TextVQA_0.5.1_{train,val,test}.json` = {"data": [{"question_id",
  "question", "image_id", "answers": [10 strings] (absent in test)}, ...]}, images
  `train_images/{image_id}.jpg` (train and val) and `test_images/{image_id}.jpg`. Some OpenImages
  photos are stored rotated: when `train_images/rotation.csv` / `test_images/rotation.csv` are
  there (OpenImages' `*-with-rotation.csv`, its `ImageID` and `Rotation` columns, as big_vision's
  builder expects them), a rotated image is turned back (counter-clockwise by Rotation, as
  `tf.image.rot90`) and written as JPEG quality 100 under OUT/images/ ("rotated"); without them
  images are used as stored.
    {"image": ..., "question": "what is the brand?", "suffix": "nokia", "answers": [10 answers],
     "id": 34602, "image_id": "003a8ae2ef43b901"}
  No prefix: the recipe's task.prefix "answer en {question}" (big_vision's) fills it; score with
  `eval.run --benchmark vqav2 --model RUN --data OUT --split validation` (same prompt). The
  suffix is the most common answer; a tie goes to the one given first in `answers` (a fixed rule,
  without the bias an alphabetical one would add; big_vision draws one answer per epoch instead).
- docvqa (docvqa.org / rrc.cvc.uab.es, Task 1): `{split}_v1.0*.json` (`_withQT` preferred) in
  --root or `--root/{split}/`, = {"data": [{"questionId", "question", "image": "documents/x.png",
  "docId", "answers": [...] (absent in test)}, ...]}; `image` relative to the JSON's folder (or to
  `--root/{split}/`, big_vision's layout).
    {"image": ..., "prefix": "What is the date?", "question": "What is the date?", "suffix": "1/8/93",
     "answers": ["1/8/93", "January 8, 1993"], "id": 49153, "doc_id": 14465}
  prefix: the bare question (big_vision's `copy(inkey="question", outkey="prefix")`), so
  `eval.run --benchmark docvqa` scores with the prompt trained on; suffix the first answer.
- chartqa (github.com/vis-nlp/ChartQA): `{train,val,test}/{split}_human.json` and
  `{split}_augmented.json` = [{"imgname", "query", "label"}, ...], images `{split}/png/{imgname}`.
    {"image": ..., "prefix": "Which year ...?", "question": "Which year ...?", "suffix": "2014",
     "answers": ["2014"], "subset": "human", "id": "test_human-0"}
  Each split is written whole (`{split}.jsonl`: human then augmented; the recipe trains on the
  union) and by subset (`{split}_human.jsonl`, `{split}_augmented.jsonl`). The published number is
  the mean of the two test subsets: run `eval.run --benchmark chartqa --model RUN --data OUT
  --split test_human`, again with `--split test_augmented`, and average the two relaxed accuracies.
- ai2d (allenai.org/data/diagrams): `ai2d/questions/{imageName}.json` = {"imageName", "questions":
  {question text: {"answerTexts": [...], "correctAnswer": index, "abcLabel": bool, "questionId"}}},
  images `ai2d/images/{imageName}`, text boxes `ai2d/annotations/{imageName}.json` (--root may be the
  folder holding `ai2d/` or `ai2d/` itself). Test images are those listed in ai2d_test_ids.csv (one
  image id per line; --test-ids, default `--root/ai2d_test_ids.csv` when present); the others are
  train. Without the list every question goes to --split.
    {"image": ..., "prefix": "answer en  which is the sun? choose from: A \\t B \\t C \\t D",
     "suffix": "C", "question": "which is the sun?", "choices": ["A", "B", "C", "D"],
     "abc_label": true, "id": "1005.png-0"}
  big_vision's ai2d.py: PREFIX 'answer en ' + ' ' + question + ' choose from: ' + the options joined
  by ' \\t ' (hence the double space); suffix the correct option's text. As big_vision's builder, an
  abcLabel question's image has each text box painted white with its replacementText (a letter)
  drawn on it: written under OUT/images/ai2d-abc/ ("abc_images"), in the --font big_vision used
  (DMSans-Regular.ttf) or, without it, PIL's default font.
- scienceqa (scienceqa.github.io): `problems.json` = {pid: {"question", "choices", "answer" (index),
  "hint", "image" ("image.png" or null), "split", ...}}, images `IMAGES/{split}/{pid}/{image}`
  (--images, default `--root/images` when present, else --root). The split is the problem's
  `split` field (as big_vision's builder; pid_splits.json lists the same). Only problems with an
  image are written (the published number is on that subset; the others count as "no_image").
    {"image": ..., "prefix": "Question: Which is a mammal?\\nContext: N/A\\nOptions: (A) frog, (B) cat\\n
     Answer:", "suffix": "The answer is B.", "question": ..., "choices": ["frog", "cat"], "id": "12"}
  (the "\\n" are newlines). big_vision's QCM -> A format (science_qa.py) over its builder's fields:
  an empty hint is "N/A"; options "(A) x, (B) y". The choices are written in their given order:
  big_vision's `sci_qa_choices_shuffle` shuffles them anew every time an example is read in
  training (and its eval keeps the given order, as here), an augmentation a static file cannot do.

Rules, each counted in the summary: a question whose image file is missing is skipped and listed
("missing_images"); one PIL cannot open is skipped and listed ("unreadable_images"); a test
question without answers is written without suffix and answers ("unlabelled"). Errors in the input
(unreadable JSON, a missing field, an answer index out of range, an answer that is not text) stop
the program before anything is written, with the file and the record (questionId, question_id,
index, pid, question text). Exit codes: 0 written; 2 bad usage or input, or nothing to write.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

# One error type, JSON reader and image check for every converter: the detection one's.
from pg_finetune.prep.od_dataset import FileHeader, InputError, _load_json, read_header, skipped_image_lines

FORMATS = ("textvqa", "docvqa", "chartqa", "ai2d", "scienceqa")
SPLIT_NAMES = {"val": "validation"}  # the release's "val" is the recipes' eval_split
COUNTERS = ("missing_image", "unreadable_image", "unlabelled", "no_image", "rotated", "abc_images")
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# big_vision configs/proj/paligemma/transfers/ai2d.py
AI2D_PREFIX, AI2D_PROMPT, AI2D_SEP = "answer en ", "choose from:", " \t "
# big_vision configs/proj/paligemma/transfers/science_qa.py, config_prompt_format('QCM', 'A')
SCIQA_PREFIX = "Question: {question}\nContext: {hint}\nOptions: {indexed_choices}\nAnswer:"
SCIQA_SUFFIX = "The answer is {indexed_answer}."


@dataclass
class Item:
    """One question to write: its split, its image file, and the record's other fields."""

    split: str
    image: Path
    record: dict
    subset: str | None = None  # ChartQA: also written to {split}_{subset}.jsonl
    # how big_vision changes the image before training: (kind, argument), written once per file
    derived: tuple[str, Any] | None = None


@dataclass
class Options:
    out: Path
    copy_images: bool = False
    images_root: Path | None = None  # where copied images' relative paths start
    font: Path | None = None
    quiet: bool = False
    counts: Counter = field(default_factory=Counter)


def _split_name(split: str) -> str:
    return SPLIT_NAMES.get(split, split)


def _field(obj: Any, key: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """obj[key], else InputError naming `where`; with `kind`, also refused when of another type."""
    if not isinstance(obj, dict) or key not in obj:
        raise InputError(f"{where}: missing required field {key!r}")
    value = obj[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):  # no field here is a bool
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InputError(f"{where}: {key!r} must be {names}, got {value!r}")
    return value


def _strings(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: {key!r} must be a list of strings, got {value!r}")
    return value


def _index(value: Any, choices: list[str], key: str, where: str) -> int:
    """An answer index into `choices` (an int, or digits as AI2D sometimes writes it)."""
    try:
        index = int(value) if not isinstance(value, bool | float) else None
    except (TypeError, ValueError):
        index = None
    if index is None:
        raise InputError(f"{where}: {key!r} must be an integer index, got {value!r}")
    if not 0 <= index < len(choices):
        raise InputError(f"{where}: {key!r} is {index}, out of range for {len(choices)} choices {choices!r}")
    return index


def _data_list(path: Path) -> list:
    """The `data` list of a TextVQA or DocVQA JSON."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise InputError(f"{path}: expected a JSON object with a 'data' list of questions")
    return data["data"]


# ------------------------------------------------------------------------------------------ readers
def most_common_answer(answers: list[str]) -> str:
    """The answer given most often; a tie goes to the one given first (Counter keeps first-seen order,
    and most_common's sort is stable)."""
    return Counter(answers).most_common(1)[0][0]


def _rotations(csv_path: Path) -> dict[str, int]:
    """OpenImages ImageID -> Rotation in degrees (blank: 0), as big_vision's textvqa builder reads it."""
    if not csv_path.is_file():
        return {}
    rotations = {}
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ImageID", "Rotation"} <= set(reader.fieldnames):
            raise InputError(f"{csv_path}: expected OpenImages columns 'ImageID' and 'Rotation'")
        for number, row in enumerate(reader, start=2):
            text = (row["Rotation"] or "").strip()
            try:
                degrees = int(float(text)) if text and text.lower() != "nan" else 0
            except ValueError:
                raise InputError(f"{csv_path}:{number}: Rotation {text!r} is not a number") from None
            if degrees % 90:
                raise InputError(f"{csv_path}:{number}: Rotation {degrees} is not a multiple of 90")
            rotations[row["ImageID"]] = degrees
    return rotations


def read_textvqa(root: Path, args: argparse.Namespace) -> list[Item]:
    items = []
    for split, image_dir in (("train", "train_images"), ("val", "train_images"), ("test", "test_images")):
        path = root / f"TextVQA_0.5.1_{split}.json"
        if not path.is_file():
            continue
        rotations = _rotations(root / image_dir / "rotation.csv")
        for i, q in enumerate(_data_list(path)):
            qid = q.get("question_id", "?") if isinstance(q, dict) else "?"
            where = f"{path}: data[{i}] (question_id {qid})"
            question = _field(q, "question", where, str)
            image_id = str(_field(q, "image_id", where, (str, int)))
            record = {"question": question}
            if "answers" in q:
                answers = _strings(q["answers"], "answers", where)
                if not answers:
                    raise InputError(f"{where}: 'answers' is empty")
                record.update(suffix=most_common_answer(answers), answers=answers)
            record.update(id=_field(q, "question_id", where, (int, str)), image_id=image_id)
            turns = rotations.get(image_id, 0) // 90 % 4
            items.append(Item(_split_name(split), root / image_dir / f"{image_id}.jpg", record,
                              derived=("rotate", turns) if turns else None))  # fmt: skip
    return items


def _docvqa_files(root: Path, split: str) -> Path | None:
    for folder in (root, root / split):
        found = sorted(folder.glob(f"{split}_v1.0*.json"), key=lambda p: ("_withQT" not in p.name, p.name))
        if found:
            return found[0]
    return None


def read_docvqa(root: Path, args: argparse.Namespace) -> list[Item]:
    items = []
    for split in ("train", "val", "test"):
        path = _docvqa_files(root, split)
        if path is None:
            continue
        for i, q in enumerate(_data_list(path)):
            qid = q.get("questionId", "?") if isinstance(q, dict) else "?"
            where = f"{path}: data[{i}] (questionId {qid})"
            question = _field(q, "question", where, str)
            image_name = _field(q, "image", where, str)
            image = path.parent / image_name
            if not image.exists() and (root / split / image_name).exists():  # big_vision's layout
                image = root / split / image_name
            record = {"prefix": question, "question": question}  # big_vision: copy question -> prefix
            if "answers" in q:
                answers = _strings(q["answers"], "answers", where)
                if not answers:
                    raise InputError(f"{where}: 'answers' is empty")
                record.update(suffix=answers[0], answers=answers)
            record["id"] = _field(q, "questionId", where, (int, str))
            if "docId" in q:
                record["doc_id"] = q["docId"]
            items.append(Item(_split_name(split), image, record))
    return items


def read_chartqa(root: Path, args: argparse.Namespace) -> list[Item]:
    from pg_finetune.data.records import suffix_text

    items = []
    for split in ("train", "val", "test"):
        for subset in ("human", "augmented"):
            path = root / split / f"{split}_{subset}.json"
            if not path.is_file():
                continue
            data = _load_json(path)
            if not isinstance(data, list):
                raise InputError(f"{path}: expected a JSON list of {{'imgname', 'query', 'label'}}")
            for i, q in enumerate(data):
                where = f"{path}: [{i}]"
                question = _field(q, "query", where, str)
                label = _field(q, "label", where, (str, int, float))
                try:
                    answer = suffix_text(label)  # a number label becomes its text, as training reads it
                except ValueError as err:
                    raise InputError(f"{where}: 'label' {label!r}: {err}") from None
                record = {"prefix": question, "question": question, "suffix": answer, "answers": [answer],
                          "subset": subset, "id": f"{split}_{subset}-{i}"}  # fmt: skip
                image = root / split / "png" / _field(q, "imgname", where, str)
                items.append(Item(_split_name(split), image, record, subset=subset))
    return items


def _ai2d_dirs(root: Path) -> Path:
    for folder in (root, root / "ai2d"):
        if (folder / "questions").is_dir():
            return folder
    raise InputError(f"{root}: no ai2d/questions/ folder here (give --root the folder holding ai2d/, or ai2d/)")


def read_test_ids(path: Path) -> set[str]:
    """Image ids, one per line (a trailing ".png" or CSV column after a comma ignored)."""
    ids = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        value = line.split(",")[0].strip()
        if value:
            ids.add(value.split(".")[0])
    return ids


def read_ai2d(root: Path, args: argparse.Namespace) -> list[Item]:
    ai2d = _ai2d_dirs(root)
    test_ids_path = args.test_ids
    if test_ids_path is None:
        test_ids_path = next((p for p in (root / "ai2d_test_ids.csv", ai2d.parent / "ai2d_test_ids.csv")
                              if p.is_file()), None)  # fmt: skip
    test_ids = read_test_ids(test_ids_path) if test_ids_path is not None else None
    items = []
    for path in sorted((ai2d / "questions").glob("*.json"), key=_natural):
        image_id = path.name.split(".")[0]  # "1005.png.json" -> "1005", as big_vision's builder
        split = args.split if test_ids is None else ("test" if image_id in test_ids else "train")
        data = _load_json(path)
        image_name = _field(data, "imageName", str(path), str)
        questions = _field(data, "questions", str(path), dict)
        text_boxes = None  # read once per diagram, before anything is written
        for question, q in questions.items():
            where = f"{path}: question {question!r}"
            if isinstance(q, dict) and "questionId" in q:
                where = f"{path}: questionId {q['questionId']} ({question!r})"
            choices = _strings(_field(q, "answerTexts", where), "answerTexts", where)
            answer = choices[_index(_field(q, "correctAnswer", where), choices, "correctAnswer", where)]
            abc_label = bool(_field(q, "abcLabel", where))
            record = {
                "prefix": f"{AI2D_PREFIX} {question} {AI2D_PROMPT} {AI2D_SEP.join(choices)}",
                "suffix": answer,
                "question": question,
                "choices": choices,
                "abc_label": abc_label,
                "id": _field(q, "questionId", where, (str, int)),
            }
            if abc_label and text_boxes is None:
                text_boxes = _ai2d_text_boxes(ai2d / "annotations" / path.name)
            derived = ("ai2d_abc", text_boxes) if abc_label else None
            items.append(Item(split, ai2d / "images" / image_name, record, derived=derived))
    return items


def _natural(path: Path) -> tuple:
    stem = path.name.split(".")[0]
    return (0, int(stem), path.name) if stem.isdigit() else (1, 0, path.name)


def scienceqa_prompt(question: str, hint: str, choices: list[str], answer: int) -> tuple[str, str]:
    """(prefix, suffix) as big_vision writes them: its builder's `indexed_choices` "(A) x, (B) y" and
    `indexed_answer` letter, an empty hint written "N/A", into the QCM -> A format."""
    indexed_choices = ", ".join(f"({ALPHABET[i]}) {c}" for i, c in enumerate(choices))
    prefix = SCIQA_PREFIX.format(question=question, hint=hint or "N/A", indexed_choices=indexed_choices)
    return prefix, SCIQA_SUFFIX.format(indexed_answer=ALPHABET[answer])


def read_scienceqa(root: Path, args: argparse.Namespace) -> list[Item]:
    path, folder = (root / "problems.json", root) if root.is_dir() else (root, root.parent)
    images = args.images or (folder / "images" if (folder / "images").is_dir() else folder)
    problems = _load_json(path)
    if not isinstance(problems, dict):
        raise InputError(f"{path}: expected a JSON object {{pid: problem}}")
    items = []
    for pid, p in problems.items():
        where = f"{path}: pid {pid}"
        split = _field(p, "split", where, str)
        image_name = _field(p, "image", where)
        if not image_name:
            args.no_image[_split_name(split)] += 1
            continue
        question = _field(p, "question", where, str)
        choices = _strings(_field(p, "choices", where), "choices", where)
        if len(choices) > len(ALPHABET):
            raise InputError(f"{where}: {len(choices)} choices; at most {len(ALPHABET)} can be lettered")
        answer = _index(_field(p, "answer", where), choices, "answer", where)
        hint = p.get("hint") or ""
        if not isinstance(hint, str):
            raise InputError(f"{where}: 'hint' must be a string, got {hint!r}")
        prefix, suffix = scienceqa_prompt(question, hint, choices, answer)
        record = {"prefix": prefix, "suffix": suffix, "question": question, "choices": choices, "id": str(pid)}
        items.append(Item(_split_name(split), images / split / str(pid) / str(image_name), record))
    return items


READERS: dict[str, Callable[[Path, argparse.Namespace], list[Item]]] = {
    "textvqa": read_textvqa,
    "docvqa": read_docvqa,
    "chartqa": read_chartqa,
    "ai2d": read_ai2d,
    "scienceqa": read_scienceqa,
}


# ------------------------------------------------------------------------------------------ images
def _font(path: Path | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size=size) if path else ImageFont.load_default(size)


def draw_abc_labels(image: Image.Image, text_boxes: dict, font_path: Path | None) -> Image.Image:
    """AI2D's letter labels, as big_vision's builder draws them (`datasets/ai2d/ai2d.py::_draw_text`):
    each text box painted white, its replacementText drawn at its top edge, centred across, in the
    largest size from 100 down whose box fits (size 1 when none does)."""
    draw = ImageDraw.Draw(image)
    for box in text_boxes.values():
        (x0, y0), (x1, y1) = box["rectangle"]
        text = box["replacementText"]
        # corners sorted for the paint only: Pillow refuses an inverted rectangle
        draw.rectangle([(min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1))], fill="white")
        width, height = x1 - x0, y1 - y0
        size = 100
        font = _font(font_path, size)
        bbox = font.getbbox(text)
        while (bbox[2] > width or bbox[3] > height) and size > 0:
            font = _font(font_path, size)
            bbox = font.getbbox(text)
            size -= 1
        draw.text((x0 + (width - bbox[2]) // 2, y0), text, fill="black", font=font)
    return image


def _ai2d_text_boxes(path: Path) -> dict:
    data = _load_json(path) if path.is_file() else None
    if data is None:
        raise InputError(f"{path}: missing: an abcLabel question's image needs its text boxes (ai2d/annotations/)")
    boxes = _field(data, "text", str(path), dict)
    for text_id, box in boxes.items():
        where = f"{path}: text {text_id!r}"
        rect = _field(box, "rectangle", where)
        _field(box, "replacementText", where, str)
        if not (isinstance(rect, list) and len(rect) == 2 and all(
                isinstance(c, list) and len(c) == 2 and all(isinstance(v, int | float) for v in c) for c in rect)):
            raise InputError(f"{where}: 'rectangle' must be [[x0, y0], [x1, y1]], got {rect!r}")  # fmt: skip
    return boxes


def _derived_image(item: Item, options: Options) -> Path:
    """Write the image big_vision trains on when it differs from the file; its path under OUT."""
    kind, argument = item.derived
    if kind == "rotate":
        relative = Path("images") / "textvqa-rotated" / item.image.name
        if not (options.out / relative).exists():
            # tf.image.rot90(image, k) turns counter-clockwise, as PIL's ROTATE_90 (k = 1, 2, 3)
            transpose = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
            with Image.open(item.image) as image:
                turned = image.transpose(transpose[argument - 1])
            (options.out / relative).parent.mkdir(parents=True, exist_ok=True)
            turned.convert("RGB").save(options.out / relative, quality=100)  # big_vision: encode_jpeg(quality=100)
            options.counts["rotated"] += 1
        return relative
    relative = Path("images") / "ai2d-abc" / f"{Path(item.image.name).stem}.png"
    if not (options.out / relative).exists():
        with Image.open(item.image) as image:
            image.load()
            drawn = draw_abc_labels(image, argument, options.font)
        (options.out / relative).parent.mkdir(parents=True, exist_ok=True)
        drawn.save(options.out / relative, format="PNG")
        options.counts["abc_images"] += 1
    return relative


def _image_reference(item: Item, options: Options) -> str:
    if item.derived is not None:
        return _derived_image(item, options).as_posix()
    if options.copy_images:
        try:
            relative = Path("images") / item.image.resolve().relative_to(options.images_root)
        except ValueError:
            relative = Path("images") / item.image.name
        if not (options.out / relative).exists():
            (options.out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item.image, options.out / relative)
        return relative.as_posix()
    return Path(os.path.relpath(item.image.resolve(), options.out.resolve())).as_posix()


# ------------------------------------------------------------------------------------------ writing
def convert(items: list[Item], options: Options, no_image: Counter | None = None) -> list[dict]:
    """Write `{split}.jsonl` (+ ChartQA's `{split}_{subset}.jsonl`) and `{split}_summary.json` per split;
    `no_image`: questions the reader left out for want of an image, by split."""
    options.out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[Item]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    headers: dict[Path, FileHeader | str] = {}  # one look per file: TextVQA asks ~5 questions per image
    summaries = []
    for split, split_items in by_split.items():
        counts = Counter({name: 0 for name in COUNTERS})
        counts["no_image"] = (no_image or Counter())[split]
        missing: list[str] = []
        unreadable: list[str] = []
        lines: dict[str, list[str]] = {split: []}
        for item in tqdm(split_items, desc=split, unit="q", disable=options.quiet):
            if item.image not in headers:
                headers[item.image] = read_header(item.image)
            header = headers[item.image]
            if not isinstance(header, FileHeader):
                counts[header] += 1
                listed = missing if header == "missing_image" else unreadable
                if str(item.image) not in listed:
                    listed.append(str(item.image))
                continue
            before = Counter(options.counts)
            record = {"image": _image_reference(item, options), **item.record}
            counts.update(Counter(options.counts) - before)  # images written for this split
            counts["unlabelled"] += "suffix" not in record
            line = json.dumps(record) + "\n"
            lines[split].append(line)
            if item.subset is not None:
                lines.setdefault(f"{split}_{item.subset}", []).append(line)
        for name, written in lines.items():
            (options.out / f"{name}.jsonl").write_text("".join(written), encoding="utf-8")
        summary = {
            "split": split,
            "records_read": len(split_items),
            "records_written": len(lines[split]),
            **dict(counts),
            "subset_files": {name: len(v) for name, v in lines.items() if name != split},
            "missing_images": missing,
            "unreadable_images": unreadable,
        }
        (options.out / f"{split}_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        summaries.append(summary)
    return summaries


def format_summary(summary: dict, out: Path) -> str:
    lines = [
        f"{summary['split']}: {summary['records_written']}/{summary['records_read']} questions written "
        f"-> {out / (summary['split'] + '.jsonl')}"
    ]
    lines += [f"  {name}: {n} questions" for name, n in summary["subset_files"].items()]
    lines += [f"  {name}: {summary[name]}" for name in COUNTERS if summary[name]]
    return "\n".join(lines + skipped_image_lines(summary))


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-make-vqa-dataset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="which dataset's release format")
    parser.add_argument("--root", required=True, type=Path,
                        help="the dataset's downloaded folder (see Inputs above); scienceqa: also problems.json")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="output directory for {split}.jsonl")
    parser.add_argument("--splits", help="comma-separated output splits to write, e.g. train,validation "
                        "(default: every split found)")  # fmt: skip
    parser.add_argument("--split", default="train",
                        help="ai2d without ai2d_test_ids.csv: the one output split (default: train)")  # fmt: skip
    parser.add_argument("--test-ids", type=Path,
                        help="ai2d: ai2d_test_ids.csv (default: --root/ai2d_test_ids.csv when present)")  # fmt: skip
    parser.add_argument("--images", type=Path,
                        help="scienceqa: folder of {split}/{pid}/image.png (default: --root/images, else --root)")  # fmt: skip
    parser.add_argument("--font", type=Path,
                        help="ai2d: TrueType font for the letter labels; big_vision's is DMSans-Regular.ttf "
                        "(default: PIL's built-in font)")  # fmt: skip
    parser.add_argument("--copy-images", action="store_true",
                        help="copy images under OUT/images/ instead of pointing at them")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no printed summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("root", "test_ids", "images", "font"):
        path = getattr(args, flag)
        if path is not None and not path.exists():
            parser.error(f"--{flag.replace('_', '-')} {path} does not exist")
    for flag, fmt in (("test_ids", "ai2d"), ("font", "ai2d"), ("images", "scienceqa")):
        if getattr(args, flag) is not None and args.format != fmt:
            parser.error(f"--{flag.replace('_', '-')} is for --format {fmt} only, not {args.format}")
    if args.font is not None:
        try:
            ImageFont.truetype(str(args.font), size=10)
        except OSError as err:
            parser.error(f"--font {args.font}: not a font PIL can read ({err})")
    args.no_image = Counter()  # ScienceQA problems without an image, by split
    try:
        items = READERS[args.format](args.root, args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    found = sorted({item.split for item in items})
    if args.splits:
        wanted = [s.strip() for s in args.splits.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in found]
        if unknown:
            print(f"error: --splits {', '.join(unknown)}: not in the input (found: {', '.join(found) or 'none'})",
                  file=sys.stderr)  # fmt: skip
            return 2
        items = [item for item in items if item.split in wanted]
    if not items:
        print(f"error: no question found under {args.root} in the --format {args.format} layout "
              "(see --help for the files it reads); nothing to convert", file=sys.stderr)  # fmt: skip
        return 2
    if args.format == "ai2d" and args.font is None and any(item.derived for item in items) and not args.quiet:
        print("note: no --font: AI2D's letter labels are drawn in PIL's default font; big_vision drew them in "
              "DMSans-Regular.ttf", file=sys.stderr)  # fmt: skip
    options = Options(out=args.out, copy_images=args.copy_images, images_root=args.root.resolve(),
                      font=args.font, quiet=args.quiet)  # fmt: skip
    summaries = convert(items, options, args.no_image)
    if not args.quiet:
        for summary in summaries:
            print(format_summary(summary, args.out))
    if not any(summary["records_written"] for summary in summaries):
        for summary in summaries:  # an empty JSONL would train on nothing: leave none behind
            for path in args.out.glob(f"{summary['split']}*.jsonl"):
                path.unlink()
        print(f"error: no question was written (every image was missing or unreadable: see "
              f"{args.out}/*_summary.json)", file=sys.stderr)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
