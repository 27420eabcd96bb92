"""The server under hostile clients: a real uvicorn on a loopback port, raw sockets.

Host allow-list (DNS rebinding), slow loris (half-sent heads and bodies), a text field
refused as soon as it passes its limit, a bad boundary that leaves the connection usable,
the per-request pixel budget, bounded heat-map work, and many clients at once.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_faults import GOOD_PNG, gray, make_tiny_run, multipart, png

from fetalplanes.inference.predictor import Predictor
from fetalplanes.serving import ServeSettings, create_app
from fetalplanes.serving.hosts import host_name
from fetalplanes.serving.server import guarded, uvicorn_options
from fetalplanes.serving.uploads import UploadRejected, read_uploads

pytestmark = pytest.mark.slow  # real-frame, subprocess or timing tests: CI lane

PREDICT = "/api/v1/predict"
#: Short server timeouts so each slow-client test takes about a second.
FAST = dict(header_timeout_s=1.0, keep_alive_s=1.0, body_timeout_s=1.0)


class Unavailable:
    available = False
    reason = "heat maps are switched off for this test"

    def overlay(self, *args: Any) -> bytes:
        raise AssertionError("must not be called")


class SlowExplainer:
    """A heat map that takes `delay` seconds and records how many ran at once."""

    available = True
    reason = None

    def __init__(self, delay: float = 0.2):
        self.delay, self.active, self.peak, self.calls = delay, 0, 0, 0
        self.lock = threading.Lock()

    def overlay(self, predictor: Any, data: bytes, name: str, target: int | None) -> bytes:
        with self.lock:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        buf = io.BytesIO()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, "PNG")
        return buf.getvalue()


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_run(make_tiny_run(tmp_path_factory.mktemp("tiny") / "run"))


@contextmanager
def live_server(predictor: Predictor, explainer: Any = None, **kw: Any) -> Iterator[int]:
    """uvicorn serving the app as `run_server` does (Host guard, timeouts), on a free
    127.0.0.1 port, in a thread; yields the port."""
    import uvicorn

    settings = ServeSettings(**{**FAST, **kw})
    app = create_app(predictor, settings, explainer or Unavailable())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = {**uvicorn_options(settings), "port": port, "log_level": "warning"}
    server = uvicorn.Server(uvicorn.Config(guarded(app, settings), **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `s` (reading whatever it sends), or None."""
    start = time.monotonic()
    s.settimeout(0.1)
    while time.monotonic() - start < seconds:
        try:
            data = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
        if not data:
            return time.monotonic() - start
    return None


def read_response(s: socket.socket, limit: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body, read from a raw socket."""
    s.settimeout(limit)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += s.recv(65536)
    return int(lines[0].split()[1]), headers, body


def post_head(length: int, content_type: str, host: str = "127.0.0.1") -> bytes:
    return (
        f"POST {PREDICT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


MP = "multipart/form-data; boundary=b0undary"


# ------------------------------------------------------------------ Host allow-list


def test_host_names_are_parsed_strictly() -> None:
    assert host_name("127.0.0.1:8000") == "127.0.0.1"
    assert host_name("LOCALHOST.") == "localhost"
    assert host_name("[::1]:8000") == "[::1]"
    for bad in ("", "[::1", "a:b:c", "localhost:80x", "127.0.0.1:"):
        assert host_name(bad) is None, bad


def test_host_allow_list_on_a_live_server(predictor: Predictor) -> None:
    with live_server(predictor, allowed_hosts=("scanner.local",)) as port:
        answers = {}
        for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}",
                     "scanner.local", "attacker.example", f"attacker.example:{port}",
                     "127.0.0.1.attacker.example", ""):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.putrequest("GET", "/healthz", skip_host=True)
            conn.putheader("Host", host)
            conn.endheaders()
            r = conn.getresponse()
            answers[host] = (r.status, json.loads(r.read()))
            conn.close()
    for host in ("127.0.0.1", f"localhost:{port}", f"[::1]:{port}", "scanner.local"):
        assert answers[host][0] == 200, (host, answers[host])
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example"):
        status, body = answers[host]
        assert status == 400 and body["detail"].startswith(f"Host {host} is not allowed")
    assert answers[""][0] == 400


def test_serve_command_takes_allow_host(
    predictor: Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fetalplanes import serving
    from fetalplanes.cli import app

    run = make_tiny_run(tmp_path / "run")
    seen: dict[str, Any] = {}
    monkeypatch.setattr(serving, "run_server", lambda a, s, sock=None: seen.update(settings=s))
    args = ["serve", str(run), "--allow-host", "scanner.local", "--allow-host", "10.0.0.5",
            "--port", "0"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    names = seen["settings"].host_names()
    assert {"scanner.local", "10.0.0.5", "127.0.0.1", "localhost", "[::1]"} <= names
    r = CliRunner().invoke(app, ["serve", str(run), "--allow-host", "http://x/"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "not a host name" in r.stderr


def test_serve_sets_the_live_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The WebSocket's per-connection limits are options of `serve`, range-checked."""
    from test_faults import make_tiny_run
    from typer.testing import CliRunner

    from fetalplanes import serving
    from fetalplanes.cli import app

    run = make_tiny_run(tmp_path / "run")
    seen: dict[str, Any] = {}
    monkeypatch.setattr(serving, "run_server", lambda a, s, sock=None: seen.update(settings=s))
    args = ["serve", str(run), "--port", "0", "--live-max-fps", "20", "--live-max-frame-mb",
            "0.5", "--live-max-connections", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    s = seen["settings"]
    assert (s.max_live_fps, s.max_live_frame_bytes, s.max_live_connections) == (20, 524288, 2)
    r = CliRunner().invoke(app, ["serve", str(run), "--live-max-fps", "0"])
    assert r.exit_code == 2 and "--live-max-fps" in r.output


# ------------------------------------------------------------------ slow clients


def test_half_sent_head_is_closed_within_the_timeout(predictor: Predictor) -> None:
    with live_server(predictor) as port:
        s = connect(port)
        s.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        took = closed_within(s, 5)
        s.close()
        idle = connect(port)  # a connection that sends nothing at all
        idle_took = closed_within(idle, 5)
        idle.close()
    assert took is not None and 0.8 < took < 3, took
    assert idle_took is not None and idle_took < 3, idle_took


def test_dripping_head_bytes_do_not_keep_a_connection(predictor: Predictor) -> None:
    """A byte every 0.3 s resets uvicorn's keep-alive timer; the head deadline still holds."""
    with live_server(predictor) as port:
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(s)[0] == 200
        start, closed = time.monotonic(), False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: aaaaaaaaaaaaaaaaaaaaaa":
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if closed_within(s, 0.3) is not None:
                closed = True
                break
        s.close()
    assert closed and time.monotonic() - start < 4


def test_half_sent_body_gets_408_within_the_timeout(predictor: Predictor) -> None:
    with live_server(predictor) as port:
        s = connect(port)
        body = multipart([("files", "a.png", GOOD_PNG)])
        s.sendall(post_head(len(body), MP) + body[:100])
        start = time.monotonic()
        status, headers, answer = read_response(s)
        took = time.monotonic() - start
        gone = closed_within(s, 3)
        s.close()
    assert status == 408 and 0.8 < took < 3, (status, took)
    assert json.loads(answer)["detail"] == "upload stalled: no data for 1 s"
    assert headers["connection"] == "close" and gone is not None


def test_stalled_and_slow_uploads_are_refused() -> None:
    body = multipart([("files", "a.png", GOOD_PNG)])

    async def stalled() -> AsyncIterator[bytes]:
        yield body[:50]
        await asyncio.sleep(30)
        yield body[50:]

    async def dripping() -> AsyncIterator[bytes]:
        for i in range(len(body)):
            await asyncio.sleep(0.01)
            yield body[i : i + 1]

    async def read(stream: AsyncIterator[bytes], **kw: float) -> list[Any]:
        return await read_uploads(MP, None, stream, max_file_bytes=10**6,
                                  max_request_bytes=10**7, max_files=5, **kw)

    for stream, kw, detail in [
        (stalled(), dict(body_timeout_s=0.2), "upload stalled: no data for 0.2 s"),
        (dripping(), dict(body_timeout_s=1.0, upload_timeout_s=0.3),
         "upload not finished within 0.3 s"),
    ]:
        start = time.monotonic()
        with pytest.raises(UploadRejected) as info:
            asyncio.run(read(stream, **kw))
        assert (info.value.status, info.value.detail) == (408, detail)
        assert time.monotonic() - start < 2


def test_oversized_head_is_refused(predictor: Predictor) -> None:
    with live_server(predictor, max_header_bytes=4096) as port:
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000)
        status = read_response(s)[0]
        s.close()
    assert status in (400, 431)


# ------------------------------------------------------------------ multipart


def test_oversized_text_field_is_refused_early(predictor: Predictor) -> None:
    """A 100 MB text field is refused once it passes 64 KiB, long before it is all sent."""
    declared = 100 * 1024 * 1024
    head = b'--b0undary\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
    with live_server(predictor) as port:
        s = connect(port)
        s.sendall(post_head(declared, MP) + head)
        sent, chunk = 0, b"y" * 65536
        while sent < declared:
            if select.select([s], [], [], 0)[0]:
                break  # the server has answered
            try:
                s.sendall(chunk)
            except OSError:  # the server closed its side
                break
            sent += len(chunk)
        status, headers, body = read_response(s)
        s.close()
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["detail"].startswith("form field note: too large (limit 64 KiB")
    assert sent < 16 * 1024 * 1024, sent  # socket buffers, not the whole field


def test_long_boundary_is_400_and_the_connection_still_works(predictor: Predictor) -> None:
    boundary = "z" * 71
    bad = multipart([("files", "a.png", GOOD_PNG)], boundary)
    good = multipart([("files", "a.png", GOOD_PNG)])
    with live_server(predictor) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        kind = f"multipart/form-data; boundary={boundary}"
        conn.request("POST", PREDICT, bad, {"Content-Type": kind})
        first = conn.getresponse()
        detail = json.loads(first.read())["detail"]
        conn.request("POST", PREDICT, good, {"Content-Type": MP})  # same connection
        second = conn.getresponse()
        results = json.loads(second.read())["results"]
        conn.close()
    assert first.status == 400
    assert detail == "multipart boundary is longer than 70 characters (RFC 2046)"
    assert second.status == 200 and results[0]["label"]


def test_garbage_requests_never_get_a_500(predictor: Predictor) -> None:
    bodies = [
        (b"\r\n".join([b"--b0undary"] * 50), MP),
        (b"--b0undary\r\nContent-Disposition: form-data; name=files; filename*=UTF-8''%FF\r\n"
         b"\r\nx\r\n--b0undary--\r\n", MP),
        (b"--b0undary\r\n\r\n\r\n--b0undary--\r\n", MP),
        (b"x", "multipart/form-data; boundary=\x7f"),
        (b"x", "multipart/form-data; boundary=" + "é" * 3),
        (b"x", "multipart/mixed; boundary=b0undary"),
    ]
    with live_server(predictor) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        statuses = []
        for body, content_type in bodies:
            conn.putrequest("POST", PREDICT)
            conn.putheader("Content-Type", content_type.encode("utf-8"))
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            r = conn.getresponse()
            detail = json.loads(r.read())["detail"]
            statuses.append(r.status)
            assert "\n" not in detail
            if r.getheader("connection") == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.close()
    assert all(400 <= s < 500 for s in statuses), statuses


# ------------------------------------------------------------------ work bounds


def test_pixel_budget_per_request(predictor: Predictor) -> None:
    big = png(gray(400, 500))  # 0.2 megapixels
    files = [("files", f"{i}.png", big) for i in range(5)]
    with live_server(predictor, max_request_pixels=500_000) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", PREDICT, multipart(files), {"Content-Type": MP})
        r = conn.getresponse()
        results = json.loads(r.read())["results"]
        conn.close()
    assert r.status == 200
    errors = [x["error"] for x in results]
    assert errors[:2] == [None, None]
    assert all(e.startswith(f"{i}.png: over this request's pixel budget (0.5 megapixels")
               for i, e in list(enumerate(errors))[2:])


def test_heat_maps_are_bounded(predictor: Predictor) -> None:
    """At most `max_heatmap_requests` requests make heat maps; others hear 'busy' at once,
    and one request gets at most `max_heatmaps_per_request` of them."""
    explainer = SlowExplainer(0.3)
    settings = ServeSettings(max_heatmap_requests=1, max_heatmaps_per_request=2)
    app = create_app(predictor, settings, explainer)
    files = [("files", (f"{i}.png", png(gray(seed=i)), "image/png")) for i in range(3)]
    with TestClient(app) as c, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: c.post(f"{PREDICT}?explain=true", files=files),
                                range(4)))
    assert all(a.status_code == 200 for a in answers)
    per_request = [[x["heatmap_error"] for x in a.json()["results"]] for a in answers]
    made = [r for r in per_request if r[0] is None]
    busy = [r for r in per_request if r[0] and r[0].startswith("server busy")]
    assert made and busy and len(made) + len(busy) == 4, per_request
    for r in made:
        assert r[:2] == [None, None] and r[2].startswith("heat maps are limited to 2 per request")
    assert explainer.peak == 1 and explainer.calls == 2 * len(made)
    assert all(x["label"] for a in answers for x in a.json()["results"])


@pytest.mark.slow
def test_many_clients_at_once(predictor: Predictor) -> None:
    """32 clients x 4 requests of 3 files, some with a bad file: all answered correctly."""
    bodies = [
        multipart([("files", "a.png", png(gray(seed=i))), ("files", "b.png", b"not an image"),
                   ("files", "c.png", GOOD_PNG)])
        for i in range(4)
    ]
    with live_server(predictor, max_concurrency=2) as port:

        def client(i: int) -> list[int]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            seen = []
            for body in bodies:
                conn.request("POST", PREDICT, body, {"Content-Type": MP})
                r = conn.getresponse()
                res = json.loads(r.read())["results"]
                assert [x["error"] is None for x in res] == [True, False, True]
                seen.append(r.status)
            conn.close()
            return seen

        with ThreadPoolExecutor(32) as pool:
            statuses = [s for seen in pool.map(client, range(32)) for s in seen]
    assert statuses == [200] * 128
