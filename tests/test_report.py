"""The run report: page structure, before/after columns, drawn boxes, confusion matrices, curves, CLI."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pg_finetune.draw import PREDICTED_COLOUR, TRUTH_COLOUR, display_scale
from pg_finetune.loc import format_detections
from pg_finetune.recipe import load_recipe, recipe_from_dict, save_recipe
from pg_finetune.recipe_data import load_eval_records
from pg_finetune.report import main, read_log_history, training_series, write_report
from pg_finetune.tasks import ScoreOptions, get_task
from pg_finetune.tasks.caption import caption_scores
from pg_finetune.tasks.count import confusion_matrix
from pg_finetune.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
VOID = {"img", "meta", "br", "hr", "link", "input", "source", "col", "wbr"}


# ---- a small DOM, so the tests can read the page as a browser would ---------------------------------
class Node:
    def __init__(self, tag: str, attrs: dict, parent: Node | None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                classes = child.attrs.get("class", "").split()
                ok = child.tag == tag and all(
                    (v in classes) if k == "class_" else child.attrs.get(k) == v for k, v in attrs.items()
                )
                found += [child] if ok else []
                found += child.find_all(tag, **attrs)
        return found


class StrictParser(HTMLParser):
    """Builds a Node tree; records every unbalanced tag, src and href."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.current = self.root
        self.errors: list[str] = []
        self.links: list[str] = []
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        node = Node(tag, attrs, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if self.current.tag != tag:
            self.errors.append(f"</{tag}> closes <{self.current.tag}>")
            return
        self.current = self.current.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse_page(path: Path) -> Node:
    parser = StrictParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert parser.doctype, "missing <!DOCTYPE html>"
    assert parser.errors == [] and parser.current is parser.root, (parser.errors, parser.current.tag)
    for link in parser.links:
        assert not link.startswith(("http:", "https:", "//")), f"network reference {link}"
        if not link.startswith(("data:", "#")):
            assert (path.parent / link).is_file(), f"{link} does not exist beside the report"
    return parser.root


def example_rows(page: Node) -> dict[str, dict]:
    """{row id: {"before": prediction text, "after": ..., "before_score": ..., "images": [src, ...]}}."""
    (table,) = page.find_all("table", class_="examples")
    rows = {}
    for tr in table.find_all("tr"):
        if "data-id" not in tr.attrs:
            continue
        row = {"images": [img.attrs["src"] for img in tr.find_all("img")]}
        for which in ("before", "after"):
            (td,) = tr.find_all("td", class_=which)
            spans = td.find_all("span", class_="prediction")  # an empty output shows as "(empty)"
            empty = bool(spans) and "empty" in spans[0].attrs["class"].split()
            row[which] = ("" if empty else spans[0].text()) if spans else None
            row[which + "_score"] = " ".join(d.text() for d in td.find_all("div", class_="score"))
            row[which + "_images"] = [img.attrs["src"] for img in td.find_all("img")]
        rows[tr.attrs["data-id"]] = row
    return rows


def element_ids(node: Node) -> set[str]:
    found = set()
    for child in node.children:
        if isinstance(child, Node):
            found |= {child.attrs["id"]} if "id" in child.attrs else set()
            found |= element_ids(child)
    return found


def table_of_contents(page: Node) -> list[str]:
    """The anchors the table of contents links to, checked: each names an element, and every section is listed
    in page order."""
    (nav,) = page.find_all("nav", class_="toc")
    links = [a.attrs["href"] for a in nav.find_all("a")]
    assert all(link.startswith("#") for link in links), links
    anchors = [link[1:] for link in links]
    assert set(anchors) <= element_ids(page), set(anchors) - element_ids(page)
    assert anchors == [section.attrs["id"] for section in page.find_all("section")]
    return anchors


# ---- fabricated runs ----------------------------------------------------------------------------------
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def _dataset(root: Path, records: list[dict], images: list[Image.Image]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "test.jsonl", "w") as f:
        for k, (record, image) in enumerate(zip(records, images, strict=True)):
            image.save(root / f"img{k}.png")
            f.write(json.dumps({"image": f"img{k}.png", **record}) + "\n")
    return root


def _run_dir(path: Path, recipe: dict, rows_before: list[dict], rows_after: list[dict], **metrics) -> Path:
    path.mkdir(parents=True)
    save_recipe(
        recipe_from_dict({"name": "fabricated", "description": "a <fake> run & more", **recipe}), path
    )
    for which, rows in (("before", rows_before), ("after", rows_after)):
        if rows is not None:
            (path / f"predictions_{which}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "recipe": "fabricated",
        "train_loss": 1.5,
        "steps": 10,
        "train_samples_per_second": 12.5,
        "wall_time_s": 3.2,
        "parameters": "trainable params: 10 / 100 (10.00%)",
        "final_dir": "x",
        **metrics,
    }
    (path / "metrics.json").write_text(json.dumps(summary))
    log = [{"loss": 3.0 / (s + 1), "learning_rate": 1e-3, "step": s, "epoch": s / 10} for s in range(1, 11)]
    (path / "log_history.json").write_text(json.dumps(log))
    return path


def _vqa_run(tmp_path: Path, ids: list[str] | None = None) -> tuple[Path, list[dict], list[dict]]:
    answers = ["red", "green", "blue", "yellow", "teal"]
    data = _dataset(
        tmp_path / "data",
        [
            {"id": f"q{k}", "prefix": f"answer en what colour? #{k}", "suffix": a}
            for k, a in enumerate(answers)
        ],
        [Image.new("RGB", (64, 64), c) for c in COLORS],
    )
    ids = ids or [f"q{k}" for k in range(5)]
    before = [
        {
            "id": ids[k],
            "prefix": f"answer en what colour? #{k}",
            "prediction": f"before-{ids[k]}",
            "raw": f"before-{ids[k]}",
            "references": [a],
        }
        for k, a in enumerate(answers)
    ]
    before[0]["prediction"] = before[0]["raw"] = "<i>x</i> & y"  # must be escaped, not rendered
    after = [
        {
            **r,
            "prediction": answers[k] if k % 2 == 0 else f"after-{ids[k]}",
            "raw": answers[k] if k % 2 == 0 else f"after-{ids[k]}",
        }
        for k, r in enumerate(before)
    ]
    # rows written in another order than the data: images must follow the ids, not the positions
    order = [3, 1, 4, 0, 2]
    recipe = {
        "task": {"name": "vqa"},
        "data": {"train": str(data), "eval_split": "test"},
        "tuning": {"method": "lora", "lora_r": 4, "lora_alpha": 8, "train_projector": True},
    }
    run = _run_dir(
        tmp_path / "run",
        recipe,
        [before[k] for k in order],
        [after[k] for k in order],
        before={"exact_match": 0.0},
        after={"exact_match": 0.6},
    )
    return run, before, after


def test_before_and_after_columns_come_from_each_prediction_file(tmp_path):
    run, before, after = _vqa_run(tmp_path)
    path = write_report(run, sample_size=5)
    assert path == run / "report.html"
    page = parse_page(path)
    rows = example_rows(page)
    assert set(rows) == {f"q{k}" for k in range(5)}
    for k in range(5):
        row = rows[f"q{k}"]
        assert row["before"] == before[k]["prediction"] and row["after"] == after[k]["prediction"]
        assert row["before_score"] == "wrong"
        assert row["after_score"] == ("correct" if k % 2 == 0 else "wrong")
        # the image shown is record q{k}'s (solid colour k), although the rows were written in another order
        (src,) = row["images"]
        pixel = Image.open(run / src).convert("RGB").getpixel((10, 10))
        assert pixel == COLORS[k]
    # escaped: the page holds no <i> element, and the text reads back exactly
    assert not page.find_all("i")
    assert "a <fake> run & more" in page.text()
    # the summary shows the run's figures and the metrics table before vs after
    text = page.text()
    assert "trainable params: 10 / 100" in text and "3.2 s" in text and "12.5 samples/s" in text
    assert "lora (r=4, alpha=8, dropout=0.0); also trains the projector" in text
    (metrics,) = page.find_all("table", class_="metrics")
    cells = [td.text() for td in metrics.find_all("td")]
    assert cells[:3] == ["0.0000", "0.6000", "+0.6000"]
    # a table of contents with an anchor per section; no confusion matrices for VQA, no box legend
    assert table_of_contents(page) == ["run", "metrics", "curves", "examples"]
    assert not page.find_all("span", class_="legend-truth")


def test_the_sample_is_seeded(tmp_path):
    run, _, _ = _vqa_run(tmp_path)
    first = list(example_rows(parse_page(write_report(run, sample_size=3, seed=0))))
    again = list(example_rows(parse_page(write_report(run, sample_size=3, seed=0))))
    others = {tuple(example_rows(parse_page(write_report(run, sample_size=3, seed=s)))) for s in range(1, 6)}
    assert first == again and len(first) == 3
    assert len(others | {tuple(first)}) > 1
    # an earlier report's images do not linger
    assert len(list((run / "report_files").iterdir())) == 3


def test_rows_that_match_no_eval_record_show_no_image_and_say_so(tmp_path):
    run, _, _ = _vqa_run(tmp_path, ids=["q0", "q1", "zz2", "q3", "q4"])  # one id unknown to the data
    page = parse_page(write_report(run, sample_size=5))
    rows = example_rows(page)
    assert rows["zz2"]["images"] == []
    assert all(len(rows[i]["images"]) == 1 for i in ("q0", "q1", "q3", "q4"))
    notes = " ".join(p.text() for p in page.find_all("p", class_="note"))
    assert "1 of 5 sampled prediction rows match no eval record" in notes


def test_a_prompt_that_differs_from_the_record_is_not_matched(tmp_path):
    run, _, _ = _vqa_run(tmp_path)
    rows = [json.loads(line) for line in (run / "predictions_before.jsonl").read_text().splitlines()]
    for r in rows:
        r["prefix"] += " (changed)"
    (run / "predictions_before.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "predictions_after.jsonl").unlink()
    page = parse_page(write_report(run, sample_size=5))
    assert all(r["images"] == [] for r in example_rows(page).values())
    notes = " ".join(p.text() for p in page.find_all("p", class_="note"))
    assert "5 of 5 sampled" in notes and "predictions_after.jsonl is missing" in notes


def test_detection_page_draws_true_and_predicted_boxes(tmp_path):
    truth = [0, 0, 32, 64]  # left half of a 64x64 image
    ids = ["d0", "d1"]
    data = _dataset(
        tmp_path / "data",
        [
            {
                "id": i,
                "prefix": "detect circle",
                "suffix": format_detections([(truth, "circle")], 64, 64),
                "boxes": [truth],
                "labels": ["circle"],
                "width": 64,
                "height": 64,
            }
            for i in ids
        ],
        [Image.new("RGB", (64, 64), (128, 128, 128)) for _ in ids],
    )
    task = get_task("detect")
    reference = task.reference(
        {"boxes": [truth], "labels": ["circle"], "width": 64, "height": 64, "prefix": "detect circle"}
    )
    predicted = format_detections([((0, 0, 32, 32), "circle")], 64, 64)  # top-left quarter: IoU 0.5
    before = [
        {"id": i, "prefix": "detect circle", "prediction": "", "raw": "", "references": reference}
        for i in ids
    ]
    after = [{**r, "prediction": predicted, "raw": predicted} for r in before]
    recipe = {"task": {"name": "detect"}, "data": {"train": str(data), "eval_split": "test"}}
    run = _run_dir(tmp_path / "run", recipe, before, after)
    page = parse_page(write_report(run, sample_size=2))
    row = example_rows(page)["d0"]
    assert row["before_score"] == "mIoU 0.000"
    assert row["after_score"] == "mIoU 0.500"  # 32x32 / 32x64, up to the 1023-bin rounding

    def pixels(src: str, color: tuple[int, int, int]) -> np.ndarray:
        rgb = np.asarray(Image.open(run / src).convert("RGB"))
        return np.argwhere((rgb == color).all(axis=-1))  # (y, x) of every pixel of that colour

    (after_src,) = row["after_images"]
    (before_src,) = row["before_images"]
    assert Image.open(run / after_src).size == (256, 256)  # 64 px enlarged 4x
    red = pixels(after_src, PREDICTED_COLOUR)
    # the predicted box (0, 0, 32, 32) px is (0, 0, 128, 128) on the 4x image; its label is drawn inside
    assert red.min(axis=0).tolist() == [0, 0] and abs(red.max(axis=0) - 128).max() <= 1
    green = pixels(after_src, TRUTH_COLOUR)
    assert abs(green.max(axis=0) - [255, 128]).max() <= 1  # truth reaches the bottom edge, x up to 128
    assert len(pixels(before_src, PREDICTED_COLOUR)) == 0  # the base model predicted nothing: no red
    assert len(pixels(before_src, TRUTH_COLOUR)) > 0
    # inside both boxes, the image is untouched
    assert Image.open(run / after_src).convert("RGB").getpixel((64, 192)) == (128, 128, 128)
    # the image column shows the true boxes only
    (truth_src,) = [src for src in row["images"] if src not in (after_src, before_src)]
    assert len(pixels(truth_src, TRUTH_COLOUR)) > 0 and len(pixels(truth_src, PREDICTED_COLOUR)) == 0
    # the task describes its reference and what its parser found; the page explains the colours
    (tr,) = [tr for tr in page.find_all("tr") if tr.attrs.get("data-id") == "d0"]
    (reference,) = tr.find_all("span", class_="reference")
    assert reference.text() == "circle: (0, 0, 32, 64)\n64 x 64 px"
    notes = {which: [d.text() for d in tr.find_all("td", class_=which)[0].find_all("div", class_="raw")]
             for which in ("before", "after")}  # fmt: skip
    assert "0 boxes" in notes["before"] and "1 box" in notes["after"]
    assert page.find_all("span", class_="legend-truth") and page.find_all("span", class_="legend-pred")


def test_count_confusion_matrix_counts_are_right():
    rows = [
        {"prediction": p, "references": [t]}
        for t, p in [
            ("0", "0"),
            ("0", "1"),
            ("1", "1"),
            ("1", "1"),
            ("2", "1"),
            ("2", "two"),
            ("2", "many"),
            ("2", "none"),  # none = 0, as VQA's number words
            ("1", "3"),
        ]
    ]
    truths, predicted, cells = confusion_matrix(rows)
    assert truths == ["0", "1", "2"] and predicted == ["0", "1", "2", "3", "other"]
    assert dict(cells) == {
        ("0", "0"): 1,
        ("0", "1"): 1,
        ("1", "1"): 2,
        ("2", "1"): 1,
        ("2", "2"): 1,
        ("2", "other"): 1,
        ("2", "0"): 1,
        ("1", "3"): 1,
    }


def test_count_page_has_before_and_after_confusion_matrices(tmp_path):
    refs = ["0", "1", "2", "2"]
    before = [
        {"id": f"c{k}", "prefix": "count the intersections", "prediction": "0", "raw": "0", "references": [r]}
        for k, r in enumerate(refs)
    ]
    after = [{**r, "prediction": p, "raw": p} for r, p in zip(before, ["0", "1", "2", "1"], strict=True)]
    # data that cannot be loaded again: the page still renders, without images, and says why
    recipe = {
        "task": {"name": "count_intersections"},
        "data": {"train": str(tmp_path / "gone"), "eval": str(tmp_path / "gone/test.jsonl")},
    }
    run = _run_dir(tmp_path / "run", recipe, before, after)
    page = parse_page(write_report(run))
    tables = {t.attrs["data-which"]: t for t in page.find_all("table", class_="confusion")}
    assert set(tables) == {"before", "after"}

    def counts(table: Node) -> dict[tuple[str, str], int]:
        return {(td.attrs["data-true"], td.attrs["data-pred"]): int(td.text()) for td in table.find_all("td")}

    assert counts(tables["before"]) == {
        ("0", "0"): 1,
        ("0", "1"): 0,
        ("0", "2"): 0,
        ("1", "0"): 1,
        ("1", "1"): 0,
        ("1", "2"): 0,
        ("2", "0"): 2,
        ("2", "1"): 0,
        ("2", "2"): 0,
    }
    assert counts(tables["after"])[("2", "1")] == 1 and counts(tables["after"])[("2", "2")] == 1
    assert table_of_contents(page) == ["run", "metrics", "curves", "confusion", "examples"]
    rows = example_rows(page)
    assert rows["c3"]["after_score"] == "wrong" and rows["c2"]["after_score"] == "correct"
    notes = " ".join(p.text() for p in page.find_all("p", class_="note"))
    assert "could not be loaded again" in notes and "test.jsonl" in notes


def test_one_drawer_sizes_each_page_its_own_way():
    report = {"min_side": 256, "max_side": 256, "whole": True}  # the report: thumbnails of about 256 px
    assert display_scale((64, 64), **report) == 4  # enlarged by a whole factor: pixels stay square
    assert display_scale((100, 50), **report) == 2
    assert display_scale((200, 130), **report) == 1
    assert display_scale((1024, 512), **report) == 0.25
    assert display_scale((64, 48), min_side=320) == pytest.approx(320 / 48)  # the eval page: never shrunk
    assert display_scale((1024, 512), min_side=320) == 1
    assert display_scale((64, 48)) == 1  # predict's overlay: the image as it is


def test_predict_and_the_eval_page_draw_in_the_reports_colours(tmp_path):
    from pg_finetune.loc import Detection
    from pg_finetune.pages import Example, write_detections_page
    from pg_finetune.predict import draw_detections

    image = Image.new("RGB", (100, 100), "white")
    overlay = draw_detections(image, [Detection(box=(10.0, 20.0, 60.0, 80.0), label="cat", bins=(0, 0, 0, 0))])
    assert overlay.size == image.size and overlay.getpixel((10, 50)) == PREDICTED_COLOUR
    example = Example("x", Image.new("RGB", (64, 64), "white"), "detect cat", "", truth=[((4, 4, 30, 30), "cat", "")],
                      predicted=[((34, 34, 60, 60), "cat", "")])  # fmt: skip
    write_detections_page(tmp_path, [example], "t")
    (png,) = (tmp_path / "detections").iterdir()
    drawn = Image.open(png).convert("RGB")
    assert drawn.size == (320, 320)  # 5x
    assert drawn.getpixel((20, 60)) == TRUTH_COLOUR and drawn.getpixel((170, 250)) == PREDICTED_COLOUR


def test_per_example_cider_is_the_corpus_computation():
    predictions = ["a red circle", "a blue square", "a green", ""]
    references = [["a red circle"], ["a blue triangle"], ["a green triangle", "green triangle"], ["a shape"]]
    each = get_task("caption").metric.scores_each(predictions, references, ScoreOptions())
    assert np.mean(each) == pytest.approx(caption_scores(predictions, references)["cider"])
    assert each[0] > each[1] > 0 and each[3] == 0.0


def test_log_history_prefers_the_runs_file_then_the_latest_checkpoint(tmp_path):
    for step in (2, 10):  # "checkpoint-2" sorts after "checkpoint-10" as text: the number must decide
        (tmp_path / f"checkpoint-{step}").mkdir()
        state = {"log_history": [{"loss": float(step), "step": step}]}
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    history, source = read_log_history(tmp_path)
    assert history == [{"loss": 10.0, "step": 10}] and source.endswith("checkpoint-10/trainer_state.json")
    log = [
        {"loss": 2.0, "step": 1},
        {"eval_loss": 1.5, "step": 1},
        {"eval/exact_match": 0.25, "epoch": 1, "step": 2},
        {"train_loss": 1.9, "train_runtime": 3.0, "step": 2},
    ]
    (tmp_path / "log_history.json").write_text(json.dumps(log))
    history, source = read_log_history(tmp_path)
    assert history == log and source.endswith("log_history.json")
    # no eval_loss: the Trainer never gets an eval dataset, so the report plots none
    assert training_series(history) == {
        "loss": [(1, 2.0)],
        "eval/exact_match": [(2, 0.25)],
    }


def test_cli_names_the_missing_recipe(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "recipe.yaml not found" in err and "training.output_dir" in err


# ---- one real tiny training run for the module -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    code = train_main(
        [
            "--recipe",
            str(ROOT / "recipes/tiny/easyvqa_lora.yaml"),
            f"training.output_dir={out}",
            "data.train_split=train[:24]",
            "data.eval_split=test[:8]",
            "eval.max_samples=8",
            "eval.batch_size=8",
            "training.per_device_train_batch_size=4",
            "training.max_steps=4",
            "training.logging_steps=1",
            "eval.eval_steps=2",
            "training.save_steps=2",
        ]
    )
    assert code == 0
    return out


def test_training_ends_with_a_report_and_prints_its_path(tiny_run, capsys):
    # the fixture's training wrote them (logging.html_report defaults to true), before any CLI call
    assert (tiny_run / "report.html").is_file() and (tiny_run / "curves.png").is_file()
    assert "before" in (tiny_run / "report.html").read_text()


def test_html_report_false_writes_none(tmp_path):
    out = tmp_path / "run"
    code = train_main(
        [
            "--recipe", str(ROOT / "recipes/tiny/easyvqa_lora.yaml"), f"training.output_dir={out}",
            "data.train_split=train[:8]", "data.eval_split=test[:2]", "eval.max_samples=2",
            "training.max_steps=1", "logging.html_report=false",
        ]
    )
    assert code == 0 and (out / "metrics.json").is_file()
    assert not (out / "report.html").exists() and not (out / "curves.png").exists()


def test_real_run_report_via_the_cli(tiny_run, capsys):
    assert main([str(tiny_run), "--sample", "5", "--seed", "3"]) == 0
    report = tiny_run / "report.html"
    assert capsys.readouterr().out.strip() == f"report: {report}"
    page = parse_page(report)
    with Image.open(tiny_run / "curves.png") as png:
        assert png.format == "PNG" and 600 <= png.width <= 3000 and 300 <= png.height <= 2000
        assert len(set(np.asarray(png.convert("L")).ravel().tolist())) > 20  # drawn on, not a blank canvas
    rows = example_rows(page)
    assert len(rows) == 5
    for which in ("before", "after"):
        written = {
            r["id"]: r
            for r in map(json.loads, (tiny_run / f"predictions_{which}.jsonl").read_text().splitlines())
        }
        for row_id, row in rows.items():
            assert row[which] == written[row_id]["prediction"]
    # every sampled row found its image among the reloaded eval records
    assert all(len(row["images"]) == 1 for row in rows.values())
    assert not page.find_all("p", class_="note")


def test_load_eval_records_gives_the_records_the_run_scored(tiny_run):
    records = load_eval_records(load_recipe(tiny_run / "recipe.yaml"))
    written = [json.loads(line) for line in (tiny_run / "predictions_before.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [w["id"] for w in written]
    assert [r["prefix"] for r in records] == [w["prefix"] for w in written]
    assert all(isinstance(r["image"], Image.Image) for r in records)
