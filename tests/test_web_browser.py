"""The `imagesearch web` page in a real browser (Playwright driving Debian's
chromium) against `imagesearch web` run as a command over real services: a
photo dropped on the page fills the grid with its original first; "more like
this" searches with a result; reloading the shared URL shows the same results;
the page logs no error (a CSP violation would be one). A screenshot is saved to
test-output/web.png (IMAGESEARCH_TEST_OUTPUT overrides the folder).

Needs the playwright package and /usr/bin/chromium (CI installs both); skips
otherwise."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest

from testkit import ROOT
from tests.test_report_browser import OUTPUT, browser  # noqa: F401 (fixture)
from tests.test_web import COLLECTION, gallery, services  # noqa: F401 (fixtures)

pytest.importorskip("starlette", reason="the [web] extra: pip install 'imagesearch[web]'")

URL_LINE = re.compile(r"search page: (http://\S+/)")
TOP_K = 4
BUDGET_S = 60.0


@pytest.fixture
def web_url(services, gallery):
    """`imagesearch web` on a free port; its URL from the line it prints."""
    embedder, ranker = services
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "web", "--embedder", embedder.address, "--ranker", ranker.address,
         "--gallery", str(gallery), "--port", "0"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        found = URL_LINE.search(line)
        assert found, line + proc.stderr.read() if proc.poll() is not None else line
        assert found.group(1).startswith("http://127.0.0.1:")  # bound to this machine only by default
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(10)


def cropped(path) -> str:
    """The photo at `path`, its middle 80%, as base64 JPEG: a visitor's copy of it."""
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
        buf = io.BytesIO()
        img.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(buf, "JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def names(page) -> list[str]:
    return page.locator("#results .card .name").all_inner_texts()


def wait_for_results(page, first: str) -> list[str]:
    page.wait_for_function("([first, k]) => { const n = document.querySelectorAll('#results .card .name');"
                           " return n.length === k && n[0].textContent === first; }", arg=[first, TOP_K],
                           timeout=20_000)
    page.wait_for_function("() => [...document.querySelectorAll('#results img.thumb')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=20_000)
    return names(page)


@pytest.mark.slow
def test_drop_a_photo_then_more_like_this_then_the_shared_url(browser, web_url, gallery):
    started = time.monotonic()
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(web_url, wait_until="load")
    page.wait_for_function("() => document.querySelectorAll('#collection option').length > 0")
    assert page.locator("#filters select[data-key=class] option").all_inner_texts() == ["any", "a", "b", "c"]
    page.fill("#top_k", str(TOP_K))

    # Drop a cropped copy of one gallery photo: its original comes first.
    data = page.evaluate_handle(
        "([b64, name]) => { const dt = new DataTransfer(); const bytes = Uint8Array.from(atob(b64), c => "
        "c.charCodeAt(0)); dt.items.add(new File([bytes], name, {type: 'image/jpeg'})); return dt; }",
        [cropped(gallery / "b" / "photo2.jpg"), "my photo.jpg"])
    page.dispatch_event("#drop", "drop", {"dataTransfer": data})
    first = wait_for_results(page, "b/photo2.jpg")
    assert page.locator("#query-img").get_attribute("src").startswith("blob:")
    assert re.fullmatch(r"\d\.\d{3}", page.locator("#results .score").first.inner_text())
    assert "class" in page.locator("#results .attrs").first.inner_text()
    assert "gallery=" not in page.url and f"collection={COLLECTION}" in page.url and f"top_k={TOP_K}" in page.url

    # "More like this" on the second result: it comes first, and the URL names it.
    other = first[1]
    page.locator("#results .card").nth(1).get_by_role("button", name="More like this").click()
    more = wait_for_results(page, other)
    assert "gallery=" in page.url

    # The shared URL, opened afresh, shows the same search.
    shared = page.url
    page.reload(wait_until="load")
    assert wait_for_results(page, other) == more and page.url == shared
    fresh = browser.new_page()
    fresh.goto(shared, wait_until="load")
    assert wait_for_results(fresh, other) == more
    fresh.close()

    # A JSON download in the CLI's results format.
    with page.expect_download() as download:
        page.click("#download")
    assert json.loads(open(download.value.path()).read()) == {other: more}

    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    assert shot.stat().st_size > 10_000
    assert not problems, problems
    elapsed = time.monotonic() - started
    print(f"web page screenshot: {shot} ({elapsed:.1f}s)")
    assert elapsed < BUDGET_S, f"the browser check took {elapsed:.0f}s, over its {BUDGET_S:.0f}s budget"


@pytest.mark.slow
def test_the_page_says_what_went_wrong(browser, web_url):
    page = browser.new_page()
    page.goto(web_url + "?collection=nope&gallery=a/photo0.jpg", wait_until="load")
    page.wait_for_function("() => document.getElementById('status').classList.contains('error')")
    text = page.locator("#status").inner_text()
    assert "Error 404" in text and "imagesearch index" in text, text
    data = page.evaluate_handle("() => { const dt = new DataTransfer(); "
                                "dt.items.add(new File(['no pixels'], 'notes.jpg', {type: 'image/jpeg'})); return dt; }")
    page.select_option("#collection", COLLECTION)
    page.dispatch_event("#drop", "drop", {"dataTransfer": data})
    page.wait_for_function("() => document.getElementById('status').textContent.includes('Error 400')")
    assert "not an image" in page.locator("#status").inner_text()
    page.close()
