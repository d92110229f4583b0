"""`builtin:NAME` sources: datasets made offline from a PyPI package, no download needed.

    load_records("builtin:easyvqa", "train")           # 38,575 questions about 4,000 images ("answer en ...")
    load_records("builtin:easyvqa-caption", "test")    # one templated caption per image ("a blue circle")
    load_records("builtin:easyvqa-detect", "train")    # one box per image, found from the shape's pixels
    load_records("builtin:easyvqa-segment", "train")   # one mask per image ("segment circle" -> loc + seg)

All four come from the `easy-vqa` package (64x64 images of one coloured shape; splits `train`,
`test`); the caption and the detect label are what the image's own QA pairs say about it. Add a
built-in with one entry in `BUILTINS`: a function from a split name to its records (canonical rows,
as `Source.rows` yields them).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence

from pg_finetune.data.source import Request, Source, SourceKind

logger = logging.getLogger(__name__)

_EASYVQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
_EASYVQA_SHAPES = ("circle", "rectangle", "triangle")


def _easyvqa_split(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    import easy_vqa

    loaders = {
        "train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    }
    if split not in loaders:
        raise ValueError(f"builtin:easyvqa has no split {split!r}; splits: {', '.join(loaders)}")
    get_questions, get_paths = loaders[split]
    questions, answers, image_ids = get_questions()
    return questions, answers, image_ids, get_paths()


def _easyvqa_rows(split: str) -> list[dict]:
    questions, answers, image_ids, paths = _easyvqa_split(split)
    return [
        {
            "image": paths[image_id],
            "prefix": f"answer en {question}",
            "suffix": answer,
            "id": f"easyvqa-{split}-{i}",
            "where": f"builtin:easyvqa {split} #{i}",
            "question": question,
            "answers": [answer],
            "image_id": image_id,
        }
        for i, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids, strict=True))
    ]


def easyvqa_caption(qa_pairs: Iterable[tuple[str, str]]) -> str:
    """A templated caption ("a blue circle") from what an image's QA pairs say about it.

    easy-vqa images hold one shape of one colour. "what color/shape" answers name them; so do the
    words of a question that presupposes them ("what color is the triangle?") and of yes/no
    questions whose answer means present ("is there a red shape?" yes, "is there not a circle?" no).
    A fact no pair reveals is left out: "a circle", "a red shape", or "a shape".
    """
    color: str | None = None
    shape: str | None = None
    for question, answer in qa_pairs:
        words = set(re.findall(r"[a-z]+", question.lower()))
        if answer in ("yes", "no"):
            negated = bool(words & {"not", "no"})
            if (answer == "yes") == negated:  # the named colour/shape is absent: says nothing positive
                continue
            named = words
        else:
            named = words | {answer}
        color = color or next((c for c in _EASYVQA_COLORS if c in named), None)
        shape = shape or next((s for s in _EASYVQA_SHAPES if s in named), None)
    return f"a {color or ''} {shape or 'shape'}".replace("  ", " ")


def _easyvqa_caption_rows(split: str) -> list[dict]:
    questions, answers, image_ids, paths = _easyvqa_split(split)
    qa_by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        qa_by_image[image_id].append((question, answer))
    rows = []
    for i, image_id in enumerate(sorted(paths)):
        caption = easyvqa_caption(qa_by_image.get(image_id, []))
        rows.append(
            {
                "image": paths[image_id],
                "prefix": "caption en",
                "suffix": caption,
                "id": f"easyvqa-caption-{split}-{image_id}",
                "where": f"builtin:easyvqa-caption {split} #{i}",
                "captions": [caption],
                "image_id": image_id,
            }
        )
    return rows


_EASYVQA_BOXES: dict[str, tuple[int, int, int, int] | None] = {}
# Images of each split that `builtin:easyvqa-detect` left out, by reason (filled when it loads).
_EASYVQA_DETECT_SKIPPED: dict[str, Counter] = {}


def easyvqa_shape_box(path: str) -> tuple[int, int, int, int] | None:
    """Pixel (x1, y1, x2, y2) of an easy-vqa image's shape, x2/y2 exclusive; None for a blank image.

    The background is the most common border colour; the shape is every pixel of another
    colour (its anti-aliased edge included). Cached by path: 4,000 images take ~2 s.
    """
    if path not in _EASYVQA_BOXES:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        colours, counts = np.unique(border, axis=0, return_counts=True)
        ys, xs = np.nonzero((pixels != colours[counts.argmax()]).any(axis=-1))
        box = None
        if len(xs):
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        _EASYVQA_BOXES[path] = box
    return _EASYVQA_BOXES[path]


def _easyvqa_shape(qa_pairs: Iterable[tuple[str, str]]) -> str | None:
    """The shape name an image's QA pairs reveal (via `easyvqa_caption`), or None."""
    words = easyvqa_caption(qa_pairs).split()
    return words[-1] if words[-1] in _EASYVQA_SHAPES else None


def _easyvqa_detect_rows(split: str) -> list[dict]:
    from pg_finetune.loc import detect_prefix, format_detections

    questions, answers, image_ids, paths = _easyvqa_split(split)
    qa_by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        qa_by_image[image_id].append((question, answer))
    rows, skipped = [], Counter()
    for image_id in sorted(paths):
        shape = _easyvqa_shape(qa_by_image.get(image_id, []))
        if shape is None:
            skipped["shape unknown"] += 1
            continue
        box = easyvqa_shape_box(paths[image_id])
        if box is None:
            skipped["no shape pixels"] += 1
            continue
        size = 64  # easy-vqa images are 64x64
        rows.append(
            {
                "image": paths[image_id],
                "prefix": detect_prefix([shape]),
                "suffix": format_detections([(box, shape)], size, size),
                "id": f"easyvqa-detect-{split}-{image_id}",
                "where": f"builtin:easyvqa-detect {split} #{len(rows)}",
                "boxes": [list(box)],
                "labels": [shape],
                "width": size,
                "height": size,
                "image_id": image_id,
            }
        )
    if skipped:
        logger.info("builtin:easyvqa-detect %s: skipped %s", split, dict(skipped))
    _EASYVQA_DETECT_SKIPPED[split] = skipped
    return rows


def _easyvqa_segment_rows(split: str) -> Sequence[dict]:
    """One mask per image (the shape's pixels), prefix `segment circle`, suffix 4 loc + 16 seg tokens.

    The seg tokens are codes of the default mask codec (`tasks/segment/scoring.default_codec_path`:
    $PG_FINETUNE_MASK_CODEC, vae-oid.npz in the cache dir, else the tiny offline codec, trained
    there on first use); each record names its codec so scoring decodes with the same one. Rows
    are encoded when first read (a sequence, not a list).
    """
    from pg_finetune.tasks.segment.easyvqa import easyvqa_segment_rows

    if split not in ("train", "test"):
        raise ValueError(f"builtin:easyvqa-segment has no split {split!r}; splits: train, test")
    return easyvqa_segment_rows(split, where=f"builtin:easyvqa-segment {split}")


# Built-in sources: `builtin:<name>` -> (split -> rows). Rows are already canonical.
BUILTINS: dict[str, Callable[[str], Sequence[dict]]] = {
    "easyvqa": _easyvqa_rows,
    "easyvqa-caption": _easyvqa_caption_rows,
    "easyvqa-detect": _easyvqa_detect_rows,
    "easyvqa-segment": _easyvqa_segment_rows,
}


def _find(request: Request) -> str | None:
    return request.source.removeprefix("builtin:") if request.source.startswith("builtin:") else None


def _open(name: str, request: Request) -> Source:
    if name not in BUILTINS:
        raise ValueError(
            f"unknown builtin dataset {name!r}; valid: {', '.join('builtin:' + n for n in BUILTINS)}"
        )
    split = request.split
    rows = BUILTINS[name](split)
    return Source(
        name=f"builtin:{name} {split}", num_rows=len(rows), rows=lambda indices: (rows[k] for k in indices)
    )


BUILTIN = SourceKind(
    name="builtin",
    form="name",
    description="builtin:NAME, one of: " + ", ".join("builtin:" + n for n in BUILTINS),
    find=_find,
    open=_open,
)
