"""Convert an object-detection dataset (COCO, YOLO, Pascal VOC, or a `datasets` dataset) to PaliGemma JSONL.

    python data_prep/create_od_dataset.py --format coco --annotations instances.json --images DIR --out OUT
    python data_prep/create_od_dataset.py --format yolo --images DIR --labels DIR --classes data.yaml --out OUT \
        --val-fraction 0.1 --seed 0
    python data_prep/create_od_dataset.py --format voc --annotations XML_DIR --images DIR --out OUT
    python data_prep/create_od_dataset.py --format hf --dataset PATH_OR_ID --split train --out OUT

Writes `OUT/{split}.jsonl` (one line per image) and `OUT/{split}_summary.json`:

    {"image": "../coco/img/1.jpg", "prefix": "detect cat ; dog",
     "suffix": "<loc0102><loc0205><loc0512><loc1023> cat ; <loc0000><loc0000><loc0204><loc0102> dog",
     "boxes": [[20.0, 5.0, 100.0, 25.0], [0.0, 0.0, 10.0, 10.0]], "labels": ["cat", "dog"],
     "width": 100, "height": 50, "id": 1}

`image` is relative to the JSONL file (the original file, via os.path.relpath, or a copy under
`OUT/images/` with --copy-images; hf images are always written as PNG under `OUT/images/`), so
`pg_finetune.data.load_records("OUT/train.jsonl")` reads the output as it is. `boxes` are pixel
x1, y1, x2, y2 in the frame the model sees, and `width`, `height` that frame's size.

That frame is the upright one: training opens images with PIL's `ImageOps.exif_transpose`, so a
photo tagged EXIF orientation 2-8 is flipped or rotated first (5-8 swap width and height). A copy
made by --copy-images keeps its tag; training applies it the same way. Which frame each input's
boxes are in:
- coco, voc: declare width and height per image. For a tagged file, a declared size equal to the
  stored (file) size means boxes in the stored frame, moved to the upright frame the way
  `exif_transpose` moves the pixels ("exif_transposed"); equal to the upright size (only
  distinguishable for 5-8), boxes already upright, kept. Orientations 2-4 keep the size, so there
  the stored frame is assumed, as COCO's own annotations and pycocotools (which ignore EXIF) have
  it; an undeclared size means the stored frame too. A size that fits neither frame is an
  InputError.
- yolo: normalized boxes are in the upright frame (ultralytics reads images with EXIF applied) and
  are scaled by the upright size, never moved.
- hf: boxes are in the frame of the image as `datasets` decodes it, which is upright (its `Image`
  feature applies `exif_transpose` since datasets 2.19); the PNG written from those pixels has no
  EXIF, so training sees the same frame.

Inputs:
- coco: `images[].file_name` relative to --images; `annotations[].bbox` is x, y, w, h in pixels;
  `iscrowd=1` annotations are dropped unless --keep-crowd.
- yolo: `LABELS/<name>.txt` beside `IMAGES/<name>.<ext>`; each line `class cx cy w h`, normalized
  to 0..1; class names from a text file (one per line) or a data.yaml `names` (list or {index: name}).
  Images without a label file have no objects.
- voc: one XML per image (`filename`, `size`, `object/name`, `object/bndbox`); coordinates are
  1-based pixel indices, xmin=1 being the first pixel: xmin and ymin lose 1 to become the near
  edges, xmax and ymax are already the far edges (as Detectron2's pascal_voc loader), so
  1, 1, W, H is the whole image.
- hf: a `save_to_disk` directory or a hub id; column `image` and `objects` = {"bbox": [[x, y, w, h],
  ...], "category": [int, ...]} (the COCO-style layout of e.g. `detection-datasets/coco`; pass
  --hf-bbox-format xyxy for x1, y1, x2, y2); class names from the `category` ClassLabel feature.

Rules, each counted in the summary: a box reaching outside the image is clipped to it ("clipped");
a box with zero or negative area after clipping, or thinner than one of the 1024 location bins
(both edges in one bin: a zero-size target), is skipped ("zero_area", not also "clipped");
unknown category ids ("unknown_category") and COCO crowd boxes ("crowd") are skipped; a class not
in --classes-keep (names after --class-map) is skipped ("not_kept"); --max-objects N sorts an
image's objects by area, largest first (a stable sort: ties keep annotation order), and keeps the
first N, in that order ("over_max_objects"). An image whose file is missing is skipped and listed
("missing_images"); one PIL cannot open (or whose EXIF it cannot read) is skipped and listed
("unreadable_images"). Sizes and EXIF orientations are read from the file headers, without decoding
pixels, before anything is written. For an untagged file whose annotation declares another size
the file wins ("size_mismatch"). Images left without objects are skipped ("no_objects"): training
needs a non-empty suffix. Errors in the input (bad JSON or XML, a missing field, a YOLO line with
the wrong number of fields, a declared size that fits neither frame of a tagged image) raise
InputError naming the file and the line, annotation id or image.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import struct
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from pg_finetune.loc import detect_prefix, encode_value, format_detections, label_problem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Every counter the summary reports, so a zero is visible rather than absent.
COUNTERS = (
    "clipped",
    "zero_area",
    "unknown_category",
    "crowd",
    "not_kept",
    "over_max_objects",
    "no_objects",
    "size_mismatch",
    "exif_transposed",  # images written whose boxes were moved from the stored to the upright frame
    "missing_image",
    "unreadable_image",
)
MAX_PRINTED_MISSING = 10
EXIF_ORIENTATION = 0x0112


class InputError(ValueError):
    """A problem in the input files; the message names the file and the line or annotation."""


@dataclass
class RawObject:
    """One annotated box: x1, y1, x2, y2 in pixels (or 0..1 when its image is `normalized`)."""

    box: tuple[float, float, float, float]
    label: str


@dataclass
class FileHeader:
    """What an image file's header says."""

    size: tuple[int, int]  # width, height as stored: the raw frame
    orientation: int = 1  # EXIF orientation, 1 when absent or not 1..8 (exif_transpose ignores those)

    @property
    def upright_size(self) -> tuple[int, int]:
        """The size after `exif_transpose`, which training applies: 5-8 swap the sides."""
        return (self.size[1], self.size[0]) if self.orientation >= 5 else self.size


@dataclass
class ImageEntry:
    """One input image and its objects, before clipping and filtering."""

    id: Any
    path: Path | None  # None for hf images, which carry `image`
    width: int | None = None  # as the annotation declares it; None when it does not
    height: int | None = None
    objects: list[RawObject] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # objects the reader already skipped, by reason
    normalized: bool = False  # YOLO: boxes in 0..1, scaled once the file's size is known
    image: Any = None  # a PIL image (hf)
    header: FileHeader | str | None = None  # the file's, read once by `file_header`; a str says why not


@dataclass
class Options:
    class_map: dict[str, str] = field(default_factory=dict)
    classes_keep: set[str] | None = None
    max_objects: int | None = None
    copy_images: bool = False
    images_dir: Path | None = None  # where copied images' relative paths start
    quiet: bool = False


# ------------------------------------------------------------------------------------------ readers
def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err


def _finite(values: Sequence[float], where: str, what: str) -> None:
    """InputError naming `where` when a coordinate is NaN or infinite (Python's json reads NaN and Infinity)."""
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{where}: {what} {list(values)!r} holds NaN or infinity; fix or delete this annotation")


def _require(obj: dict, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise InputError(f"{where}: missing required field {key!r}")
    return obj[key]


def read_coco(annotations: Path, images_dir: Path, keep_crowd: bool = False) -> list[ImageEntry]:
    """COCO instances JSON -> entries, in `images` order; boxes converted from x, y, w, h."""
    data = _load_json(annotations)
    if not isinstance(data, dict):
        raise InputError(f"{annotations}: expected a JSON object with 'images', 'annotations', 'categories'")
    names = {}
    for i, cat in enumerate(_require(data, "categories", str(annotations))):
        where = f"{annotations}: categories[{i}]"
        names[_require(cat, "id", where)] = str(_require(cat, "name", where))
    entries: dict[Any, ImageEntry] = {}
    for i, img in enumerate(_require(data, "images", str(annotations))):
        where = f"{annotations}: images[{i}] (id {img.get('id') if isinstance(img, dict) else '?'})"
        image_id = _require(img, "id", where)
        for key in ("width", "height"):
            if isinstance(img.get(key), float) and not math.isfinite(img[key]):
                raise InputError(f"{where}: {key} is {img[key]!r}, not a finite number; fix it or delete the key")
        entries[image_id] = ImageEntry(
            id=image_id,
            path=images_dir / _require(img, "file_name", where),
            width=img.get("width"),
            height=img.get("height"),
        )
    for i, ann in enumerate(data.get("annotations", [])):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        where = f"{annotations}: annotation id {ann_id}"
        image_id = _require(ann, "image_id", where)
        category_id = _require(ann, "category_id", where)
        bbox = _require(ann, "bbox", where)
        if image_id not in entries:
            raise InputError(f"{where}: image_id {image_id!r} is not in 'images'")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
            raise InputError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        _finite(bbox, where, "bbox")
        entry = entries[image_id]
        if category_id not in names:
            entry.dropped["unknown_category"] += 1
            continue
        if ann.get("iscrowd", 0) and not keep_crowd:
            entry.dropped["crowd"] += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        entry.objects.append(RawObject((x, y, x + w, y + h), names[category_id]))
    return list(entries.values())


def read_yolo_classes(path: Path) -> list[str]:
    """Class names from a text file (one per line) or a data.yaml with `names` (a list or {index: name})."""
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise InputError(f"{path}: invalid YAML: {err}") from err
        names = _require(data, "names", str(path))
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names, key=int)]
        if not isinstance(names, list):
            raise InputError(f"{path}: 'names' must be a list or a mapping of index -> name")
        return [str(n) for n in names]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_yolo(images_dir: Path, labels_dir: Path, classes: list[str]) -> list[ImageEntry]:
    """One entry per image and per label file without an image (a missing image), sorted by name."""
    images = {
        p.relative_to(images_dir).with_suffix("").as_posix(): p
        for p in images_dir.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
    }
    labels = {p.relative_to(labels_dir).with_suffix("").as_posix(): p for p in labels_dir.rglob("*.txt")}
    entries = []
    for stem in sorted(set(images) | set(labels)):
        # a label without an image: list it under the name the image would have had
        path = images.get(stem, images_dir / f"{stem}.*")
        entry = ImageEntry(id=stem, path=path, normalized=True)
        if stem in labels:
            _read_yolo_labels(labels[stem], classes, entry)
        entries.append(entry)
    return entries


def _read_yolo_labels(label_file: Path, classes: list[str], entry: ImageEntry) -> None:
    for number, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise InputError(
                f"{label_file}:{number}: expected 5 fields 'class cx cy w h', got {len(fields)}: {line!r}"
            )
        try:
            class_index = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError as err:
            raise InputError(f"{label_file}:{number}: not numbers: {line!r}") from err
        _finite((cx, cy, w, h), f"{label_file}:{number}", "box 'cx cy w h'")
        if not 0 <= class_index < len(classes):
            entry.dropped["unknown_category"] += 1
            continue
        entry.objects.append(
            RawObject((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), classes[class_index])
        )


def read_voc(annotations_dir: Path, images_dir: Path) -> list[ImageEntry]:
    """One entry per XML file in `annotations_dir`, sorted by name."""
    entries = []
    for xml_file in sorted(annotations_dir.glob("*.xml")):
        try:
            root = ET.parse(xml_file).getroot()
        except ET.ParseError as err:
            raise InputError(f"{xml_file}: invalid XML: {err}") from err
        filename = root.findtext("filename")
        if not filename:
            raise InputError(f"{xml_file}: missing required field 'filename'")
        size = root.find("size")
        width = _voc_number(size, "width", xml_file, "size") if size is not None else None
        height = _voc_number(size, "height", xml_file, "size") if size is not None else None
        entry = ImageEntry(
            id=xml_file.stem,
            path=images_dir / filename,
            width=int(width) if width else None,
            height=int(height) if height else None,
        )
        for i, obj in enumerate(root.findall("object")):
            where = f"object #{i}"
            name = obj.findtext("name")
            box = obj.find("bndbox")
            if not name:
                raise InputError(f"{xml_file}: {where}: missing required field 'name'")
            if box is None:
                raise InputError(f"{xml_file}: {where}: missing required field 'bndbox'")
            xmin, ymin, xmax, ymax = (
                _voc_number(box, tag, xml_file, where) for tag in ("xmin", "ymin", "xmax", "ymax")
            )
            # 1-based inclusive pixel indices -> 0-based edges: the first pixel, 1, starts at 0 and
            # the last one, W, ends at W
            entry.objects.append(RawObject((xmin - 1, ymin - 1, xmax, ymax), name.strip()))
        entries.append(entry)
    return entries


def _voc_number(parent: ET.Element, tag: str, xml_file: Path, where: str) -> float:
    text = parent.findtext(tag)
    if text is None:
        raise InputError(f"{xml_file}: {where}: missing required field {tag!r}")
    try:
        value = float(text)
    except ValueError as err:
        raise InputError(f"{xml_file}: {where}: {tag} is not a number: {text!r}") from err
    if not math.isfinite(value):  # float() reads "nan" and "inf"
        raise InputError(f"{xml_file}: {where}: {tag} is {text!r}, not a finite number; fix or delete it")
    return value


def read_hf(dataset: str, split: str, bbox_format: str = "xywh") -> list[ImageEntry]:
    """A `datasets` dataset with `image` and `objects` {"bbox", "category"} columns -> entries."""
    import datasets

    if Path(dataset).is_dir():
        ds = datasets.load_from_disk(dataset)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"{dataset}: no split {split!r}; splits: {', '.join(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(dataset, split=split)
    for column in ("image", "objects"):
        if column not in ds.column_names:
            raise InputError(f"{dataset} split {split}: no {column!r} column; columns: {ds.column_names}")
    names = _hf_class_names(ds.features["objects"])
    entries = []
    for index, row in enumerate(ds):
        where = f"{dataset} split {split} row {index}"
        objects = row["objects"]
        if isinstance(objects, dict):  # a dict of lists (Sequence of a dict feature)
            bboxes, categories = _require(objects, "bbox", where), _require(objects, "category", where)
        else:  # a list of dicts
            bboxes = [_require(o, "bbox", where) for o in objects]
            categories = [_require(o, "category", where) for o in objects]
        entry = ImageEntry(id=row.get("image_id", index), path=None, image=row["image"])
        for number, (bbox, category) in enumerate(zip(bboxes, categories, strict=True)):
            if len(bbox) != 4:
                raise InputError(f"{where}: bbox must be 4 numbers, got {bbox!r}")
            if names is not None and not 0 <= category < len(names):
                entry.dropped["unknown_category"] += 1
                continue
            a, b, c, d = (float(v) for v in bbox)
            _finite((a, b, c, d), f"{where} object #{number}", "bbox")
            box = (a, b, a + c, b + d) if bbox_format == "xywh" else (a, b, c, d)
            entry.objects.append(RawObject(box, names[category] if names is not None else str(category)))
        entries.append(entry)
    return entries


def _hf_class_names(objects_feature: Any) -> list[str] | None:
    """The names of the `category` ClassLabel, however the `objects` feature nests it (None if not a ClassLabel)."""
    import datasets

    def inner(feature: Any) -> Any:
        while hasattr(feature, "feature") and not isinstance(feature, datasets.ClassLabel):
            feature = feature.feature  # Sequence / List wrappers
        return feature

    objects_feature = inner(objects_feature)
    category = inner(objects_feature.get("category")) if isinstance(objects_feature, dict) else None
    return list(category.names) if isinstance(category, datasets.ClassLabel) else None


# ------------------------------------------------------------------------------------------ conversion
def clip_box(
    box: tuple[float, float, float, float], width: int, height: int
) -> tuple[tuple[float, float, float, float], bool]:
    """(box clipped to the image, whether clipping changed it)."""
    x1, y1, x2, y2 = box
    clipped = (
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    )
    return clipped, clipped != (x1, y1, x2, y2)


def split_entries(
    entries: list[ImageEntry], split: str, val_fraction: float, seed: int
) -> dict[str, list[ImageEntry]]:
    """`{split: entries}`, or with a val fraction `{split: rest, "val": round(n * fraction) images}`.

    The choice is a seeded shuffle of positions, so the same input and seed give the same split.
    """
    if not val_fraction:
        return {split: entries}
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    val = set(order[: round(len(entries) * val_fraction)])
    return {
        split: [e for i, e in enumerate(entries) if i not in val],
        "val": [e for i, e in enumerate(entries) if i in val],
    }


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_METADATA = (b"eXIf", b"iTXt", b"tEXt", b"zTXt")  # where PIL looks for EXIF and XMP orientation


def _png_metadata_after_pixels(path: Path) -> bool:
    """Whether a PNG has an EXIF or text chunk after its image data (chunk headers only, data skipped)."""
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return False
        seen_data = False
        while len(chunk := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", chunk)
            if kind == b"IEND":
                break
            if kind == b"IDAT":
                seen_data = True
            elif seen_data and kind in _PNG_METADATA:
                return True
            f.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return False


def _orientation(image: Image.Image, path: Path) -> int:
    if image.format == "PNG" and "exif" not in image.info and not _png_metadata_after_pixels(path):
        # PIL's PNG getexif() decodes all the pixels to reach chunks that may follow them (~150x
        # the header read); with none there, the base method reads what the header gave
        exif = Image.Image.getexif(image)
    else:
        exif = image.getexif()  # what exif_transpose reads: EXIF, else an XMP tiff:Orientation
    orientation = exif.get(EXIF_ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


def read_header(path: Path) -> FileHeader | str:
    """The file's size and EXIF orientation, without decoding pixels; or "missing_image" / "unreadable_image"."""
    if not path.is_file():
        return "missing_image"
    try:
        with Image.open(path) as image:
            return FileHeader(image.size, _orientation(image, path))
    except (OSError, ValueError, SyntaxError, EOFError):
        # a broken EXIF block fails here as in training's exif_transpose, so it counts as unreadable
        return "unreadable_image"


def file_header(entry: ImageEntry) -> FileHeader | str:
    """`read_header` of the entry's file, read once and kept on the entry."""
    if entry.header is None:
        entry.header = read_header(entry.path)
    return entry.header


def _declared_size(entry: ImageEntry) -> tuple[int, int] | None:
    if entry.width is None or entry.height is None:
        return None
    return (entry.width, entry.height)


def image_frame(entry: ImageEntry, header: FileHeader) -> tuple[int, int, int]:
    """(width, height, orientation): the upright frame boxes are written in, and the EXIF
    orientation whose transform takes the entry's boxes there (1: kept as they are).

    See the module docstring; raises InputError when a tagged image's declared size fits neither frame.
    """
    width, height = header.upright_size
    if header.orientation == 1 or entry.normalized:  # YOLO labels are upright already
        return width, height, 1
    declared = _declared_size(entry)
    if declared is None or declared == header.size:  # 2-4: stored and upright sizes are equal
        return width, height, header.orientation
    if declared == header.upright_size:
        return width, height, 1
    raise InputError(
        f"{entry.path}: EXIF orientation {header.orientation}, and the annotation declares "
        f"{declared[0]} x {declared[1]}, which is neither the stored frame {header.size[0]} x "
        f"{header.size[1]} nor the upright frame {width} x {height} (what training sees), so the frame "
        "of its boxes is unknown; fix the declared width and height"
    )


def upright_box(
    box: tuple[float, float, float, float], orientation: int, width: int, height: int
) -> tuple[float, float, float, float]:
    """A box in a file's stored frame (`width` x `height`) -> the same pixels after `exif_transpose`.

    Each corner maps like the pixels; an inverted box (x2 < x1) stays inverted, to be skipped later.
    """
    x1, y1, x2, y2 = box
    w, h = width, height
    return {
        1: (x1, y1, x2, y2),
        2: (w - x2, y1, w - x1, y2),  # FLIP_LEFT_RIGHT: (x, y) -> (w - x, y)
        3: (w - x2, h - y2, w - x1, h - y1),  # ROTATE_180: (x, y) -> (w - x, h - y)
        4: (x1, h - y2, x2, h - y1),  # FLIP_TOP_BOTTOM: (x, y) -> (x, h - y)
        5: (y1, x1, y2, x2),  # TRANSPOSE: (x, y) -> (y, x)
        6: (h - y2, x1, h - y1, x2),  # ROTATE_270, a quarter turn clockwise: (x, y) -> (h - y, x)
        7: (h - y2, w - x2, h - y1, w - x1),  # TRANSVERSE: (x, y) -> (h - y, w - x)
        8: (y1, w - x2, y2, w - x1),  # ROTATE_90, a quarter turn anticlockwise: (x, y) -> (y, w - x)
    }[orientation]


def check_frames(entries: list[ImageEntry], quiet: bool = False) -> list[str]:
    """Read every image file's header (kept for `convert`); one message per image `image_frame` refuses."""
    messages = []
    for entry in tqdm(entries, desc="image headers", disable=quiet):
        if entry.image is not None:
            continue
        header = file_header(entry)
        if isinstance(header, FileHeader):
            try:
                image_frame(entry, header)
            except InputError as err:
                messages.append(str(err))
    return messages


def _select_objects(
    entry: ImageEntry, width: int, height: int, orientation: int, options: Options, counts: Counter
) -> list[tuple[tuple[float, float, float, float], str]]:
    """The entry's boxes in the `width` x `height` upright frame, after `orientation`'s transform."""
    stored = (height, width) if orientation >= 5 else (width, height)
    kept = []
    for obj in entry.objects:
        label = options.class_map.get(obj.label, obj.label)
        if options.classes_keep is not None and label not in options.classes_keep:
            counts["not_kept"] += 1
            continue
        box = obj.box
        if entry.normalized:
            box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
        elif orientation != 1:
            box = upright_box(box, orientation, *stored)
        box, was_clipped = clip_box(box, width, height)
        if box[2] <= box[0] or box[3] <= box[1] or _thinner_than_a_bin(box, width, height):
            counts["zero_area"] += 1
            continue
        counts["clipped"] += was_clipped
        kept.append((box, label))
    if options.max_objects is not None and len(kept) > options.max_objects:
        kept.sort(key=lambda o: (o[0][2] - o[0][0]) * (o[0][3] - o[0][1]), reverse=True)  # stable
        counts["over_max_objects"] += len(kept) - options.max_objects
        kept = kept[: options.max_objects]
    return kept


def _thinner_than_a_bin(box: tuple[float, float, float, float], width: int, height: int) -> bool:
    """Whether both edges of a side fall in the same location bin: the target would be a zero-size box,
    which big_vision's evaluator and `pg_finetune.loc.parse_detections` refuse (and training would too)."""
    x1, y1, x2, y2 = box
    same_column = encode_value(x1, width) == encode_value(x2, width)
    return same_column or encode_value(y1, height) == encode_value(y2, height)


def _image_reference(entry: ImageEntry, out_dir: Path, split: str, index: int, options: Options) -> str:
    if entry.image is not None:  # hf: write the decoded image
        # as PNG without EXIF (PIL writes it only when given exif=), so training's exif_transpose
        # leaves these pixels, the frame of the boxes, as they are
        relative = Path("images") / f"{split}-{index:06d}.png"
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        entry.image.save(out_dir / relative)
        return relative.as_posix()
    if options.copy_images:
        try:
            relative = Path("images") / entry.path.relative_to(options.images_dir)
        except (ValueError, TypeError):
            relative = Path("images") / entry.path.name
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(entry.path, out_dir / relative)
        return relative.as_posix()
    return Path(os.path.relpath(entry.path.resolve(), out_dir.resolve())).as_posix()


def convert(entries: list[ImageEntry], out_dir: Path, split: str, options: Options) -> dict:
    """Write `out_dir/{split}.jsonl` and `out_dir/{split}_summary.json`; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter({name: 0 for name in COUNTERS})
    missing: list[str] = []
    unreadable: list[str] = []
    images_written = objects_written = 0
    with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as out:
        for index, entry in enumerate(tqdm(entries, desc=f"{split}", disable=options.quiet)):
            counts.update(entry.dropped)
            if entry.image is not None:
                (width, height), orientation = entry.image.size, 1
            else:
                header = file_header(entry)
                if not isinstance(header, FileHeader):
                    counts[header] += 1
                    (missing if header == "missing_image" else unreadable).append(str(entry.path))
                    continue
                width, height, orientation = image_frame(entry, header)
                declared = _declared_size(entry)
                if header.orientation == 1 and declared is not None and declared != header.size:
                    counts["size_mismatch"] += 1  # the file is what the model sees: trust it
            objects = _select_objects(entry, width, height, orientation, options, counts)
            if not objects:
                counts["no_objects"] += 1
                continue
            counts["exif_transposed"] += orientation != 1
            labels = [label for _, label in objects]
            record = {
                "image": _image_reference(entry, out_dir, split, index, options),
                "prefix": detect_prefix(labels),
                "suffix": format_detections(objects, width, height),
                "boxes": [list(box) for box, _ in objects],
                "labels": labels,
                "width": width,
                "height": height,
                "id": entry.id,
            }
            out.write(json.dumps(record) + "\n")
            images_written += 1
            objects_written += len(objects)
    summary = {
        "split": split,
        "images_read": len(entries),
        "images_written": images_written,
        "objects_written": objects_written,
        **dict(counts),
        "missing_images": missing,
        "unreadable_images": unreadable,
    }
    (out_dir / f"{split}_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def check_labels(entries: list[ImageEntry], options: Options) -> list[str]:
    """One message per class name (after --class-map, among --classes-keep) that cannot be a label."""
    bad: dict[str, list[Any]] = {}
    for entry in entries:
        for obj in entry.objects:
            label = options.class_map.get(obj.label, obj.label)
            if options.classes_keep is not None and label not in options.classes_keep:
                continue
            if label_problem(label):
                bad.setdefault(label, []).append(entry.id)
    messages = []
    for label, ids in bad.items():
        safe = " ".join(label.replace(";", " ").replace("<loc", "loc ").split()) or "object"
        messages.append(
            f"class name {label!r} ({len(ids)} objects, first in image id {ids[0]!r}) cannot be a PaliGemma "
            f"label: {label_problem(label)}. Rename it with --class-map '{label}={safe}' "
            "or leave it out with --classes-keep"
        )
    return messages


def format_summary(summary: dict) -> str:
    lines = [
        f"{summary['split']}: {summary['images_written']}/{summary['images_read']} images written, "
        f"{summary['objects_written']} objects"
    ]
    lines += [f"  {name}: {summary[name]}" for name in COUNTERS if summary[name]]
    return "\n".join(lines + skipped_image_lines(summary))


def skipped_image_lines(summary: dict) -> list[str]:
    """The summary's missing and unreadable image files, the first MAX_PRINTED_MISSING of each."""
    lines = []
    for key in ("missing_images", "unreadable_images"):
        paths = summary[key]
        if paths:
            more = f" (+{len(paths) - MAX_PRINTED_MISSING} more)" if len(paths) > MAX_PRINTED_MISSING else ""
            lines.append(f"  {key}{more}:")
            lines += [f"    {p}" for p in paths[:MAX_PRINTED_MISSING]]
    return lines


# ------------------------------------------------------------------------------------------ CLI
def parse_class_map(value: str | None) -> dict[str, str]:
    """`"old=new,a=b"` or the path of a JSON object `{"old": "new"}`."""
    if not value:
        return {}
    if value.endswith(".json") and Path(value).is_file():
        mapping = _load_json(Path(value))
        if not isinstance(mapping, dict):
            raise InputError(f"{value}: a class map must be a JSON object {{old: new}}")
        return {str(k): str(v) for k, v in mapping.items()}
    mapping = {}
    for pair in value.split(","):
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise InputError(f"--class-map: expected old=new pairs separated by commas, got {pair!r}")
        mapping[old.strip()] = new.strip()
    return mapping


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert COCO / YOLO / Pascal VOC / datasets detection data to PaliGemma JSONL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--format", required=True, choices=("coco", "yolo", "voc", "hf"))
    parser.add_argument("--out", required=True, type=Path, help="output directory for {split}.jsonl")
    parser.add_argument("--images", type=Path, help="image directory (coco, yolo, voc)")
    parser.add_argument("--annotations", type=Path, help="coco: instances JSON; voc: directory of XML files")
    parser.add_argument("--labels", type=Path, help="yolo: directory of .txt label files")
    parser.add_argument(
        "--classes", type=Path, help="yolo: classes.txt (one per line) or data.yaml with names"
    )
    parser.add_argument("--dataset", help="hf: save_to_disk directory or hub dataset id")
    parser.add_argument(
        "--hf-bbox-format", choices=("xywh", "xyxy"), default="xywh", help="hf: layout of objects.bbox"
    )
    parser.add_argument(
        "--split", default="train", help="output split name (hf: also the split read from the dataset)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.0, help="fraction of images written to val.jsonl instead"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction shuffle")
    parser.add_argument("--class-map", help="rename classes: old=new,... or a JSON file {old: new}")
    parser.add_argument("--classes-keep", help="comma-separated class names to keep (after --class-map)")
    parser.add_argument(
        "--max-objects", type=int, help="keep at most N objects per image: the largest by area (stable sort)"
    )
    parser.add_argument("--keep-crowd", action="store_true", help="coco: keep iscrowd=1 annotations")
    parser.add_argument(
        "--copy-images", action="store_true", help="copy images under OUT/images/ instead of pointing at them"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no printed summary")
    return parser


_REQUIRED = {
    "coco": ("annotations", "images"),
    "yolo": ("images", "labels", "classes"),
    "voc": ("annotations", "images"),
    "hf": ("dataset",),
}


def read_entries(args: argparse.Namespace) -> list[ImageEntry]:
    readers = {
        "coco": lambda: read_coco(args.annotations, args.images, keep_crowd=args.keep_crowd),
        "yolo": lambda: read_yolo(args.images, args.labels, read_yolo_classes(args.classes)),
        "voc": lambda: read_voc(args.annotations, args.images),
        "hf": lambda: read_hf(args.dataset, args.split, args.hf_bbox_format),
    }
    return readers[args.format]()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing_args = [
        f"--{name.replace('_', '-')}" for name in _REQUIRED[args.format] if getattr(args, name) is None
    ]
    if missing_args:
        parser.error(f"--format {args.format} needs {', '.join(missing_args)}")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.max_objects is not None and args.max_objects < 1:
        parser.error(f"--max-objects must be at least 1, got {args.max_objects}")
    for flag in ("images", "labels", "annotations"):
        path = getattr(args, flag)
        if path is not None and not path.exists():
            parser.error(f"--{flag} {path} does not exist")
    try:
        options = Options(
            class_map=parse_class_map(args.class_map),
            classes_keep={c.strip() for c in args.classes_keep.split(",") if c.strip()}
            if args.classes_keep
            else None,
            max_objects=args.max_objects,
            copy_images=args.copy_images,
            images_dir=args.images,
            quiet=args.quiet,
        )
        entries = read_entries(args)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bad_labels = check_labels(entries, options)
    if bad_labels:  # checked before anything is written: no half-converted output
        print("error: " + "\nerror: ".join(bad_labels), file=sys.stderr)
        return 2
    bad_frames = check_frames(entries, quiet=args.quiet)
    if bad_frames:  # also before writing
        more = len(bad_frames) - MAX_PRINTED_MISSING
        print("error: " + "\nerror: ".join(bad_frames[:MAX_PRINTED_MISSING]), file=sys.stderr)
        if more > 0:
            print(f"error: ... and {more} more images like these", file=sys.stderr)
        return 2
    if not entries:
        print(f"error: no images found in the --format {args.format} input; nothing to convert", file=sys.stderr)
        return 2
    summaries = []
    for split, split_entries_ in split_entries(entries, args.split, args.val_fraction, args.seed).items():
        summaries.append(convert(split_entries_, args.out, split, options))
        if not args.quiet:
            print(format_summary(summaries[-1]))
    if not any(summary["images_written"] for summary in summaries):
        # An empty JSONL would train on nothing (or fail far later): say why here, and leave none behind.
        for summary in summaries:
            (args.out / f"{summary['split']}.jsonl").unlink(missing_ok=True)
        print("error: no image was written (every image was skipped: see the counts above and "
              f"{args.out}/*_summary.json); nothing to train on", file=sys.stderr)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
