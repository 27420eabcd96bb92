"""Live plane recognition: the WebSocket protocol of /api/v1/live, driven from Python.

The bundled SonoNet-16 (ONNX Runtime) on real frames (the SonoNet screen captures of
shared/): a session's per-frame results are those of `scan` on the same frames, its
smoothed labels, segments and best frames too; frames arriving while the model is busy are
dropped, newest kept (made deterministic with a model that waits to be released); limits
per connection; the Host allow-list and Origin check on the handshake; a real uvicorn
server keeps a session open past its request-head timeout.
"""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicomfiles import real_frames
from fastapi.testclient import TestClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from fetalplanes.data.sources import FrameFolder
from fetalplanes.inference.predictor import Predictor
from fetalplanes.serving import ServeSettings, create_app
from fetalplanes.serving.server import guarded
from fetalplanes.workflows.scan import plane_filename, scan

OWN = ("label", "confidence", "not_target", "uncertain", "probabilities", "model_label",
       "model_confidence", "rejection_score", "error")


def png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load("sononet16")  # ONNX Runtime, fp32


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return real_frames("sononet", 13, scale=2)  # 487x367 RGB: quick, still real


def client_for(predictor: Predictor, **kw: Any) -> TestClient:
    return TestClient(create_app(predictor, ServeSettings(**kw)))


def own(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d.get(k) for k in OWN}


def answers(ws: Any, n: int) -> list[dict[str, Any]]:
    return [ws.receive_json() for _ in range(n)]


# ------------------------------------------------------------------ equal to scan
@pytest.mark.slow
def test_a_session_gives_scan_results_frame_by_frame(
    predictor: Predictor, tmp_path: Path
) -> None:
    """The sweep of test_video (real captures, four planes, transitions) sent as PNG frames,
    each after the previous answer (no drops): every frame's own result is scan's, and the
    smoothed rows (window 5, reported two frames late, the last two at `stop`), segments,
    best frames and the checklist are scan's too."""
    from test_video import PLANE_OF, segments, sweep

    sweep_frames, names = sweep()
    folder = tmp_path / "frames"
    folder.mkdir()
    data = [png(f) for f in sweep_frames]
    for i, d in enumerate(data):
        (folder / f"f{i:03d}.png").write_bytes(d)
    reference = scan(predictor, FrameFolder(folder), window=5, workers=0)

    with client_for(predictor).websocket_connect("/api/v1/live?window=5") as ws:
        start = ws.receive_json()
        assert start["type"] == "start" and start["lag_frames"] == 2
        assert start["checklist"]["checklist"]["name"] == "seed4-planes"
        got = []
        for d in data:
            ws.send_bytes(d)
            got.append(ws.receive_json())
        ws.send_text(json.dumps({"type": "stop"}))
        end = ws.receive_json()

    assert [m["seq"] for m in got] == list(range(len(data)))
    assert [m["frame"] for m in got] == list(range(len(data)))
    for msg, row in zip(got, reference.rows, strict=True):
        assert own(msg) == own(row.prediction.to_dict()), msg["seq"]
    assert all(m["dropped"] == 0 and m["over_rate"] == 0 for m in got)
    assert got[-1]["processed"] == got[-1]["received"] == len(data)

    smoothed = [m["smoothed"] for m in got if m["smoothed"] is not None] + end["final"]
    assert [m["smoothed"] for m in got[:2]] == [None, None]  # window // 2 frames late
    assert [s["seq"] for s in smoothed] == list(range(len(data)))
    for s, row in zip(smoothed, reference.rows, strict=True):
        want = row.to_dict()["smoothed"]
        assert {k: s[k] for k in want} == want, s["seq"]

    timeless = [{k: v for k, v in s.to_dict().items() if not k.endswith("_s")} |
                {"best": {k: v for k, v in s.to_dict()["best"].items() if k != "time_s"}}
                for s in reference.segments]  # live times are arrival times, not frame/fps
    assert [{k: v for k, v in s.items() if not k.endswith("_s")} |
            {"best": {k: v for k, v in s["best"].items() if k != "time_s"}}
            for s in end["segments"]] == timeless
    assert {b["plane"]: b["frame"] for b in end["best"]} == \
        {p: b.frame for p, b in reference.best.items()}
    assert reference.found == list(PLANE_OF.values())  # the sweep shows all four planes
    assert end["checklist"]["present"] == [
        "Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax"]
    # best-frame updates came as they changed, and the last one per plane is the final best
    last = {}
    for m in got:
        for b in m.get("best", []):
            last[b["plane"]] = b["frame"]
    assert last == {b["plane"]: b["frame"] for b in end["best"]}
    for plane, (first, final) in segments(names).items():
        assert first <= last[plane] <= final  # a frame of that plane's stretch
    changes = [m for m in got if "checklist" in m]
    assert [len(m["checklist"]["present"]) for m in changes] == [1, 2, 3, 4]


# ------------------------------------------------------------------ latest wins
class GatedPredictor(Predictor):
    """The real model, but each call waits until the test releases it: frames sent
    meanwhile pile up in the slot, deterministically."""

    def __init__(self, inner: Predictor):
        super().__init__(inner.backend, inner.card, inner.min_confidence, inner.fold)
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)

    def stream(self, items: Any, **kw: Any) -> Iterator[Any]:
        self.started.release()
        assert self.release.acquire(timeout=60), "the test never released the model"
        yield from super().stream(items, **kw)


def test_frames_arriving_while_the_model_is_busy_are_dropped_newest_kept(
    predictor: Predictor, frames: list[np.ndarray]
) -> None:
    gated = GatedPredictor(predictor)
    data = [jpeg(f) for f in frames[:6]]
    with client_for(gated).websocket_connect("/api/v1/live?window=1") as ws:
        assert ws.receive_json()["type"] == "start"
        ws.send_bytes(data[0])
        assert gated.started.acquire(timeout=60)  # frame 0 is in the model
        for d in data[1:]:  # frames 1-5 arrive meanwhile: 1-4 are replaced, 5 waits
            ws.send_bytes(d)
        ws.send_text(json.dumps({"type": "stats"}))  # answered after the frames are read
        stats = ws.receive_json()
        assert stats == {"type": "stats", "received": 6, "processed": 0, "dropped": 4,
                         "over_rate": 0}
        gated.release.release()
        first = ws.receive_json()
        assert gated.started.acquire(timeout=60)
        gated.release.release()
        second = ws.receive_json()
        ws.send_text(json.dumps({"type": "stop"}))
        end = ws.receive_json()
    assert (first["seq"], second["seq"]) == (0, 5)
    assert (first["dropped"], second["dropped"]) == (4, 4)
    assert second["processed"] == 2 and second["received"] == 6
    assert end["type"] == "end" and end["dropped"] == 4 and end["processed"] == 2
    reference = predictor.predict_bytes([("f5.jpg", data[5])])[0].to_dict()
    assert own(second) == own(reference)  # the newest frame's own answer
    assert second["smoothed"]["seq"] == 5  # window 1: its own smoothed label, at once


# ------------------------------------------------------------------ limits
def test_a_frame_over_the_size_limit_closes_the_session(
    predictor: Predictor, frames: list[np.ndarray]
) -> None:
    data = png(frames[0])
    client = client_for(predictor, max_live_frame_bytes=len(data) - 1)
    with client.websocket_connect("/api/v1/live") as ws:
        assert ws.receive_json()["limits"]["max_frame_bytes"] == len(data) - 1
        ws.send_bytes(data)
        error = ws.receive_json()
        assert error["type"] == "error" and "over this server's limit" in error["detail"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1009


def test_frames_over_the_rate_are_dropped_unread_and_bad_frames_answered(
    predictor: Predictor, frames: list[np.ndarray]
) -> None:
    client = client_for(predictor, max_live_fps=0.001)  # one frame now, the next in 1000 s
    with client.websocket_connect("/api/v1/live") as ws:
        ws.receive_json()
        ws.send_bytes(jpeg(frames[0]))
        for _ in range(5):
            ws.send_bytes(jpeg(frames[1]))
        answer = ws.receive_json()
        ws.send_text(json.dumps({"type": "stats"}))
        stats = ws.receive_json()
    assert answer["seq"] == 0 and answer["label"]
    assert stats["received"] == 6 and stats["over_rate"] == 5 and stats["processed"] == 1

    with client_for(predictor).websocket_connect("/api/v1/live") as ws:
        ws.receive_json()
        ws.send_bytes(b"GIF89a not a frame")  # refused before the model; the session goes on
        assert ws.receive_json() == {"type": "error", "seq": 0,
                                     "detail": "frame 0 is not a JPEG, PNG or WebP image"}
        ws.send_bytes(b"\xff\xd8\xff truncated JPEG")  # the engine's one-line error
        broken = ws.receive_json()
        assert broken["seq"] == 1 and broken["error"] and "label" not in broken
        ws.send_text("hello")
        assert ws.receive_json()["type"] == "error"
        ws.send_bytes(jpeg(frames[2]))
        assert ws.receive_json()["seq"] == 2


def test_bad_parameters_and_too_many_sessions_are_refused_with_a_reason(
    predictor: Predictor,
) -> None:
    client = client_for(predictor, max_live_connections=1)
    for query, text in (("window=4", "window must be odd"), ("window=x", "window must be"),
                        ("checklist=../../etc/passwd", "unknown checklist")):
        with client.websocket_connect(f"/api/v1/live?{query}") as ws:
            error = ws.receive_json()
            assert error["type"] == "error" and text in error["detail"], query
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1008
    with client.websocket_connect("/api/v1/live?checklist=none") as first:
        assert first.receive_json()["checklist"] is None
        with client.websocket_connect("/api/v1/live") as second:
            assert "server busy" in second.receive_json()["detail"]
            with pytest.raises(WebSocketDisconnect) as closed:
                second.receive_json()
            assert closed.value.code == 1013
    with client.websocket_connect("/api/v1/live") as again:  # the slot was given back
        assert again.receive_json()["type"] == "start"


class BrokenPredictor(Predictor):
    """The real model's card, but the network fails on every frame."""

    def __init__(self, inner: Predictor):
        super().__init__(inner.backend, inner.card, inner.min_confidence, inner.fold)

    def stream(self, items: Any, **kw: Any) -> Iterator[Any]:
        raise RuntimeError("the accelerator fell over")


def test_a_failing_model_ends_the_session_with_a_reason_and_a_log_line(
    predictor: Predictor, frames: list[np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    with client_for(BrokenPredictor(predictor)).websocket_connect("/api/v1/live") as ws:
        ws.receive_json()
        ws.send_bytes(jpeg(frames[0]))
        error = ws.receive_json()
        assert error == {"type": "error", "detail": "internal server error; see the server log"}
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1011
    assert "live session failed: RuntimeError: the accelerator fell over" in caplog.text


def test_host_allow_list_and_origin_apply_to_the_handshake(predictor: Predictor) -> None:
    settings = ServeSettings(allowed_hosts=("testserver", "scanner.local"))
    client = TestClient(guarded(create_app(predictor, settings), settings))
    for headers in ({}, {"host": "scanner.local:8000"},
                    {"origin": "http://scanner.local:8000"}, {"origin": "http://127.0.0.1"}):
        with client.websocket_connect("/api/v1/live", headers=headers) as ws:
            assert ws.receive_json()["type"] == "start", headers
    for headers in ({"host": "attacker.example"}, {"host": "127.0.0.1.attacker.example"},
                    {"origin": "http://attacker.example"}, {"origin": "null"},
                    {"origin": "file://"}):
        with (pytest.raises(WebSocketDisconnect) as refused,
              client.websocket_connect("/api/v1/live", headers=headers) as ws):
            ws.receive_json()
        assert refused.value.code == 1008, headers
    assert client.get("/healthz", headers={"host": "attacker.example"}).status_code == 400


# ------------------------------------------------------------------ a real server
@pytest.mark.slow
def test_a_real_server_keeps_a_session_past_its_head_timeout_and_guards_hosts(
    predictor: Predictor, frames: list[np.ndarray]
) -> None:
    """uvicorn as `fetalplanes serve` runs it: the request-head timer of the HTTP protocol
    must not close an upgraded connection; a bad Host is refused at the handshake."""
    from test_server_hardening import live_server
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with live_server(predictor, header_timeout_s=0.5) as port:
        url = f"ws://127.0.0.1:{port}/api/v1/live?window=1"
        with connect(url, max_size=None) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "start"
            time.sleep(1.5)  # three head timeouts
            for i in range(3):
                ws.send(jpeg(frames[i]))
                assert json.loads(ws.recv(timeout=60))["seq"] == i
        with pytest.raises(InvalidStatus) as refused:  # Host from the URL, socket to us
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            connect(f"ws://attacker.example:{port}/api/v1/live", sock=sock).close()
        assert refused.value.response.status_code == 403


# ------------------------------------------------------------------ scan --live
def test_a_live_stream_keeps_the_newest_frame_and_counts_the_rest() -> None:
    """The reader takes frames as they come; frames the consumer has not taken yet are
    replaced (dropped, counted), newest kept; the stream's end ends the items."""
    from fetalplanes.data.sources import LiveStream

    produced = threading.Semaphore(0)
    gate = threading.Event()
    frames_in = [np.full((4, 4), i, np.uint8) for i in range(6)]

    def read() -> np.ndarray | None:
        if not frames_in:
            return None
        if len(frames_in) == 5:  # frame 0 was taken; hold frames 1-5 until the test says
            gate.wait(30)
        produced.release()
        return frames_in.pop(0)

    stream = LiveStream(read, "probe", fps=10)
    items = stream.items()
    first = next(items)
    assert first.frame == 0 and first.name == "probe#frame=0"
    gate.set()
    for _ in range(5):
        assert produced.acquire(timeout=30)
    deadline = time.monotonic() + 30
    while stream.received < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    rest = list(items)  # frames 1-4 were replaced while nobody took them: 5 is next
    assert [it.frame for it in rest] == [5] and int(rest[0].pixels[0, 0]) == 5
    assert (stream.received, stream.dropped, stream.ended) == (6, 4, "the stream ended")
    assert rest[0].time_s is not None and rest[0].time_s >= 0


def test_live_sources_are_devices_or_network_streams_never_files(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fetalplanes.cli import app
    from fetalplanes.data.video import stream_target
    from fetalplanes.errors import ImageError

    assert stream_target("0") == ("device", 0)
    assert stream_target("udp://127.0.0.1:5000") == ("url", "udp://127.0.0.1:5000")
    assert stream_target("RTSP://scanner/live")[0] == "url"
    for spec in ("file:///etc/passwd", "/etc/passwd", "concat:a.ts|b.ts", "pipe:0",
                 "subfile:,start,0,end,10,:/etc/passwd", "clip.mp4", "/dev/sda",
                 "/dev/video99999", "data:video/mp4;base64,AAAA", "ftp://host/x.ts"):
        with pytest.raises(ImageError, match=r"not a capture device|no such capture"):
            stream_target(spec)
    r = CliRunner().invoke(app, ["scan", "sononet16", "--live", "file:///etc/passwd",
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "not a capture device" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    r = CliRunner().invoke(app, ["scan", "sononet16", "clip.mp4", "--duration", "3"])
    assert r.exit_code == 2 and "--duration goes with --live" in r.output


LONG_PLAN = (("ABDOMINAL", 20), ("KIDNEYS", 6), ("BRAIN-CB", 20), ("SPINE-SAGITTAL", 6),
             ("FEMUR", 20), ("PROFILE", 6), ("4CH", 20))
"""A slower sweep than test_video's: each plane held 2 s at 10 fps, so a live reader that
drops frames still sees every plane for many frames."""


def long_sweep(folder: Path) -> Path:
    """The sweep's frames as PNG files (real captures, shifted; transitions with noise)."""
    from test_video import PLANE_OF, _capture, _transition

    rng = np.random.default_rng(1)
    folder.mkdir()
    i = 0
    for name, n in LONG_PLAN:
        capture = _capture(name)
        for k in range(n):
            frame = (np.roll(capture, (k % 3 - 1, k % 9 - 4), (0, 1)) if name in PLANE_OF
                     else _transition(capture, rng))
            Image.fromarray(frame).save(folder / f"f{i:04d}.png", compress_level=1)
            i += 1
    return folder


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_scan_live_reads_a_udp_stream_and_writes_timeline_and_best_frames(
    tmp_path: Path,
) -> None:
    """`scan --live udp://127.0.0.1:PORT` fed by ffmpeg streaming the sweep (MPEG-TS over
    loopback UDP, at its own pace): the planes come in the sweep's order, each best frame
    is one of its plane's captures, and the files are written when the stream ends."""
    import csv
    import shutil
    import subprocess
    import sys

    from test_video import PLANE_OF, _capture

    from fetalplanes.data.crop import to_gray

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("ffmpeg not found (apt-get install ffmpeg); live stream test skipped")
    frames = long_sweep(tmp_path / "frames")
    clip = tmp_path / "sweep.ts"
    subprocess.run([ffmpeg, "-loglevel", "error", "-y", "-framerate", "10", "-i",
                    str(frames / "f%04d.png"), "-c:v", "mpeg2video", "-q:v", "2", "-g", "1",
                    "-pix_fmt", "yuv420p", str(clip)], check=True, timeout=120)
    port = free_udp_port()
    out = tmp_path / "live"
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err_file:
        scanner = subprocess.Popen(
            [sys.executable, "-m", "fetalplanes", "scan", "sononet16", "--live",
             f"udp://127.0.0.1:{port}", "--duration", "60", "--timeout", "5", "--out",
             str(out)], stdout=subprocess.PIPE, stderr=err_file)
        try:
            deadline = time.monotonic() + 60
            while b"live: opening" not in log.read_bytes():
                assert scanner.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "scan --live did not start"
                time.sleep(0.1)
            time.sleep(1.0)  # FFmpeg binds the port right after the line
            subprocess.run([ffmpeg, "-loglevel", "error", "-re", "-i", str(clip), "-c", "copy",
                            "-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"],
                           check=True, timeout=60)
            stdout, _ = scanner.communicate(timeout=60)
        finally:
            if scanner.poll() is None:
                scanner.kill()
    text = stdout.decode()
    print(text)
    assert scanner.returncode == 0, log.read_text()
    assert "(the stream ended)" in text and "missing: none" in text
    assert re.search(r"(\d+) dropped", text)
    with (out / "timeline.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["frame"]) for r in rows] == sorted({int(r["frame"]) for r in rows})
    runs: list[str] = []
    for r in rows:
        accepted = r["smoothed_not_target"] == "0" and r["smoothed_uncertain"] == "0"
        if accepted and (not runs or runs[-1] != r["smoothed_label"]):
            runs.append(r["smoothed_label"])
    order = [PLANE_OF[name] for name, _ in LONG_PLAN if name in PLANE_OF]
    assert runs == order, runs
    captures = {PLANE_OF[n]: to_gray(_capture(n)).astype(np.int16) for n in PLANE_OF}
    for plane in order:
        best = np.asarray(Image.open(out / "best" / plane_filename(plane)), np.int16)
        diffs = {p: float(np.abs(best - c).mean()) for p, c in captures.items()}
        assert min(diffs, key=diffs.__getitem__) == plane, (plane, diffs)


# ------------------------------------------------------------------ the bench
@pytest.mark.slow
def test_the_live_bench_measures_a_session_against_a_real_server(predictor: Predictor) -> None:
    """`bench --only live` in small: one 2 s session at 15 frames/s against uvicorn; the
    counts add up (every frame sent is answered or dropped) and the rows name them."""
    import os

    from test_server_hardening import live_server

    from fetalplanes.tools.live_bench import FRAME_SIZE, frames, run_session, session_rows

    data = frames(None, 4)
    assert Image.open(io.BytesIO(data[0])).size == FRAME_SIZE
    with live_server(predictor) as port:
        s = run_session(f"ws://127.0.0.1:{port}/api/v1/live", data, 2.0, 15.0,
                        server_pid=os.getpid())
    assert s.sent >= 20 and s.answered + s.dropped + s.over_rate == s.sent
    assert len(s.latencies_ms) == s.answered and min(s.latencies_ms) > 0
    assert s.rss_mb and all(mb > 0 for _, mb in s.rss_mb)
    rows = {r.key: r for r in session_rows("onnx", s)}
    assert rows["live_onnx_15fps_fps"].value == pytest.approx(s.answered / 2.0)
    assert rows["live_onnx_15fps_drop_rate"].value == pytest.approx(s.drop_rate)
    assert "live_onnx_15fps_rss_growth_mb" in rows


def test_bench_live_options_are_checked() -> None:
    from typer.testing import CliRunner

    from fetalplanes.cli import app

    r = CliRunner().invoke(app, ["bench", "--seconds", "5"])
    assert r.exit_code == 2 and "go with --only live" in r.output
    r = CliRunner().invoke(app, ["bench", "--only", "live", "--backend", "torch"])
    assert r.exit_code == 2 and "choose onnx or onnx-int8" in r.output
