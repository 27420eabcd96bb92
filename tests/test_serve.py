"""HTTP API of `fetalplanes serve`: results, bad files, limits, model card, heat maps, load."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from fetalplanes.inference.predictor import Predictor
from fetalplanes.serving import ServeSettings, create_app, exposure_warning, is_loopback
from fetalplanes.serving.app import finite
from fetalplanes.serving.batching import MicroBatcher
from fetalplanes.serving.explainer import ModuleExplainer
from fetalplanes.serving.schemas import ModelInfo, PredictResponse
from fetalplanes.serving.uploads import UploadRejected, clean_filename, read_uploads

PREDICT = "/api/v1/predict"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeExplainer:
    """Stands in for Grad-CAM: a gray PNG, and records the requested targets."""

    available = True
    reason = None

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.targets: list[int | None] = []

    def overlay(self, predictor: Any, data: bytes, name: str, target: int | None) -> bytes:
        self.targets.append(target)
        if self.fail:
            raise ValueError("no gradient\nfor this layer")
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), 128, np.uint8)).save(buf, "PNG")
        return buf.getvalue()


class Unavailable:
    available = False
    reason = "heat maps are switched off for this test"

    def overlay(self, *args: Any) -> bytes:
        raise AssertionError("must not be called when unavailable")


@pytest.fixture(scope="module")
def predictor(trained_run: Path) -> Predictor:
    return Predictor.from_run(trained_run, min_confidence=0.5)


def make_client(predictor: Predictor, explainer: Any = None, **settings: Any) -> TestClient:
    app = create_app(predictor, ServeSettings(**settings), explainer or Unavailable())
    return TestClient(app)


@pytest.fixture()
def client(predictor: Predictor) -> Iterator[TestClient]:
    with make_client(predictor) as c:
        yield c


def upload(*files: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in files]


def pngs(scans: Path, n: int) -> list[tuple[str, bytes]]:
    return [(f.name, f.read_bytes()) for f in sorted(scans.glob("*.png"))[:n]]


# ------------------------------------------------------------------ predictions


def test_predict_one_image(client: TestClient, predictor: Predictor, scans: Path) -> None:
    r = client.post(PREDICT, files=upload(*pngs(scans, 1)))
    assert r.status_code == 200, r.text
    body = PredictResponse.model_validate(r.json())
    assert body.classes == predictor.output_classes
    (res,) = body.results
    assert res.filename == "scan_0.png" and res.error is None
    assert set(res.probabilities) == set(predictor.classes)
    assert sum(res.probabilities.values()) == pytest.approx(1, abs=1e-4)
    assert res.label in [*predictor.classes, "not_target"]
    assert res.confidence == pytest.approx(max(res.probabilities.values()), abs=1e-6)
    assert res.uncertain == (not res.not_target and res.confidence < 0.5)
    assert res.heatmap is None and res.heatmap_error is None  # explain not asked for
    assert r.headers["cache-control"] == "no-store"


def test_results_match_the_python_api(
    client: TestClient, predictor: Predictor, scans: Path
) -> None:
    files = pngs(scans, 8)
    r = client.post(PREDICT, files=upload(*files))
    assert r.status_code == 200
    got = r.json()["results"]
    assert [g["filename"] for g in got] == [name for name, _ in files]
    direct = predictor.predict_bytes(files)
    for g, d in zip(got, direct, strict=True):
        assert g["label"] == d.label
        assert g["probabilities"] == pytest.approx(d.probs, abs=1e-5)


def test_bad_files_get_their_own_error(client: TestClient, scans: Path) -> None:
    (good,) = pngs(scans, 1)
    truncated = good[1][: len(good[1]) // 2]
    files = [good, ("empty.png", b""), ("notes.png", b"just text"), ("cut.png", truncated)]
    r = client.post(PREDICT, files=upload(*files))
    assert r.status_code == 200
    res = r.json()["results"]
    assert res[0]["error"] is None and res[0]["label"]
    assert "empty file" in res[1]["error"]
    assert "not an image" in res[2]["error"]
    assert "cut.png" in res[3]["error"] and "truncated" in res[3]["error"]
    assert all(x["label"] is None for x in res[1:])


def test_no_readable_image_is_415_with_details(client: TestClient) -> None:
    r = client.post(PREDICT, files=upload(("a.txt", b"hello"), ("b.png", PNG_MAGIC + b"xx")))
    assert r.status_code == 415
    body = r.json()
    assert body["detail"] == "none of the 2 files is a readable image"
    assert [x["filename"] for x in body["results"]] == ["a.txt", "b.png"]
    assert all(x["error"] for x in body["results"])


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        (dict(content=b"x", headers={"content-type": "text/plain"}), 415, "multipart/form-data"),
        (dict(data={"note": "no file"}), 415, "multipart/form-data"),
        (dict(files=[("other", ("a.png", b"x"))]), 400, "no files"),
        (
            dict(content=b"--b\r\nbroken", headers={"content-type": "multipart/form-data"}),
            400,
            "boundary",
        ),
        (
            dict(
                content=b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\nabc',
                headers={"content-type": "multipart/form-data; boundary=b"},
            ),
            400,
            "incomplete",
        ),
        (
            dict(content=b"garbage", headers={"content-type": "multipart/form-data; boundary=b"}),
            400,
            "malformed",
        ),
    ],
)
def test_malformed_requests_are_4xx(
    client: TestClient, kwargs: dict[str, Any], status: int, words: str
) -> None:
    r = client.post(PREDICT, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"] and "\n" not in r.json()["detail"]


def test_file_names_are_reduced_to_base_names() -> None:
    assert clean_filename(b"C:\\Users\\me\\scan 1.png", 0) == "scan 1.png"
    assert clean_filename(b"../../etc/passwd", 0) == "passwd"
    assert clean_filename(b"", 2) == "file3"
    assert clean_filename("é\x00.png".encode(), 0) == "é.png"


# ------------------------------------------------------------------ limits and privacy


def test_file_over_the_limit_is_413(predictor: Predictor, scans: Path) -> None:
    files = pngs(scans, 2)
    limit = len(files[0][1]) - 1
    with make_client(predictor, max_file_bytes=limit) as c:
        r = c.post(PREDICT, files=upload(*files))
    assert r.status_code == 413
    assert r.json()["detail"].startswith("scan_0.png: file too large (limit ")


def test_request_over_the_limit_is_413(predictor: Predictor, scans: Path) -> None:
    with make_client(predictor, max_request_bytes=4096) as c:
        r = c.post(PREDICT, files=upload(*pngs(scans, 2)))
    assert r.status_code == 413
    assert r.json()["detail"].startswith("request too large")
    assert r.headers["connection"] == "close"


def test_too_many_files_is_413(predictor: Predictor, scans: Path) -> None:
    with make_client(predictor, max_files=2) as c:
        assert c.post(PREDICT, files=upload(*pngs(scans, 2))).status_code == 200
        r = c.post(PREDICT, files=upload(*pngs(scans, 3)))
    assert r.status_code == 413 and "at most 2" in r.json()["detail"]


def _multipart(size: int) -> bytes:
    head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n'
    return head + b"\0" * size + b"\r\n--b--\r\n"


@pytest.mark.parametrize(("file_limit", "request_limit"), [(1000, 10**9), (10**9, 1000)])
def test_oversized_stream_is_refused_before_it_is_all_read(
    file_limit: int, request_limit: int
) -> None:
    """No Content-Length (chunked upload): reading stops at the limit, not at the end."""
    body = _multipart(100_000)
    pulled = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal pulled
        for i in range(0, len(body), 512):
            pulled += 512
            yield body[i : i + 512]

    async def read() -> None:
        await read_uploads(
            "multipart/form-data; boundary=b",
            None,
            stream(),
            max_file_bytes=file_limit,
            max_request_bytes=request_limit,
            max_files=10,
        )

    with pytest.raises(UploadRejected) as info:
        asyncio.run(read())
    assert info.value.status == 413
    assert pulled < 3000 < len(body)


def test_uploads_stay_in_memory_and_out_of_logs(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A 2 MB upload (above Starlette's 1 MB spool threshold) never touches a temp file."""

    def no_disk(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("upload written to disk")

    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    import starlette.formparsers

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", no_disk, raising=False)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (1500, 1400), np.uint8)).save(buf, "PNG")
    assert buf.tell() > 1_500_000
    caplog.set_level(logging.DEBUG)
    r = client.post(PREDICT, files=upload(("Patient0042_secret.png", buf.getvalue())))
    assert r.status_code == 200
    assert "Patient0042" not in caplog.text


def test_page_and_security_headers(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and 'id="file-input"' in r.text and 'aria-live="polite"' in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    for asset in ("app.js", "app.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "http" not in client.get("/static/app.css").text  # offline: no remote assets


# ------------------------------------------------------------------ model card and health


def test_model_endpoint_shows_the_sidecar(predictor: Predictor) -> None:
    with make_client(predictor, max_file_bytes=1234, max_request_bytes=5678) as c:
        r = c.get("/api/v1/model")
    assert r.status_code == 200
    info = ModelInfo.model_validate(r.json())
    card = predictor.card
    assert info.classes == card.classes and info.architecture == card.architecture
    assert info.calibration.temperature == pytest.approx(card.temperature)
    assert info.rejection["method"] == card.rejection["method"]
    assert info.preprocessing["size"] == list(card.preprocess.size)
    assert info.metrics["val"]["accuracy"] == pytest.approx(card.metrics["val"]["accuracy"])
    assert info.min_confidence == 0.5
    assert (info.limits.max_file_bytes, info.limits.max_request_bytes) == (1234, 5678)
    assert info.explain.available is False and "switched off" in (info.explain.reason or "")


def test_non_finite_metrics_become_null() -> None:
    assert finite({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {
        "a": None,
        "b": [1.0, None],
        "c": "x",
    }


def test_healthz_and_openapi(client: TestClient, scans: Path) -> None:
    health = client.get("/healthz").json()
    assert (health["status"], health["architecture"], health["classes"]) == (
        "ok",
        "efficientnet_lite0",
        4,
    )
    assert health["inference"]["batches"] == 0
    client.post(PREDICT, files=upload(*pngs(scans, 3)))
    assert client.get("/healthz").json()["inference"] == {
        "batches": 1,
        "files": 3,
        "largest_batch": 3,
        "most_requests_in_a_batch": 1,
    }
    spec = client.get("/openapi.json").json()
    op = spec["paths"][PREDICT]["post"]
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert {"200", "400", "413", "415"} <= set(op["responses"])
    assert client.get("/docs").status_code == 200


# ------------------------------------------------------------------ heat maps


def test_explain_with_an_explainer(predictor: Predictor, scans: Path) -> None:
    fake = FakeExplainer()
    with make_client(predictor, explainer=fake) as c:
        r = c.post(f"{PREDICT}?explain=true", files=upload(*pngs(scans, 2), ("x.txt", b"x")))
        plain = c.post(PREDICT, files=upload(*pngs(scans, 1)))
    res = r.json()["results"]
    for x in res[:2]:
        assert base64.b64decode(x["heatmap"]).startswith(PNG_MAGIC)
        assert x["heatmap_error"] is None
    assert res[2]["heatmap"] is None and res[2]["error"]  # no heat map for unreadable files
    tops = [
        predictor.classes.index(max(x["probabilities"], key=x["probabilities"].get))
        for x in res[:2]
    ]
    assert fake.targets == tops
    assert plain.json()["results"][0]["heatmap"] is None and len(fake.targets) == 2


def test_explain_failure_is_per_file(predictor: Predictor, scans: Path) -> None:
    with make_client(predictor, explainer=FakeExplainer(fail=True)) as c:
        r = c.post(f"{PREDICT}?explain=1", files=upload(*pngs(scans, 1)))
    assert r.status_code == 200
    (res,) = r.json()["results"]
    assert res["label"] and res["heatmap"] is None
    assert res["heatmap_error"] == "heat map failed: ValueError: no gradient for this layer"


def test_explain_unavailable_says_why(client: TestClient, scans: Path) -> None:
    r = client.post(f"{PREDICT}?explain=true", files=upload(*pngs(scans, 1)))
    (res,) = r.json()["results"]
    assert res["heatmap"] is None and "switched off" in res["heatmap_error"]
    assert client.post(f"{PREDICT}?explain=maybe", files=upload(*pngs(scans, 1))).status_code == 422


def test_default_explainer_uses_fetalplanes_explain(predictor: Predictor, scans: Path) -> None:
    """Whatever state fetalplanes.inference.explain is in, the answer is a heat map or a reason."""
    default = ModuleExplainer()
    with TestClient(create_app(predictor)) as c:
        info = c.get("/api/v1/model").json()["explain"]
        r = c.post(f"{PREDICT}?explain=true", files=upload(*pngs(scans, 1)))
    assert info["available"] is default.available
    (res,) = r.json()["results"]
    assert r.status_code == 200 and res["label"]
    if default.available:
        assert res["heatmap"] or res["heatmap_error"].startswith("heat map failed")
    else:
        assert res["heatmap"] is None and res["heatmap_error"] == default.reason


def test_broken_explain_module_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "no fetalplanes.nonexistent" in ModuleExplainer("fetalplanes.nonexistent").reason
    broken = ModuleExplainer("fetalplanes.errors")  # importable, but no heatmap()
    assert not broken.available and "AttributeError" in broken.reason


# ------------------------------------------------------------------ concurrency


def test_concurrent_requests_all_succeed_and_share_batches(
    predictor: Predictor, scans: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one slow batch runs, waiting requests are merged into the next model call."""
    real = predictor.predict_items  # what the server's batches run (the engine, in-process)
    active, peak = 0, 0
    lock = threading.Lock()

    def slow(items: Any, **kw: Any) -> Any:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.3)
        try:
            return list(real(items, **kw))
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(predictor, "predict_items", slow)
    files = pngs(scans, 8)
    results: dict[int, Any] = {}
    with make_client(predictor, max_concurrency=1) as c:

        def call(i: int) -> None:
            results[i] = c.post(PREDICT, files=upload(files[i], files[(i + 1) % 8]))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        stats = c.app.state.service.batcher.stats  # type: ignore[attr-defined]
    assert sorted(results) == list(range(8))
    for i, r in results.items():
        assert r.status_code == 200
        assert [x["filename"] for x in r.json()["results"]] == [files[i][0], files[(i + 1) % 8][0]]
    assert peak == 1  # --max-concurrency 1 holds
    assert stats.most_requests > 1 and stats.batches < 8


def test_batcher_keeps_order_and_spreads_errors() -> None:
    calls: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        calls.append(items)
        if -1 in items:
            raise RuntimeError("bad batch")
        return [2 * x for x in items]

    async def scenario() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(double, slots=1, max_batch=4, window_s=0.05)
        got = await asyncio.gather(*(b.submit([i, i + 100]) for i in range(3)))
        assert got == [[2 * i, 2 * i + 200] for i in range(3)]
        assert b.stats.most_requests >= 2 and len(calls) < 3
        assert await b.submit(list(range(10))) == [2 * x for x in range(10)]  # split in chunks
        with pytest.raises(RuntimeError, match="bad batch"):
            await b.submit([-1])
        await b.aclose()

    asyncio.run(scenario())


def test_heat_maps_never_overlap_other_model_work() -> None:
    """Grad-CAM hooks the shared network, so exclusive jobs wait for running batches."""
    spans: dict[str, tuple[float, float]] = {}

    def timed(name: str) -> Any:
        t0 = time.monotonic()
        time.sleep(0.15)
        spans[name] = (t0, time.monotonic())
        return name

    async def scenario() -> None:
        b: MicroBatcher[int, str] = MicroBatcher(
            lambda items: [timed(f"batch{items[0]}")] * len(items), slots=2, window_s=0
        )
        first = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.05)  # the batch is running now
        heat = asyncio.ensure_future(b.exclusive(timed, "heat"))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(b.submit([2]))  # queued behind the heat map
        assert await asyncio.gather(first, heat, second) == [["batch1"], "heat", ["batch2"]]
        await b.aclose()

    asyncio.run(scenario())
    assert spans["batch1"][1] <= spans["heat"][0]
    assert spans["heat"][1] <= spans["batch2"][0]


# ------------------------------------------------------------------ command line


def test_loopback_detection_and_warning() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(host) and exposure_warning(host) is None
    for host in ("0.0.0.0", "192.168.1.5", "example.org", "::"):
        assert not is_loopback(host)
        assert "reachable from other machines" in (exposure_warning(host) or "")


def test_serve_command(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fetalplanes import serving
    from fetalplanes.cli import app

    seen: dict[str, Any] = {}
    monkeypatch.setattr(serving, "run_server",
                        lambda a, s, sock=None: seen.update(app=a, settings=s, sock=sock))
    runner = CliRunner()
    flags = "--port 0 --max-file-mb 1 --max-request-mb 3 --max-concurrency 3 --min-confidence 0.7"
    args = ["serve", str(trained_run), *flags.split()]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    s = seen["settings"]
    assert (s.host, s.port, s.max_concurrency) == ("127.0.0.1", 0, 3)
    assert (s.max_file_bytes, s.max_request_bytes) == (2**20, 3 * 2**20)
    assert "warning" not in r.output
    with TestClient(seen["app"]) as c:
        assert c.get("/api/v1/model").json()["min_confidence"] == 0.7
    r = runner.invoke(app, [*args, "--host", "0.0.0.0"])
    assert r.exit_code == 0 and "reachable from other machines" in r.output
    r = runner.invoke(app, ["serve"])
    assert r.exit_code == 2 and "either as the first argument or with --model" in r.output


def test_onnx_backend_is_passed_through(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fetalplanes import serving
    from fetalplanes.cli import app

    asked: dict[str, Any] = {}

    def fake_from_run(run: Any, backend: str = "torch", **kw: Any) -> None:
        asked["backend"] = backend
        raise ModuleNotFoundError("no onnxruntime", name="onnxruntime")

    monkeypatch.setattr(Predictor, "from_run", fake_from_run)
    monkeypatch.setattr(serving, "run_server", lambda a, s, sock=None: None)
    r = CliRunner().invoke(app, ["serve", str(trained_run), "--backend", "onnx", "--port", "0"])
    assert asked == {"backend": "onnx"}
    assert r.exit_code == 2 and "onnxruntime, which is not installed" in r.output
    assert "pip install 'fetalplanes[onnx]'" in r.output


SHARED = Path(os.environ.get("FETALPLANES_SHARED", Path(__file__).parents[2] / "shared"))
SONONET = SHARED / "sononet"


@pytest.mark.skipif(not (SONONET / "SonoNet16.pth").is_file(), reason="shared SonoNet16 absent")
def test_zero_shot_sononet() -> None:
    """`serve --model sononet16 --weights W`: folded plane names plus the network's own class."""
    pred = Predictor.from_pretrained("sononet16", SONONET / "SonoNet16.pth", min_confidence=0.5)
    names = ["FEMUR.png", "BRAIN-CB.png", "4CH.png"]
    files = [(n, (SONONET / "example_images" / n).read_bytes()) for n in names]
    with make_client(pred) as c:
        info = c.get("/api/v1/model").json()
        r = c.post(PREDICT, files=upload(*files))
    assert info["classes"] == pred.output_classes and len(info["model_classes"]) == 14
    res = r.json()["results"]
    assert [x["label"] for x in res] == ["Fetal femur", "Fetal brain", "Fetal thorax"]
    assert [x["model_label"] for x in res] == ["Femur", "Brain (Cb.)", "4CH"]
    assert set(res[0]["probabilities"]) == set(pred.output_classes)
