"""One engine, one answer: the same pixels get the same result whichever way they arrive.

Real frames (the 13 SonoNet example captures, 975x735 RGB; HC18 heads, 800x540 grey) are
packed every way fetalplanes reads them, and each way's per-frame result is compared with a
reference for the same pixels (label, the network's own label, and every probability to
1e-5). Three groups, by what the pixels are:

- full frames, guessed crop: PNG files (in-process and decode-worker executors), a frame
  folder (scan), a lossless FFV1 video (predict, scan, sort), PNG and video uploads to
  /api/v1/predict and /api/v1/scan, PNG frames over the live WebSocket, frames held in
  memory, and Ray;
- frames with a declared ultrasound region: an uncompressed multi-frame DICOM (predict, the
  worker pool, sort, scan, both API endpoints, Ray) against the same frames in memory with
  the same region;
- a JPEG Baseline YBR_FULL_422 cine (lossy, so compared with itself): predict, sort, scan,
  API predict and API scan give identical per-frame results.

The table of way x largest difference is printed (`pytest -s`) for the closing note.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicomfiles import SONONET_REGION, real_frames, write_dicom
from fastapi.testclient import TestClient
from PIL import Image

from fetalplanes.data.sources import Frames, open_source
from fetalplanes.data.video import write_video
from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import PROB_PREFIX, Prediction
from fetalplanes.serving import ServeSettings, create_app
from fetalplanes.workflows.scan import scan
from fetalplanes.workflows.sorting import sort_images

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
TABLE: list[tuple[str, str, int, float]] = []  # group, way, frames, largest difference


class Row:
    """What is compared of one frame's result: labels and probabilities."""

    def __init__(self, label: str, model_label: str | None, probs: dict[str, float]):
        self.label, self.model_label, self.probs = label, model_label, probs

    @classmethod
    def of(cls, p: Prediction) -> Row:
        assert p.ok, p.error
        return cls(p.label, p.model_label, dict(p.probs))

    @classmethod
    def of_json(cls, d: dict[str, Any]) -> Row:
        assert d.get("error") is None, d.get("error")
        return cls(d["label"], d.get("model_label"), d["probabilities"])

    @classmethod
    def of_csv(cls, r: dict[str, str]) -> Row:
        assert not r["error"], r["error"]
        probs = {k[len(PROB_PREFIX):]: float(v) for k, v in r.items() if k.startswith(PROB_PREFIX)}
        return cls(r["label"], r["model_label"] or None, probs)


def compare(group: str, way: str, ref: list[Row], got: list[Row]) -> None:
    assert len(got) == len(ref), f"{way}: {len(got)} results for {len(ref)} frames"
    worst = 0.0
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert (a.label, a.model_label) == (b.label, b.model_label), f"{way}, frame {i}"
        assert a.probs.keys() == b.probs.keys()
        worst = max(worst, *(abs(a.probs[k] - b.probs[k]) for k in a.probs))
    TABLE.append((group, way, len(ref), worst))
    assert worst <= TOLERANCE, f"{way}: probabilities differ by {worst:.2e}"


@pytest.fixture(scope="module", autouse=True)
def _print_table() -> Iterator[None]:
    yield
    if TABLE:
        print("\n\nconsistency: group | way | frames | max |difference|")
        for group, way, n, worst in TABLE:
            print(f"  {group:12s} | {way:44s} | {n:3d} | {worst:.1e}")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load("sononet16")  # ONNX Runtime, fp32: no torch


@pytest.fixture(scope="module")
def frames() -> dict[str, list[np.ndarray]]:
    """Real frames cut to an even size (video encoders drop an odd last row or column)."""
    def even(fs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2])
                for f in fs]

    return {"sononet": even(real_frames("sononet", 13)), "hc18": even(real_frames("hc18", 8))}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory,
          frames: dict[str, list[np.ndarray]]) -> dict[str, Path]:
    """Every packing of the frames, per kind."""
    root = tmp_path_factory.mktemp("ways")
    out: dict[str, Path] = {}
    for kind, fs in frames.items():
        folder = root / f"png-{kind}"
        folder.mkdir()
        for i, f in enumerate(fs):
            Image.fromarray(f).save(folder / f"frame{i:02d}.png")
        out[f"png-{kind}"] = folder
        out[f"video-{kind}"] = write_video(root / f"video-{kind}.mkv", fs, 25, fourcc="FFV1")
        region = _region(kind, fs[0])
        out[f"dicom-{kind}"] = write_dicom(root / f"raw-{kind}.dcm", fs,
                                           transfer_syntax="explicit",
                                           regions=[(*region, 0.01, 0.01)], fps=20)
    out["jpeg"] = write_dicom(root / "cine-jpeg.dcm", frames["sononet"],
                              transfer_syntax="jpeg-baseline",
                              regions=[(*SONONET_REGION, 0.01, 0.01)], fps=20)
    return out


def _region(kind: str, frame: np.ndarray) -> tuple[int, int, int, int]:
    if kind == "sononet":
        return SONONET_REGION
    h, w = frame.shape[:2]
    return (40, 20, w - 41, h - 21)


def _video_frames_are_lossless(path: Path, fs: list[np.ndarray]) -> None:
    from fetalplanes.data.video import read_video

    got = [rgb for _, rgb in read_video(str(path), path.name)]
    want = [f if f.ndim == 3 else np.repeat(f[..., None], 3, axis=2) for f in fs]
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True)), \
        "the FFV1 clip did not keep the pixels"


def _journal(out: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    return sorted(rows, key=lambda r: (r["path"].split("#frame=")[0], int(r["frame"] or 0)))


def _upload(client: TestClient, path: str, files: list[tuple[str, bytes]]) -> Any:
    response = client.post(path, files=[("files", (n, d, "application/octet-stream"))
                                        for n, d in files])
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> TestClient:
    mb = 1024 * 1024  # the uncompressed 13-frame DICOM is 28 MB
    return TestClient(create_app(predictor, ServeSettings(max_file_bytes=64 * mb,
                                                          max_request_bytes=256 * mb)))


# ------------------------------------------------------------------ full frames
@pytest.mark.parametrize("kind", ["sononet", "hc18"])
def test_full_frames_every_way(kind: str, predictor: Predictor, files: dict[str, Path],
                               frames: dict[str, list[np.ndarray]], client: TestClient,
                               tmp_path: Path) -> None:
    fs = frames[kind]
    pngs = sorted(files[f"png-{kind}"].glob("*.png"))
    video = files[f"video-{kind}"]
    _video_frames_are_lossless(video, fs)
    group = f"full {kind}"
    ref = [Row.of(p) for p in predictor.predict([*pngs], workers=0)]  # PNG files, in-process
    compare(group, "frames in memory (live, arrays)",
            ref, [Row.of(p) for p in predictor.predict_items(Frames(fs).items(), workers=0)])
    compare(group, "PNG files, decode-worker pool (ONNX in workers)",
            ref, [Row.of(p) for p in predictor.predict([files[f"png-{kind}"]], workers=2)])
    compare(group, "FFV1 video, predict",
            ref, [Row.of(p) for p in predictor.predict([video], workers=2)])
    compare(group, "FFV1 video, scan",
            ref, [Row.of(r.prediction) for r in scan(predictor, open_source(video)).rows])
    compare(group, "frame folder, scan",
            ref, [Row.of(r.prediction) for r in
                  scan(predictor, open_source(files[f"png-{kind}"])).rows])
    sort_images(predictor, files[f"png-{kind}"], tmp_path / "sorted-png", progress=False)
    compare(group, "PNG files, sort journal",
            ref, [Row.of_csv(r) for r in _journal(tmp_path / "sorted-png")])
    video_folder = tmp_path / "videos"
    video_folder.mkdir()
    (video_folder / video.name).write_bytes(video.read_bytes())
    sort_images(predictor, video_folder, tmp_path / "sorted-video", progress=False)
    compare(group, "FFV1 video, sort journal",
            ref, [Row.of_csv(r) for r in _journal(tmp_path / "sorted-video")])
    body = _upload(client, "/api/v1/predict", [(p.name, p.read_bytes()) for p in pngs])
    compare(group, "PNG uploads, /api/v1/predict",
            ref, [Row.of_json(d) for d in body["results"]])
    body = _upload(client, "/api/v1/predict", [(video.name, video.read_bytes())])
    compare(group, "video upload, /api/v1/predict (every frame)",
            ref, [Row.of_json(d) for d in body["results"]])
    body = _upload(client, "/api/v1/scan?window=1", [(video.name, video.read_bytes())])
    compare(group, "video upload, /api/v1/scan",
            ref, [Row.of_json(d) for d in body["timeline"]])


@pytest.mark.parametrize("kind", ["sononet", "hc18"])
def test_live_frames_over_the_websocket(kind: str, predictor: Predictor,
                                        files: dict[str, Path], client: TestClient) -> None:
    """The same PNG frames sent to /api/v1/live one after another (each after the previous
    answer, so none is dropped): one answer per frame, equal to the reference."""
    pngs = sorted(files[f"png-{kind}"].glob("*.png"))
    ref = [Row.of(p) for p in predictor.predict([*pngs], workers=0)]
    got = []
    with client.websocket_connect("/api/v1/live?window=1") as ws:
        assert ws.receive_json()["type"] == "start"
        for path in pngs:
            ws.send_bytes(path.read_bytes())
            got.append(ws.receive_json())
    assert [m["seq"] for m in got] == list(range(len(pngs)))
    assert all(m["dropped"] == 0 for m in got)
    compare(f"full {kind}", "PNG frames, /api/v1/live (WebSocket)",
            ref, [Row.of_json(m) for m in got])


# ------------------------------------------------------------------ declared regions
@pytest.mark.parametrize("kind", ["sononet", "hc18"])
def test_frames_with_a_declared_region_every_way(
    kind: str, predictor: Predictor, files: dict[str, Path],
    frames: dict[str, list[np.ndarray]], client: TestClient, tmp_path: Path
) -> None:
    fs = frames[kind]
    dicom = files[f"dicom-{kind}"]
    group = f"region {kind}"
    ref = [Row.of(p) for p in predictor.predict_items(
        Frames(fs, region=_region(kind, fs[0])).items(), workers=0)]
    compare(group, "uncompressed DICOM, predict (in-process)",
            ref, [Row.of(p) for p in predictor.predict([dicom], workers=0)])
    compare(group, "uncompressed DICOM, predict (worker pool)",
            ref, [Row.of(p) for p in predictor.predict([dicom], workers=2)])
    compare(group, "uncompressed DICOM, scan",
            ref, [Row.of(r.prediction) for r in scan(predictor, open_source(dicom)).rows])
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / dicom.name).write_bytes(dicom.read_bytes())
    sort_images(predictor, folder, tmp_path / "sorted", progress=False)
    compare(group, "uncompressed DICOM, sort journal",
            ref, [Row.of_csv(r) for r in _journal(tmp_path / "sorted")])
    body = _upload(client, "/api/v1/predict", [(dicom.name, dicom.read_bytes())])
    compare(group, "DICOM upload, /api/v1/predict (every frame)",
            ref, [Row.of_json(d) for d in body["results"]])
    body = _upload(client, "/api/v1/scan?window=1", [(dicom.name, dicom.read_bytes())])
    compare(group, "DICOM upload, /api/v1/scan",
            ref, [Row.of_json(d) for d in body["timeline"]])


def test_a_jpeg_cine_gets_one_answer_per_frame(
    predictor: Predictor, files: dict[str, Path], client: TestClient, tmp_path: Path
) -> None:
    """The issue's case (predict and scan disagreed on 90 of 356 frames): JPEG Baseline
    YBR_FULL_422 with a declared region, through predict, sort, scan and both endpoints."""
    cine = files["jpeg"]
    group = "jpeg cine"
    ref = [Row.of(p) for p in predictor.predict([cine], workers=0)]
    compare(group, "predict (worker pool)",
            ref, [Row.of(p) for p in predictor.predict([cine], workers=2)])
    compare(group, "scan", ref,
            [Row.of(r.prediction) for r in scan(predictor, open_source(cine)).rows])
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / cine.name).write_bytes(cine.read_bytes())
    sort_images(predictor, folder, tmp_path / "sorted", progress=False)
    compare(group, "sort journal", ref, [Row.of_csv(r) for r in _journal(tmp_path / "sorted")])
    body = _upload(client, "/api/v1/predict", [(cine.name, cine.read_bytes())])
    compare(group, "/api/v1/predict (every frame)",
            ref, [Row.of_json(d) for d in body["results"]])
    assert [d["frame"] for d in body["results"]] == list(range(13))
    body = _upload(client, "/api/v1/scan?window=1", [(cine.name, cine.read_bytes())])
    compare(group, "/api/v1/scan", ref, [Row.of_json(d) for d in body["timeline"]])


# ------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data]")
    pytest.importorskip("ray.data", reason="the Ray engine needs ray[data]")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_gives_the_same_answers(ray_instance: Any, predictor: Predictor,
                                    files: dict[str, Path],
                                    frames: dict[str, list[np.ndarray]]) -> None:
    from fetalplanes.inference.model_ref import ModelRef
    from fetalplanes.inference.ray_engine import RayPredictor

    remote = RayPredictor(predictor, ModelRef("sononet16"))
    pngs = sorted(files["png-sononet"].glob("*.png"))
    ref = [Row.of(p) for p in predictor.predict([*pngs], workers=0)]
    compare("full sononet", "PNG files, Ray", ref, [Row.of(p) for p in remote.predict([*pngs])])
    fs = frames["sononet"]
    ref = [Row.of(p) for p in predictor.predict_items(
        Frames(fs, region=SONONET_REGION).items(), workers=0)]
    compare("region sononet", "uncompressed DICOM, Ray",
            ref, [Row.of(p) for p in remote.predict([files["dicom-sononet"]])])
    ref = [Row.of(p) for p in predictor.predict([files["jpeg"]], workers=0)]
    compare("jpeg cine", "Ray", ref, [Row.of(p) for p in remote.predict([files["jpeg"]])])


def test_there_is_one_loop_from_input_to_result() -> None:
    """No module but the engine turns inputs into results: the classify step of the engine
    (`Predictor.classify`) is called from `Predictor.stream` and the Ray executor only."""
    import fetalplanes

    root = Path(fetalplanes.__file__).parent
    callers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     if ".classify(" in p.read_text() and "def classify" not in p.read_text())
    assert callers == ["inference/ray_engine.py"], callers
    loops = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if "iter_prepared(" in p.read_text() and p.name != "loading.py"]
    assert loops == ["inference/predictor.py"], loops


# ------------------------------------------------------------------ the DICOM network
@pytest.mark.parametrize("workers", [0, 2])
def test_the_dicom_network_gives_the_same_answers(
    workers: int, predictor: Predictor, files: dict[str, Path],
    frames: dict[str, list[np.ndarray]], tmp_path: Path
) -> None:
    """`listen` (in-process, and with its long-lived worker pool) on the uncompressed cine
    with a region and the JPEG cine, sent by dcmtk's storescu over loopback."""
    import json

    from test_dicom_network import storescu

    from fetalplanes.workflows.dicom_listen import Listener, model_info

    node = Listener(predictor, tmp_path / "out", model_info(predictor, "sononet16", "auto"),
                    port=0, settle=0.2, workers=workers)
    node.start()
    try:
        for name in ("dicom-sononet", "jpeg"):
            proc = storescu(node.port, [files[name]], "-xy" if name == "jpeg" else "-xe")
            assert proc.returncode == 0, proc.stderr
        assert node.wait_idle(120)
    finally:
        node.stop(drain_timeout=30)
    from pydicom import dcmread

    results = {p.stem: json.loads(p.read_text())
               for p in (tmp_path / "out" / "results").glob("*/*.json")}
    way = f"listen, storescu over loopback (workers={workers})"
    fs = frames["sononet"]
    references = {
        "dicom-sononet": ("region sononet", [Row.of(p) for p in predictor.predict_items(
            Frames(fs, region=SONONET_REGION).items(), workers=0)]),
        "jpeg": ("jpeg cine", [Row.of(p) for p in predictor.predict([files["jpeg"]], workers=0)]),
    }
    for name, (group, reference) in references.items():
        uid = dcmread(files[name], stop_before_pixels=True).SOPInstanceUID
        got = sorted(results[uid]["predictions"], key=lambda d: d["frame"])
        compare(group, way, reference, [Row.of_json(d) for d in got])
