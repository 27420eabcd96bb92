"""End to end: the web page in headless Chromium (Debian's package) against a live server.

Installs nothing: skips with a reason when /usr/bin/chromium or Playwright is missing
(`scripts/test.sh` installs Debian's chromium). Screenshots go to the test's tmp_path
and to test-output/ in the repository (git-ignored) for people to look at.
"""

from __future__ import annotations

import csv
import io
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import columns
from fetalplanes.serving import ServeSettings, create_app
from fetalplanes.serving.explainer import ModuleExplainer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[1]
WAIT_MS = 90_000  # first inference on a busy 2-core machine

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} not found (apt-get install chromium); browser test skipped",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright for Python is not installed"
)
expect = sync_api.expect


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """uvicorn on a free loopback port in a background thread."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def predictor(trained_run: Path) -> Predictor:
    return Predictor.from_run(trained_run, min_confidence=0.5)


@contextmanager
def open_page(browser: Any, url: str) -> Iterator[tuple[Any, list[str]]]:
    """A laptop-sized page; collects script errors (CSP violations included)."""
    context = browser.new_context(viewport={"width": 1366, "height": 768}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url)
    expect(page.locator("#model-info")).to_contain_text("efficientnet_lite0", timeout=WAIT_MS)
    try:
        yield page, errors
    finally:
        context.close()


def save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    out = REPO / "test-output"
    out.mkdir(exist_ok=True)
    shutil.copy(shot, out / name)
    return shot


class Unavailable:
    available = False
    reason = "heat maps are switched off for this test"


class FakeExplainer:
    """A deterministic overlay so the toggle is exercised whatever state explain.py is in."""

    available = True
    reason = None

    def overlay(self, predictor: Any, data: bytes, name: str, target: int | None) -> bytes:
        gray = np.zeros((64, 64, 3), np.uint8)
        gray[16:48, 16:48] = (255, 80, 0)
        buf = io.BytesIO()
        Image.fromarray(gray).save(buf, "PNG")
        return buf.getvalue()


def test_page_end_to_end(browser: Any, predictor: Predictor, scans: Path, tmp_path: Path) -> None:
    """Keyboard, upload two images, cards, heat-map toggle state, CSV, screenshot."""
    explainer = ModuleExplainer()
    files = [scans / "scan_0.png", scans / "scan_2.png"]
    with (
        live_server(create_app(predictor, ServeSettings(), explainer)) as url,
        open_page(browser, url) as (page, errors),
    ):
        page.keyboard.press("Tab")  # skip link first, then the file picker button
        page.keyboard.press("Tab")
        expect(page.locator("#pick")).to_be_focused()

        page.set_input_files("#file-input", [str(f) for f in files])
        cards = page.locator("#cards > .card")
        expect(cards).to_have_count(2)
        expect(page.locator("#cards > .card[aria-busy]")).to_have_count(0, timeout=WAIT_MS)
        expect(page.locator("#status")).to_have_text("2 of 2 images classified.")
        shown = {"Not a target plane", *predictor.classes}
        planes = cards.locator(".plane").all_inner_texts()
        assert len(planes) == 2 and set(planes) <= shown, planes
        assert cards.locator(".filename").all_inner_texts() == [f.name for f in files]
        expect(cards.first.locator(".probs li")).to_have_count(len(predictor.classes))
        counted = sum(int(n) for n in page.locator("#counts .n").all_inner_texts())
        assert counted + int(page.locator("#flags .n").first.inner_text()) == 2

        check_heatmap_state(page, cards.first, explainer)
        rows = download_csv(page)
        save_screenshot(page, tmp_path, "serve.png")
        assert not errors, errors

    assert [r["path"] for r in rows] == [f.name for f in files]
    assert list(rows[0]) == columns(predictor.output_classes)  # the one result schema
    for row, plane in zip(rows, planes, strict=True):
        assert row["label"] == ("not_target" if plane == "Not a target plane" else plane)
        total = sum(float(row["p_" + c]) for c in predictor.classes)
        assert total == pytest.approx(1, abs=1e-4)
        assert row["error"] == "" and row["uncertain"] in ("0", "1")


def check_heatmap_state(page: Any, card: Any, explainer: Any) -> None:
    """Available: the toggle fetches and shows the overlay; else disabled, saying why."""
    toggle = card.locator(".heat-toggle")
    if explainer.available:
        toggle.click()
        expect(toggle).to_have_attribute("aria-pressed", "true", timeout=WAIT_MS)
        expect(card.locator("img.heat")).to_be_visible()
        return
    expect(toggle).to_be_disabled()
    expect(card.locator(".heat-note")).to_contain_text("Heat maps are unavailable")
    assert "explain-note" in (toggle.get_attribute("aria-describedby") or "").split()
    expect(page.locator("#explain")).to_be_disabled()
    expect(page.locator("#explain-note")).to_contain_text(explainer.reason or "")


def download_csv(page: Any) -> list[dict[str, str]]:
    with page.expect_download() as info:
        page.locator("#download").click()
    download = info.value
    assert download.suggested_filename.startswith("fetalplanes-")
    text = Path(download.path()).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def test_heatmap_toggle_and_client_side_limits(
    browser: Any, predictor: Predictor, scans: Path, tmp_path: Path
) -> None:
    """Heat maps precomputed; the toggle works from the keyboard; a too-big file never uploads."""
    big = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 255, (400, 400), np.uint8)
    Image.fromarray(noise).save(big)
    settings = ServeSettings(max_file_bytes=big.stat().st_size - 1)
    with (
        live_server(create_app(predictor, settings, FakeExplainer())) as url,
        open_page(browser, url) as (page, errors),
    ):
        page.locator("#explain").check()  # heat maps computed with the upload
        page.set_input_files("#file-input", [str(scans / "scan_4.png"), str(big)])
        cards = page.locator("#cards > .card")
        expect(page.locator("#cards > .card[aria-busy]")).to_have_count(0, timeout=WAIT_MS)
        expect(cards.nth(1).locator(".error-text")).to_contain_text("big.png: file too large")
        expect(page.locator("#status")).to_have_text(
            "1 of 2 images classified; 1 could not be read."
        )

        toggle = cards.first.locator(".heat-toggle")
        toggle.focus()
        page.keyboard.press("Enter")
        expect(toggle).to_have_attribute("aria-pressed", "true")
        expect(cards.first.locator("img.heat")).to_be_visible()
        expect(cards.first.locator("figcaption")).to_have_text("heat map on model input")
        save_screenshot(page, tmp_path, "serve-heatmap.png")
        page.keyboard.press("Space")
        expect(toggle).to_have_attribute("aria-pressed", "false")
        expect(cards.first.locator("img.heat")).to_have_count(0)
        assert not errors, errors


def test_unavailable_heatmaps_are_explained(
    browser: Any, predictor: Predictor, scans: Path
) -> None:
    with (
        live_server(create_app(predictor, ServeSettings(), Unavailable())) as url,
        open_page(browser, url) as (page, errors),
    ):
        page.set_input_files("#file-input", [str(scans / "scan_6.png")])
        expect(page.locator("#cards > .card[aria-busy]")).to_have_count(0, timeout=WAIT_MS)
        check_heatmap_state(page, page.locator("#cards > .card").first, Unavailable())
        assert not errors, errors
