"""The audit in headless Chromium (Debian's package, driven by Playwright): a study's
report.html opened from disk (no script, no network; a screenshot kept, the missing views on
it), and the web page's Study panel filling its checklist as images are added.

Screenshots go to the test's tmp_path and to test-output/ (git-ignored); the paths are
printed (`pytest -s` shows them).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from dicomfiles import SHARED
from test_serve_browser import CHROMIUM_ARGS, REPO, WAIT_MS, live_server, sync_api

from fetalplanes.inference.predictor import Predictor
from fetalplanes.serving import ServeSettings, create_app
from fetalplanes.workflows.audit import run_audit
from fetalplanes.workflows.checklist import load_checklist

pytestmark = pytest.mark.slow
expect = sync_api.expect
CHROMIUM = Path("/usr/bin/chromium")
EXAMPLES = SHARED / "sononet" / "example_images"
REMOVED = ["BRAIN-CB", "FEMUR", "KIDNEYS"]
REMOVED_NAMES = ["Trans-cerebellar plane (cerebellum, cisterna magna)", "Kidneys",
                 "Femur (FL)"]


@pytest.fixture(scope="module")
def browser() -> Any:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    if not EXAMPLES.is_dir():
        pytest.skip(f"real frames not found at {EXAMPLES}: set FETALPLANES_SHARED to shared/")
    return Predictor.load("sononet16", preset="views13")


def keep(shot: Path) -> Path:
    out = REPO / "test-output"
    out.mkdir(exist_ok=True)
    shutil.copy(shot, out / shot.name)
    print(f"screenshot: {shot} (copy: {out / shot.name})")
    return shot


def test_report_opens_offline_and_lists_the_missing_views(browser, predictor, tmp_path):
    folder = tmp_path / "study-20w"
    folder.mkdir()
    for f in EXAMPLES.glob("*.png"):
        if f.stem not in REMOVED:
            shutil.copy(f, folder / f.name)
    run_audit([folder], tmp_path / "out", predictor, load_checklist("isuog-mid-trimester"),
              model={"name": "sononet16", "card": {"summary": "test card",
                                                   "not_medical_device": "not a device"}})
    report = tmp_path / "out" / "study-20w" / "report.html"
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  java_script_enabled=False)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(report.as_uri())
    missing = page.locator("#missing li")
    # the three removed views, and the three-vessel view the model reads as RVOT (measured)
    expect(missing).to_have_count(4)
    got = missing.all_inner_texts()
    assert set(got) == {*REMOVED_NAMES, "Three-vessel (and trachea) view"}
    expect(page.locator("#research-use")).to_contain_text("not a medical device")
    assert page.locator("#checklist img.thumb").count() == 9
    assert all(img.evaluate("i => i.naturalWidth") > 0
               for img in page.locator("#checklist img.thumb").all())
    assert page.locator("tr.item-not_assessed").count() == 13
    expect(page.locator("#model-card")).to_contain_text("test card")
    assert requests == [report.as_uri()]  # nothing else fetched
    page.screenshot(path=str(tmp_path / "audit-report.png"), full_page=True)
    keep(tmp_path / "audit-report.png")
    context.close()


def test_study_panel_fills_the_checklist_as_files_are_added(browser, tmp_path):
    if not EXAMPLES.is_dir():
        pytest.skip(f"real frames not found at {EXAMPLES}")
    served = Predictor.load("sononet16")  # seed4, as `fetalplanes serve sononet16` starts
    with live_server(create_app(served, ServeSettings())) as url:
        context = browser.new_context(viewport={"width": 1366, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url)
        expect(page.locator("#study-checklist")).to_have_value("isuog-mid-trimester",
                                                               timeout=WAIT_MS)
        rows = page.locator("#study-rows tr")
        expect(rows).to_have_count(len(load_checklist("isuog-mid-trimester").items))
        page.set_input_files("#study-input", [str(EXAMPLES / "4CH.png"),
                                              str(EXAMPLES / "FEMUR.png")])
        expect(page.locator("#study-status")).to_have_text("2 file(s) in this study.",
                                                           timeout=WAIT_MS)
        expect(page.locator("#study-summary")).to_contain_text("2 of 13 views")
        page.set_input_files("#study-input", [str(EXAMPLES / "LVOT.png"),
                                              str(EXAMPLES / "4CH.png")])
        expect(page.locator("#study-status")).to_have_text("4 file(s) in this study.",
                                                           timeout=WAIT_MS)
        expect(page.locator("#study-summary")).to_contain_text("3 of 13 views")
        four = page.locator('#study-rows tr[data-item="heart-4ch"]')
        expect(four.locator(".study-status")).to_have_text("present")
        expect(four).to_contain_text("2 frame(s)")  # merged over both uploads
        expect(four.locator("img")).to_have_count(1)
        expect(page.locator("#study-missing")).to_contain_text("Kidneys")
        expect(page.locator('#study-rows tr[data-item="face-orbits"] .study-status')
               ).to_have_text("not assessed by this model")
        page.locator("#study-card summary").click()
        expect(page.locator("#study-card-body")).to_contain_text("not a medical device")
        page.locator("#study").screenshot(path=str(tmp_path / "study-panel.png"))
        keep(tmp_path / "study-panel.png")
        assert not errors, errors
        context.close()
