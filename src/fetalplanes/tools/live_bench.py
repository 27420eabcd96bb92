"""`fetalplanes bench --only live`: the WebSocket /api/v1/live measured over loopback.

Why: a live view is only useful when the plane is named while the probe is still there.
This starts `fetalplanes serve` as its own process (the bundled SonoNet-16, per backend),
and a Python client here sends 800x600 JPEG frames (real scans from `--frames FOLDER`,
else rendered phantoms) over one WebSocket, as a capture card's frames would come:

- at 15 frames/s for `seconds` (a scanner's video, what the page sends when the model keeps
  up): latency from frame sent to answer received (p50, p95, max), answered frames/s,
  frames dropped by the server (latest wins) and the server's memory (RSS) every second:
  at the start, the middle and the end of the session, and its growth (flat = no leak);
- at 60 frames/s (the per-connection limit) for up to 30 s: more than the model can do,
  so most frames are dropped, and the latency stays that of about one frame;
- closed loop (at most two frames unanswered, as the web page sends) for up to 60 s: the
  most answers per second one connection gets, and their latency.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fetalplanes.errors import FetalPlanesError
from fetalplanes.tools.bench import (
    BenchOptions,
    BenchReport,
    Row,
    _load,
    _rollup,
    machine_info,
    start_cli,
)

FRAME_SIZE = (800, 600)  # width, height: a capture card's SD output, as in the issue
PACE_FPS = 15.0
FLOOD_FPS = 60.0
IN_FLIGHT = 2
BACKENDS = ("onnx", "onnx-int8")


def frames(folder: Path | None, n: int = 24) -> list[bytes]:
    """`n` 800x600 JPEG frames (quality 90): the images of `folder` (real scans, resized)
    or rendered phantoms of the four planes."""
    from PIL import Image

    out: list[bytes] = []
    if folder is not None:
        from fetalplanes.data.images import list_images

        paths = list_images([folder])[:n]
        if not paths:
            raise FetalPlanesError(f"{folder}: no images to send")
        images = [Image.open(p).convert("RGB") for p in paths]
    else:
        from fetalplanes.data.synth import SEED4, render_phantom

        rng = np.random.default_rng(0)
        images = [Image.fromarray(render_phantom(SEED4[i % len(SEED4)], rng)).convert("RGB")
                  for i in range(n)]
    for im in images:
        buf = io.BytesIO()
        im.resize(FRAME_SIZE).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@dataclass
class Session:
    """What one client session saw."""

    mode: str
    seconds: float
    sent: int = 0
    answered: int = 0
    dropped: int = 0
    over_rate: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (t, MB) of the server

    @property
    def fps(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def drop_rate(self) -> float:
        return (self.dropped + self.over_rate) / self.sent if self.sent else 0.0

    def q(self, p: float) -> float:
        return float(np.percentile(self.latencies_ms, p)) if self.latencies_ms else float("nan")


def _sample_rss(pid: int, out: list[tuple[float, float]], stop: threading.Event) -> None:
    start = time.monotonic()
    while not stop.wait(1.0):
        rss, _ = _rollup(pid)
        out.append((time.monotonic() - start, rss / 1024))


def run_session(url: str, data: list[bytes], seconds: float, fps: float | None,
                server_pid: int | None = None, mode: str = "") -> Session:
    """One WebSocket session: frames at `fps` (None: closed loop, `IN_FLIGHT` unanswered)
    for `seconds`, then `stop`; latencies are measured here, drops counted by the server."""
    from websockets.sync.client import connect

    session = Session(mode or (f"{fps:g}fps" if fps else "max"), seconds)
    sent_at: dict[int, float] = {}
    answered = threading.Condition()
    last = [-1]
    stop_rss = threading.Event()
    sampler = None
    if server_pid is not None:
        sampler = threading.Thread(target=_sample_rss, daemon=True,
                                   args=(server_pid, session.rss_mb, stop_rss))
        sampler.start()
    with connect(url, max_size=None, compression=None, open_timeout=60) as ws:
        if json.loads(ws.recv(timeout=60)).get("type") != "start":
            raise FetalPlanesError("bench: the live endpoint did not start a session")

        def sender() -> None:
            t0 = time.perf_counter()
            seq = 0
            while time.perf_counter() - t0 < seconds:
                if fps:
                    delay = t0 + seq / fps - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                else:
                    with answered:
                        answered.wait_for(lambda n=seq: n - last[0] - 1 < IN_FLIGHT, timeout=5)
                with answered:
                    sent_at[seq] = time.perf_counter()
                ws.send(data[seq % len(data)])
                seq += 1
            session.sent = seq
            ws.send(json.dumps({"type": "stop"}))

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        while True:
            msg = json.loads(ws.recv(timeout=120))
            if msg["type"] == "frame":
                now = time.perf_counter()
                with answered:
                    sent = sent_at.pop(msg["seq"], None)
                    for old in [s for s in sent_at if s < msg["seq"]]:
                        del sent_at[old]  # dropped by the server
                    last[0] = msg["seq"]
                    answered.notify_all()
                if sent is not None:
                    session.latencies_ms.append((now - sent) * 1000)
            elif msg["type"] == "end":
                session.answered = msg["processed"]
                session.dropped, session.over_rate = msg["dropped"], msg["over_rate"]
                break
        thread.join(timeout=30)
    stop_rss.set()
    if sampler is not None:
        sampler.join(timeout=5)
    return session


def _start_server(backend: str) -> tuple[subprocess.Popen[str], int]:
    proc, line = start_cli(["serve", "sononet16", "--port", "0", "--backend", backend],
                           "serving", "serve")
    port = int(line.rstrip().rstrip("/").rsplit(":", 1)[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # uvicorn listens a moment after the line
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, port


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def session_rows(backend: str, s: Session) -> list[Row]:
    engine = f"{backend}/cpu"
    key = f"live_{backend}_{s.mode}"
    note = (f"{s.sent} frames sent in {s.seconds:g} s, {s.answered} answered, "
            f"{s.dropped} dropped (newest kept), {s.over_rate} over the rate limit")
    rows = [
        Row(f"{key}_latency_p50_ms", f"live {s.mode}: frame sent -> answer, p50", engine, 1,
            s.q(50), "ms", note),
        Row(f"{key}_latency_p95_ms", f"live {s.mode}: frame sent -> answer, p95", engine, 1,
            s.q(95), "ms", f"max {max(s.latencies_ms, default=float('nan')):.0f} ms"),
        Row(f"{key}_fps", f"live {s.mode}: answers per second", engine, 1, s.fps, "frames/s",
            ""),
        Row(f"{key}_drop_rate", f"live {s.mode}: frames dropped / sent", engine, 1,
            s.drop_rate, "fraction", f"{s.dropped + s.over_rate} of {s.sent}"),
    ]
    if s.rss_mb:
        first, mid, end = s.rss_mb[0], s.rss_mb[len(s.rss_mb) // 2], s.rss_mb[-1]
        rows.append(Row(f"{key}_rss_mb", f"live {s.mode}: server RSS at the end", engine, "-",
                        end[1], "MB", f"start {first[1]:.0f} MB ({first[0]:.0f} s), middle "
                                      f"{mid[1]:.0f} MB ({mid[0]:.0f} s), end {end[1]:.0f} MB "
                                      f"({end[0]:.0f} s)"))
        rows.append(Row(f"{key}_rss_growth_mb", f"live {s.mode}: server RSS growth", engine,
                        "-", end[1] - first[1], "MB", "end minus start of the session"))
    return rows


def live_rows(data: list[bytes], seconds: float, backends: tuple[str, ...] = BACKENDS,
              progress: bool = True) -> list[Row]:
    """The three sessions of the module docstring, per backend, each on a fresh server."""
    rows: list[Row] = []
    for backend in backends:
        proc, port = _start_server(backend)
        url = f"ws://127.0.0.1:{port}/api/v1/live"
        try:
            run_session(url, data, 3.0, None, mode="warm-up")
            plan = ((PACE_FPS, seconds), (FLOOD_FPS, min(seconds, 30.0)),
                    (None, min(seconds, 60.0)))
            for fps, length in plan:
                if progress:
                    what = f"{fps:g} frames/s" if fps else "closed loop"
                    print(f"live bench: {backend}, {what}, {length:g} s", file=sys.stderr)
                rows += session_rows(backend, run_session(url, data, length, fps, proc.pid))
        finally:
            _stop(proc)
    return rows


def run_live_bench(opts: BenchOptions, progress: bool = True, seconds: float | None = None,
                   frames_dir: Path | None = None,
                   backends: tuple[str, ...] = BACKENDS) -> BenchReport:
    """Only the live rows (`fetalplanes bench --only live`), with machine and load."""
    started, load_start = time.perf_counter(), _load()
    length = seconds or (10.0 if opts.quick else 60.0)
    options = asdict(opts) | {"seconds": length, "frames": str(frames_dir or "phantoms"),
                              "backends": list(backends)}
    report = BenchReport(machine_info("cpu"), options)
    report.rows = live_rows(frames(frames_dir), length, backends, progress=progress)
    report.load_average = {"start": load_start, "end": _load()}
    report.seconds = time.perf_counter() - started
    return report
