"""`POST /api/v1/scan`: a video or DICOM cine upload, scanned in memory with zero-shot
SonoNet-16, returns the timeline, segments, best frames and missing planes; nothing is written
to disk; bad uploads get one-line errors."""

from __future__ import annotations

import base64
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import shared_dir
from dicomfiles import IDENTIFIERS
from fastapi.testclient import TestClient
from PIL import Image
from test_video import PLANE_OF, nearest, region_of, segments, sweep, write_cine, write_clip

from fetalplanes.data.crop import to_gray
from fetalplanes.inference.predictor import Predictor
from fetalplanes.serving import ServeSettings, create_app
from fetalplanes.serving import scan as scan_module
from fetalplanes.serving.scan import SCAN, ScanResponse

pytestmark = pytest.mark.slow  # real-frame, subprocess or timing tests: CI lane


class NoHeatmaps:
    available = False
    reason = "not needed for scans"

    def overlay(self, *args: Any) -> bytes:
        raise AssertionError("the scan endpoint never makes heat maps")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    weights = shared_dir() / "sononet" / "SonoNet16.pth"
    if not weights.is_file():
        pytest.skip(f"SonoNet weights not found at {weights}: shared/ data is absent "
                    "(set FETALPLANES_SHARED)")
    return Predictor.from_pretrained("sononet16", weights)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    frames, names = sweep()
    folder = tmp_path_factory.mktemp("api-sweep")
    n_cine = segments(names)["Fetal thorax"][0]
    return {"frames": frames, "names": names, "n_cine": n_cine,
            "clip": write_clip(folder, frames).read_bytes(),
            "cine": write_cine(folder, frames[:n_cine]).read_bytes()}


def make_client(predictor: Predictor, **settings: Any) -> TestClient:
    return TestClient(create_app(predictor, ServeSettings(**settings), NoHeatmaps()))


@pytest.fixture()
def client(predictor: Predictor) -> Iterator[TestClient]:
    with make_client(predictor) as c:
        yield c


def post(client: TestClient, *files: tuple[str, bytes], **params: Any) -> Any:
    return client.post(SCAN, params=params,
                       files=[("files", (n, d, "application/octet-stream")) for n, d in files])


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def spans_of(timeline: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for row in timeline:
        label, i = row["smoothed"]["label"], row["frame"]
        if label != "not_target":
            out[label] = (out.get(label, (i, i))[0], i)
    return out


def close_to(found: dict[str, tuple[int, int]], expected: dict[str, tuple[int, int]]) -> bool:
    return set(found) == set(expected) and all(
        abs(found[p][0] - s) <= 2 and abs(found[p][1] - e) <= 2 for p, (s, e) in expected.items()
    )


def test_scan_a_video_upload(client: TestClient, real: dict[str, Any]) -> None:
    frames, names = real["frames"], real["names"]
    r = post(client, ("sweep.mp4", real["clip"]))
    assert r.status_code == 200, r.text
    body = r.json()
    ScanResponse.model_validate(body)
    assert body["kind"] == "video" and body["fps"] == 25 and body["missing"] == []
    assert body["frames_scanned"] == len(frames) == len(body["timeline"])
    first = body["timeline"][0]
    assert {"frame", "time_s", "label", "confidence", "probabilities", "rejection_score",
            "smoothed"} <= set(first)
    assert set(first["probabilities"]) == set(body["classes"])
    expected = segments(names)
    assert close_to(spans_of(body["timeline"]), expected)
    assert close_to({s["plane"]: (s["start_frame"], s["end_frame"]) for s in body["segments"]},
                    expected)
    gray = [to_gray(f) for f in frames]
    assert [b["plane"] for b in body["best"]] == list(PLANE_OF.values())
    for best in body["best"]:
        match, diff = nearest(decode_png(best["png"]), gray)
        assert match == best["frame"] and diff < 6
        assert PLANE_OF[names[match]] == best["plane"]
        assert best["time_s"] == pytest.approx(best["frame"] / 25)


def test_scan_a_dicom_cine_upload(client: TestClient, real: dict[str, Any]) -> None:
    frames, names, n = real["frames"], real["names"], real["n_cine"]
    r = post(client, ("cine.dcm", real["cine"]), every=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "dicom" and body["missing"] == ["Fetal thorax"]
    assert body["pixel_spacing_mm"] == pytest.approx([0.25, 0.3])
    assert [row["frame"] for row in body["timeline"]] == list(range(0, n, 2))
    assert body["timeline"][1]["pixel_spacing_mm"] == pytest.approx([0.25, 0.3])
    regions = [to_gray(region_of(f)) for f in frames[:n]]
    for best in body["best"]:
        png = decode_png(best["png"])
        assert png.shape == (660, 821)  # the declared B-mode region, not the whole screen
        match, _ = nearest(png, regions)
        assert match == best["frame"] and PLANE_OF[names[match]] == best["plane"]
    for ident in IDENTIFIERS:
        assert ident not in r.text


def test_uploads_are_scanned_without_touching_the_disk(
    client: TestClient, real: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temp dir and cwd stay empty; the video went through memfd_create, which was closed."""
    if not hasattr(os, "memfd_create"):
        pytest.skip("memfd_create is Linux-only; video uploads are refused elsewhere")
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    for var in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.setenv(var, str(tmp))
    monkeypatch.chdir(cwd)
    made: list[int] = []
    real_memfd = os.memfd_create

    def spy(name: str, flags: int = 0) -> int:
        made.append(fd := real_memfd(name, flags))
        return fd

    monkeypatch.setattr(os, "memfd_create", spy)
    for name, data in (("sweep.mp4", real["clip"]), ("cine.dcm", real["cine"])):
        r = post(client, (name, data), every=8)
        assert r.status_code == 200, r.text
    assert len(made) == 1  # the video; the DICOM cine is decoded from the bytes
    assert list(tmp.iterdir()) == [] and list(cwd.iterdir()) == []
    open_fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not any("fetalplanes-upload" in link for link in open_fds)


def test_bad_uploads_get_one_line_errors(predictor: Predictor, real: dict[str, Any]) -> None:
    with make_client(predictor, max_file_bytes=len(real["clip"]) - 1) as small:
        r = post(small, ("big.mp4", real["clip"]))
        assert r.status_code == 413 and "big.mp4" in r.json()["detail"]
    with make_client(predictor) as client:
        cases = [
            (post(client, ("notes.mp4", b"just some text\n" * 200)), 415, "notes.mp4"),
            (post(client, ("a.mp4", real["clip"]), ("b.mp4", real["clip"])), 400, "one video"),
            (post(client, ("a.mp4", real["clip"]), window=4), 400, "odd"),
            (post(client, ("empty.dcm", b"")), 415, "empty"),
        ]
        for r, status, needle in cases:
            assert r.status_code == status, r.text
            detail = r.json()["detail"]
            assert needle in detail and "\n" not in detail
        assert post(client, ("a.mp4", real["clip"]), every=0).status_code == 422


def test_frame_limit_is_413(client: TestClient, real: dict[str, Any],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_module, "MAX_SCAN_FRAMES", 10)
    r = post(client, ("sweep.mp4", real["clip"]))
    assert r.status_code == 413 and "more than 10 frames" in r.json()["detail"]
    assert post(client, ("sweep.mp4", real["clip"]), every=5).status_code == 200


def test_page_offers_a_sweep_upload(client: TestClient) -> None:
    page = client.get("/").text
    assert 'id="scan-input"' in page and 'id="scan-strip"' in page and 'id="scan-best"' in page
    js = client.get("/static/app.js").text
    assert "`${API}/scan" in js
    assert any(op == SCAN for op in client.get("/openapi.json").json()["paths"])
