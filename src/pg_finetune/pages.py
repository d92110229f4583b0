"""A self-contained HTML page of predicted (red) and true (green) boxes on a sample of images.

The page is `detections.html`; the drawn images are PNGs in `detections/` beside it, linked by
relative paths, so the folder can be copied or served as it is. Each example has an anchor
(`detections.html#ex-3`); a page of more than `TOC_FROM` examples starts with links to them all.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pg_finetune.draw import PREDICTED_COLOUR, TRUTH_COLOUR, draw_masks

MIN_SIDE = 320  # small images (easy-VQA is 64 px) are enlarged so boxes and labels stay readable
TOC_FROM = 8  # more examples than this: a list of links to each one at the top


@dataclass
class Example:
    id: str
    image: Image.Image
    prompt: str
    output: str
    truth: Sequence[tuple[Sequence[float], str, str]]  # (pixel x1y1x2y2, label, note)
    predicted: Sequence[tuple[Sequence[float], str, str]]
    problems: Sequence[str] = ()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "example"


def write_detections_page(out_dir: Path, examples: Sequence[Example], title: str) -> Path:
    """Write out_dir/detections.html and out_dir/detections/*.png; return the page's path."""
    image_dir = out_dir / "detections"
    image_dir.mkdir(parents=True, exist_ok=True)
    cards = []
    for k, ex in enumerate(examples):
        name = f"{k:03d}_{_safe(ex.id)}.png"
        # draw_masks: draw_boxes, plus the masks that segmentation entries carry after (box, label, note)
        draw_masks(ex.image, ex.truth, ex.predicted, min_side=MIN_SIDE).save(image_dir / name)
        truth = "".join(f"<li>{html.escape(lab)} {_box(b)} {html.escape(note)}</li>" for b, lab, note, *_ in ex.truth)
        predicted = "".join(f"<li>{html.escape(lab)} {_box(b)}</li>" for b, lab, *_ in ex.predicted)
        problems = "".join(f"<li>{html.escape(p)}</li>" for p in ex.problems)
        cards.append(
            f"""<div class="card" id="ex-{k}"><img src="detections/{name}" alt="{html.escape(ex.id)}">
<p><a href="#ex-{k}">#{k}</a> <b>{html.escape(ex.id)}</b><br><code>{html.escape(ex.prompt)}</code></p>
<p>output: <code>{html.escape(ex.output) or "(empty)"}</code></p>
<p class="t">true</p><ul>{truth or "<li>(none)</li>"}</ul>
<p class="p">predicted</p><ul>{predicted or "<li>(none)</li>"}</ul>
{f'<p>problems</p><ul>{problems}</ul>' if problems else ''}</div>"""
        )
    toc = ""
    if len(examples) > TOC_FROM:
        links = "".join(f'<li><a href="#ex-{k}">{html.escape(ex.id)}</a></li>' for k, ex in enumerate(examples))
        toc = f'<nav class="toc"><details><summary>{len(examples)} examples</summary><ol start="0">{links}</ol></details></nav>'
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
/* fits a 1366-px laptop screen (tests/test_browser.py): long ids and outputs wrap inside their card */
.card {{ display: inline-block; vertical-align: top; width: 340px; max-width: 100%; margin: 6px; padding: 6px;
  border: 1px solid #ccc; box-sizing: border-box; overflow-wrap: anywhere; }}
.card img {{ max-width: 100%; height: auto; }} code {{ word-break: break-all; }}
ul {{ margin: 0; padding-left: 1.2em; }} h1 {{ overflow-wrap: anywhere; }}
nav.toc ol {{ columns: 3; overflow-wrap: anywhere; }}
.t {{ color: rgb{TRUTH_COLOUR}; margin: 2px 0; }} .p {{ color: rgb{PREDICTED_COLOUR}; margin: 2px 0; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p><span class="t">green: true boxes</span> (with the IoU of their match), <span class="p">red: predicted</span>.
{len(examples)} examples.</p>
{toc}
{"".join(cards)}
</body></html>
"""
    path = out_dir / "detections.html"
    path.write_text(page, encoding="utf-8")
    return path


def _box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"
