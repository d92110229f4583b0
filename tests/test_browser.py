"""The pages people open, opened in a real browser: report.html and detections.html in headless Chromium.

Opt-in (marker `browser`; `make test-browser` installs Debian's chromium when missing):

    python -m pytest -m browser tests/test_browser.py

A tiny detection run trains for two steps and writes its report; `eval.run` writes a detections page
from the same tiny model. Each page is loaded through the DevTools protocol (a websocket; aiohttp,
which `datasets` already installs, is the client) and must show: every image loaded (naturalWidth >
0), no console error or uncaught exception (a missing image is one too), every table-of-contents
link landing on a section, and no horizontal scrolling on a 1366-px-wide laptop screen. A full-page
screenshot is written beside each page (report.png, detections.png); the measured widths are printed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
LAPTOP = (1366, 768)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str:
    for name in (os.environ.get("PG_CHROMIUM"), *CHROMIUM_NAMES):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium on PATH (make test-browser installs Debian's chromium; or set PG_CHROMIUM)")


# What the page reports about itself, once loaded (evaluated in the page; JSON out).
MEASURE = """(() => {
  const de = document.documentElement;
  const wide = [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
    .slice(0, 10).map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : '') + ' ' +
                           Math.round(e.getBoundingClientRect().right) + 'px');
  return JSON.stringify({
    innerWidth: window.innerWidth,
    scrollWidth: de.scrollWidth,
    scrollHeight: de.scrollHeight,
    images: [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                            naturalWidth: i.naturalWidth})),
    tocLinks: [...document.querySelectorAll('nav.toc a')].map(a => a.getAttribute('href')),
    missingTargets: [...document.querySelectorAll('a[href^="#"]')].map(a => a.getAttribute('href'))
      .filter(h => !document.getElementById(decodeURIComponent(h.slice(1)))),
    wide: wide,
  });
})()"""


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    async def wait_for(self, method: str, timeout: float = 60) -> None:
        async def until_seen() -> None:
            while not any(e.get("method") == method for e in self.events):
                self.events.append(json.loads((await self.ws.receive()).data))

        await asyncio.wait_for(until_seen(), timeout)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads (Chromium logs those as errors too)."""
        found = []
        for e in self.events:
            params = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                found.append("exception: " + params["exceptionDetails"].get("text", ""))
            elif e.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
        return found


async def _inspect(chromium: str, page: Path, screenshot: Path) -> tuple[dict, list[str]]:
    import aiohttp

    with tempfile.TemporaryDirectory() as profile:
        args = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage", f"--window-size={LAPTOP[0]},{LAPTOP[1]}", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--remote-debugging-port=0", "--no-first-run", "about:blank",
        ]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            port = None
            for line in proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
                found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
                if found:
                    port = int(found.group(1))
                    break
            assert port, f"chromium did not start (exit {proc.poll()})"
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    targets = await response.json()
                url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                async with session.ws_connect(url, max_msg_size=0) as ws:
                    tools = DevTools(ws)
                    for domain in ("Page", "Runtime", "Log"):
                        await tools.call(f"{domain}.enable")
                    tools.events.clear()
                    await tools.call("Page.navigate", url=page.resolve().as_uri())
                    await tools.wait_for("Page.loadEventFired")
                    result = await tools.call("Runtime.evaluate", expression=MEASURE, returnByValue=True)
                    measured = json.loads(result["result"]["value"])
                    size = await tools.call("Page.getLayoutMetrics")
                    height = min(int(size["cssContentSize"]["height"]), 16000)
                    shot = await tools.call(
                        "Page.captureScreenshot", format="png", captureBeyondViewport=True,
                        clip={"x": 0, "y": 0, "width": LAPTOP[0], "height": height, "scale": 1},
                    )  # fmt: skip
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                    return measured, tools.errors()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _check_page(page: Path, screenshot: Path) -> dict:
    measured, errors = asyncio.run(_inspect(_chromium(), page, screenshot))
    print(f"{page.name}: scrollWidth {measured['scrollWidth']} px, innerWidth {measured['innerWidth']} px, "
          f"height {measured['scrollHeight']} px, {len(measured['images'])} images; screenshot {screenshot}")
    assert errors == []
    assert measured["images"], "the page shows no image"
    broken = [i["src"] for i in measured["images"] if not (i["complete"] and i["naturalWidth"] > 0)]
    assert broken == []
    assert measured["missingTargets"] == []
    assert measured["innerWidth"] == LAPTOP[0]
    assert measured["scrollWidth"] <= measured["innerWidth"], f"wider than the screen: {measured['wide']}"
    with Image.open(screenshot) as png:
        assert png.format == "PNG" and png.width == LAPTOP[0]
    return measured


@pytest.fixture(scope="module")
def detect_run(tmp_path_factory) -> Path:
    from pg_finetune.train import main as train_main

    out = tmp_path_factory.mktemp("browser") / "run"
    code = train_main([
        "--recipe", str(ROOT / "recipes/tiny/easyvqa_detect.yaml"), f"training.output_dir={out}",
        "data.train_split=train[:8]", "data.eval_split=test[:6]", "eval.max_samples=6", "eval.batch_size=6",
        "training.per_device_train_batch_size=4", "training.max_steps=2", "training.logging_steps=1",
        "training.save_steps=100",
    ])  # fmt: skip
    assert code == 0
    return out


def test_report_page_in_a_browser(detect_run):
    measured = _check_page(detect_run / "report.html", detect_run / "report.png")
    assert {"#run", "#metrics", "#curves", "#examples"} <= set(measured["tocLinks"])
    assert any(i["src"] == "curves.png" for i in measured["images"])


def test_report_with_long_unbroken_outputs_and_paths_still_fits(detect_run, tmp_path):
    # a barely trained model can emit a long run of location tokens with no space to break at, and a
    # run directory can be deep (the page shows it, and the checkpoint path, in full)
    from pg_finetune.report import write_report

    run = tmp_path / ("run-" + "deep_output_directory_" * 8)
    shutil.copytree(detect_run, run, ignore=shutil.ignore_patterns("checkpoint-*", "final"))
    rows = [json.loads(line) for line in (run / "predictions_after.jsonl").read_text().splitlines()]
    for row in rows:
        row["prediction"] = row["raw"] = "<loc0512>" * 120 + " circle"
    (run / "predictions_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(run)
    _check_page(run / "report.html", run / "report.png")


def test_detections_page_in_a_browser(tmp_path):
    from eval.run import main as eval_main

    records = []
    colours = ["red", "blue", "green", "orange", "purple", "gray", "white", "black", "pink", "teal"]
    for k, colour in enumerate(colours):  # more than pages.TOC_FROM: the page lists them at the top
        size = (640, 480) if k == 0 else (64, 48)  # one image wider than a card
        Image.new("RGB", size, colour).save(tmp_path / f"{k}.png")
        records.append({"id": f"img-{k}-" + "x" * 80, "image": f"{k}.png", "boxes": [[4, 4, 30, 30]],
                        "labels": ["square"], "width": size[0], "height": size[1]})  # fmt: skip
    (tmp_path / "det.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    argv = ["--benchmark", "detection", "--model", "tiny", "--data", str(tmp_path / "det.jsonl"),
            "--max-new-tokens", "40", "--out", str(out), "--html-samples", "10"]  # fmt: skip
    assert eval_main(argv) == 0
    measured = _check_page(out / "detections.html", out / "detections.png")
    assert len(measured["images"]) == 10
    assert measured["tocLinks"] == [f"#ex-{k}" for k in range(10)]
