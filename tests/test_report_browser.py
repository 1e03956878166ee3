"""The HTML report of a real `imagesearch run`, opened in a real browser
(Playwright driving Debian's chromium): every thumbnail loads, the page logs no
console error, every score and relevance mark renders. A screenshot is saved
to test-output/report.png (IMAGESEARCH_TEST_OUTPUT overrides the folder).

Needs the playwright package and /usr/bin/chromium (CI installs both); skips
otherwise. Playwright's own browser download cannot run here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testkit import ROOT
from tests.helpers import make_photo_set
from tests.test_cli import write_json

CHROMIUM = Path(os.environ.get("IMAGESEARCH_CHROMIUM", "/usr/bin/chromium"))
# Headless, no sandbox (root in CI), and none of Chromium's own network traffic (the
# machine has no network: its background requests would only fail, noisily).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
OUTPUT = Path(os.environ.get("IMAGESEARCH_TEST_OUTPUT", ROOT / "test-output"))
TOP_K = 3
BUDGET_S = 60.0


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (CI does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_the_report_renders_in_a_real_browser(browser, tmp_path):
    started = time.monotonic()
    gallery, query, truth = make_photo_set(tmp_path)
    out = tmp_path / "out" / "results.json"
    env = {**os.environ, "IMAGESEARCH_TORCH_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    env.pop("IMAGESEARCH_EMBEDDER", None)
    env.pop("IMAGESEARCH_RANKER", None)
    run = subprocess.run(
        [sys.executable, "-m", "clients.cli", "run", "--gallery", str(gallery), "--query", str(query), "--out",
         str(out), "--ground-truth", str(write_json(tmp_path / "gt.json", truth)), "--top-k", str(TOP_K),
         "--no-progress", "--db", str(tmp_path / "g.db")],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUDGET_S)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    page_path = out.parent / "results.html"

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
    page.goto(page_path.as_uri(), wait_until="load")

    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({ok: e.complete && e.naturalWidth > 0, w: e.naturalWidth, alt: e.alt}))")
    expected_images = len(results) + sum(len(v) for v in results.values())
    assert len(images) == expected_images, images
    assert all(i["ok"] for i in images), [i for i in images if not i["ok"]]

    scores = page.locator(".score").all_inner_texts()
    assert len(scores) == sum(len(v) for v in results.values())
    assert all(re.fullmatch(r"-?[01]\.\d{3}", s) for s in scores), scores
    assert page.locator(".query").count() == len(results)
    relevant = sum(1 for q, v in results.items() for g in v if g in truth[q])
    assert page.locator(".cell.rel").count() == relevant > 0
    assert page.locator(".cell.irr").count() == sum(len(v) for v in results.values()) - relevant
    colours = {css: page.eval_on_selector(f".cell.{css} img", "e => getComputedStyle(e).borderTopColor")
               for css in ("rel", "irr")}
    rgb = {css: [int(c) for c in re.findall(r"\d+", value)[:3]] for css, value in colours.items()}
    assert rgb["rel"][1] > max(rgb["rel"][0], rgb["rel"][2]), f"relevant is marked green: {colours}"
    assert rgb["irr"][0] > max(rgb["irr"][1], rgb["irr"][2]), f"not relevant is marked red: {colours}"
    assert page.locator("table.metrics").is_visible()
    assert "mAP@3" in page.locator("table.metrics").inner_text()

    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    assert shot.stat().st_size > 10_000
    assert not problems, problems
    elapsed = time.monotonic() - started
    print(f"report screenshot: {shot} ({elapsed:.1f}s)")
    assert elapsed < BUDGET_S, f"the browser check took {elapsed:.0f}s, over its {BUDGET_S:.0f}s budget"
