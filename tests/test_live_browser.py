"""The Live panel in headless Chromium, fed by a fake camera playing a clip of real frames.

Chromium's fake capture device plays a Y4M file (`--use-file-for-fake-video-capture`), as a
capture card would show the scanner's screen: the SonoNet captures of shared/ (abdomen,
kidneys, brain, spine, femur, profile, thorax; each plane held 3 s at 10 fps), looped. The
page streams the camera to /api/v1/live of a real uvicorn server (served as `fetalplanes
serve` runs it: Host guard, head timeouts) with the bundled SonoNet-16. Checked: the overlay
names the planes in the clip's order, a best frame is kept for each plane (and is a frame of
that plane), freezing stops the frames, and "Save session" downloads a ZIP with
timeline.csv and best/<plane>.jpg. The screenshot is kept (tmp_path and test-output/).

Skips with a reason without /usr/bin/chromium, Playwright or ffmpeg.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fetalplanes.data.crop import to_gray
from fetalplanes.inference.predictor import Predictor

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
WAIT_MS = 120_000  # a busy 2-core machine
PLAN = (("ABDOMINAL", 30), ("KIDNEYS", 10), ("BRAIN-CB", 30), ("SPINE-SAGITTAL", 10),
        ("FEMUR", 30), ("PROFILE", 10), ("4CH", 30))
HALF = (488, 368)  # the 976x736 captures at half size: a small Y4M, still real frames

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium); Live panel test skipped",
                allow_module_level=True)
if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg not found (apt-get install ffmpeg); the fake camera's clip needs it",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not "
                                                              "installed")
expect = sync_api.expect


def half(frame: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize(HALF))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep as a Y4M file (I420, 10 fps) for Chromium's fake camera."""
    from test_video import PLANE_OF, _capture, _transition

    folder = tmp_path_factory.mktemp("live-clip")
    rng = np.random.default_rng(2)
    i = 0
    for name, n in PLAN:
        capture = _capture(name)
        for k in range(n):
            frame = (np.roll(capture, (k % 3 - 1, k % 9 - 4), (0, 1)) if name in PLANE_OF
                     else _transition(capture, rng))
            Image.fromarray(half(frame)).save(folder / f"f{i:04d}.png", compress_level=1)
            i += 1
    out = folder / "clip.y4m"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-framerate", "10", "-i",
                    str(folder / "f%04d.png"), "-pix_fmt", "yuv420p", str(out)],
                   check=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def browser(clip: Path) -> Iterator[Any]:
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={clip}"]
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield b
        b.close()


def save_screenshot(target: Any, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    target.screenshot(path=str(shot))
    out = REPO / "test-output"
    out.mkdir(exist_ok=True)
    shutil.copy(shot, out / name)
    print(f"\nscreenshot: {shot} (copy in {out / name})")
    return shot


RECORD = """() => {
  window.__planes = [];
  const node = document.getElementById("live-plane");
  new MutationObserver(() => window.__planes.push(node.textContent))
    .observe(node, { childList: true, characterData: true, subtree: true });
}"""


def test_live_panel_names_each_plane_and_keeps_its_best_frame(
    browser: Any, tmp_path: Path
) -> None:
    from test_server_hardening import live_server
    from test_video import PLANE_OF, _capture

    predictor = Predictor.load("sononet16")
    order = [PLANE_OF[name] for name, _ in PLAN if name in PLANE_OF]
    with live_server(predictor) as port:
        context = browser.new_context(viewport={"width": 1366, "height": 900},
                                      accept_downloads=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"http://127.0.0.1:{port}/")
        expect(page.locator("#model-info")).to_contain_text("sononet16", timeout=WAIT_MS)
        page.evaluate(RECORD)
        page.locator("#live-start").click()
        expect(page.locator("#live-status")).to_contain_text("Live:", timeout=WAIT_MS)
        best = page.locator("#live-best figure")
        expect(best).to_have_count(4, timeout=WAIT_MS)  # every plane of the clip seen
        expect(page.locator("#live-checklist-title")).to_contain_text("4 of 4 present",
                                                                      timeout=WAIT_MS)
        page.wait_for_function("window.__planes.length > 40", timeout=WAIT_MS)
        shown = page.evaluate("window.__planes")
        stats = page.locator("#live-stats")
        fps, latency = stats.get_attribute("data-fps"), stats.get_attribute("data-latency")

        shot = save_screenshot(page.locator("#live"), tmp_path, "live-panel.png")
        page.locator("#live-freeze").click()  # no frame goes out while frozen
        expect(page.locator("#live-freeze")).to_have_attribute("aria-pressed", "true")
        page.wait_for_timeout(1500)
        frozen = stats.get_attribute("data-processed")
        page.wait_for_timeout(1500)
        assert stats.get_attribute("data-processed") == frozen
        page.locator("#live-freeze").click()

        page.locator("#live-stop").click()
        expect(page.locator("#live-status")).to_contain_text("Stopped:", timeout=WAIT_MS)
        with page.expect_download() as info:
            page.locator("#live-save").click()
        saved = tmp_path / info.value.suggested_filename
        info.value.save_as(saved)
        assert saved.name.startswith("fetalplanes-live-") and saved.suffix == ".zip"
        dropped = stats.get_attribute("data-dropped")
        assert not errors, errors  # a CSP violation (ws: connect-src) would show here
        context.close()

    print(f"live panel: {fps} answers/s, median latency {latency} ms, dropped {dropped}, "
          f"shown {len(shown)} labels")
    # the overlay named the planes in the clip's order (looped, from wherever it joined)
    planes = [p for p in shown if p in order]
    runs = [p for i, p in enumerate(planes) if i == 0 or planes[i - 1] != p]
    assert set(runs) == set(order), runs
    for a, b in pairwise(runs):
        assert order.index(b) == (order.index(a) + 1) % len(order), runs

    with zipfile.ZipFile(saved) as z:
        names = set(z.namelist())
        assert names == {"timeline.csv", *(f"best/{p.replace(' ', '_')}.jpg" for p in order)}
        rows = list(csv.DictReader(io.StringIO(z.read("timeline.csv").decode())))
        assert rows and rows[0]["path"].startswith("live#frame=")
        assert {r["smoothed_label"] for r in rows} >= set(order)
        captures = {PLANE_OF[n]: to_gray(half(_capture(n))).astype(np.int16) for n in PLANE_OF}
        for plane in order:
            jpg = np.asarray(Image.open(io.BytesIO(z.read(f"best/{plane.replace(' ', '_')}.jpg"))
                                        ).convert("L"), np.int16)
            diffs = {p: float(np.abs(jpg - c).mean()) for p, c in captures.items()}
            assert min(diffs, key=diffs.__getitem__) == plane, (plane, diffs)
    assert shot.stat().st_size > 20_000
