"""Security: no input reaches an interpreter, requests cannot hide requests, uploads are bounded.

- Only allow-listed formats, decided from the bytes, reach a decoder: a PostScript file
  named `scan.png` that prints a CSV row and writes a file is refused in the CLI and the
  server, with Debian's Ghostscript installed; Pillow's EPS plugin is never reached.
- Video readers only see allowed containers (never a playlist or a FIFO).
- The server refuses Content-Length + Transfer-Encoding (request smuggling) and request
  heads over its limit, even when the whole head arrives in one read.
- Decoding memory is bounded by bytes (`decode_cost`, `DecodeBudget`), and a server under
  hostile and good uploads answers no 5xx, stays within 1 GB above idle and writes nothing
  to its temporary folder, working folder or home (ONNX Runtime's telemetry is off).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fetalplanes.data.formats import image_format, pillow_open, refused_kind, video_format
from fetalplanes.data.images import decode_cost, decode_image
from fetalplanes.data.sources import VideoFile as VideoSource
from fetalplanes.data.sources import open_source
from fetalplanes.errors import ImageError
from fetalplanes.serving.batching import DecodeBudget
from fetalplanes.serving.framing import framing_problem, head_bytes

GS = shutil.which("gs")


def postscript(marker_file: Path) -> bytes:
    """A PostScript program that prints a CSV row and writes `marker_file` when interpreted."""
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
        b"(INTERPRETED,Fetal brain,0.99\\n) print flush\n"
        b"/f (" + str(marker_file).encode() + b") (w) file def f (pwned) writestring f closefile\n"
        b"newpath 0 0 moveto 64 64 lineto stroke showpage\n"
    )


def encoded(fmt: str, mode: str = "L", size: tuple[int, int] = (64, 48), **kw: object) -> bytes:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


ALLOWED = {
    "PNG": encoded("PNG"),
    "JPEG": encoded("JPEG", "RGB"),
    "TIFF": encoded("TIFF"),
    "BMP": encoded("BMP", "RGB"),
    "WEBP": encoded("WEBP", "RGB", lossless=True),
    "GIF": encoded("GIF"),
}


# ------------------------------------------------------------------ formats


def test_allowed_formats_are_named_from_their_bytes() -> None:
    for fmt, data in ALLOWED.items():
        assert image_format(data) == fmt
        assert decode_image(data, f"x.{fmt.lower()}").shape == (48, 64)
    assert image_format(b"%!PS-Adobe-3.0") is None
    assert refused_kind(b"%!PS-Adobe-3.0 EPSF") == "a PostScript file"
    assert refused_kind(b"\xc5\xd0\xd3\xc6rest") == "an EPS file"
    assert refused_kind(b"%PDF-1.7") == "a PDF file"
    assert refused_kind(b"  <svg xmlns=") == "an SVG file"


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\nshowpage\n", "PostScript"),
        (b"\xc5\xd0\xd3\xc6" + b"\0" * 40, "EPS"),
        (b"%PDF-1.4\n1 0 obj<<>>endobj\n", "PDF"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"P5\n4 4\n255\n" + bytes(16), "unrecognised"),  # PGM: Pillow reads it, we do not
        (b"\x00\x00\x01\x00" + bytes(60), "ICO"),
    ],
)
def test_other_formats_are_refused_in_one_line(data: bytes, kind: str) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(data, "scan.png")
    message = str(info.value)
    assert message.startswith("scan.png: ") and kind in message and "\n" not in message


def test_pillows_eps_plugin_is_never_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with every Pillow plugin registered, a PostScript file never gets to EPS."""
    from PIL import EpsImagePlugin

    Image.init()  # all plugins registered, as another library might have done

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow's EPS plugin was reached")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", boom)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", boom)
    for data in (postscript(Path("/nonexistent/x")), b"\xc5\xd0\xd3\xc6" + b"\0" * 40):
        with pytest.raises(ImageError):
            decode_image(data, "scan.png")
    for fmt, data in ALLOWED.items():  # the allowed formats still decode
        assert decode_image(data, fmt).ndim == 2
    with pytest.raises(ValueError):
        pillow_open(ALLOWED["PNG"], "EPS")


def test_eps_plugin_is_not_even_imported() -> None:
    """In a fresh process, decoding every allowed format and refusing PostScript leaves
    Pillow's EPS plugin unimported (only the allowed plugins are registered)."""
    code = (
        "import sys\n"
        "from fetalplanes.data.images import decode_image\n"
        "from fetalplanes.errors import ImageError\n"
        f"for d in {list(ALLOWED.values())!r}: decode_image(d, 'x')\n"
        "try:\n    decode_image(b'%!PS-Adobe-3.0\\nshowpage\\n', 'scan.png')\n"
        "except ImageError: pass\n"
        "print('EPS' if 'PIL.EpsImagePlugin' in sys.modules else 'clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


@pytest.mark.slow
@pytest.mark.skipif(GS is None, reason="Ghostscript (gs) is missing: scripts/test.sh installs it")
def test_predict_never_runs_postscript(tmp_path: Path) -> None:
    """The tester's case, with Ghostscript installed: before the fix the file's own print
    reached stdout as a CSV row and it wrote a file."""
    marker = tmp_path / "written-by-postscript.txt"
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "scan.png").write_bytes(postscript(marker))
    (scans / "good.png").write_bytes(ALLOWED["PNG"])
    out = subprocess.run(
        [sys.executable, "-m", "fetalplanes", "predict", "sononet16", str(scans),
         "--format", "csv", "-q"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr  # the good file was classified
    assert "INTERPRETED" not in out.stdout + out.stderr
    assert not marker.exists()
    assert "scan.png: not an image but a PostScript file" in out.stderr
    rows = [r for r in out.stdout.splitlines()[1:] if r]
    assert len(rows) == 2 and any("good.png" in r and ",," not in r[:30] for r in rows)


def test_server_refuses_postscript_upload(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from fetalplanes.inference.predictor import Predictor
    from fetalplanes.serving import create_app

    marker = tmp_path / "server-wrote.txt"
    client = TestClient(create_app(Predictor.load("sononet16")))
    files = [("files", ("scan.png", postscript(marker), "image/png")),
             ("files", ("good.png", ALLOWED["PNG"], "image/png"))]
    response = client.post("/api/v1/predict", files=files)
    assert response.status_code == 200
    bad, good = response.json()["results"]
    assert "but a PostScript file" in bad["error"] and "label" in good
    assert not marker.exists()
    assert "INTERPRETED" not in "".join(capfd.readouterr())


# ------------------------------------------------------------------ videos


def test_video_readers_see_only_video_containers(tmp_path: Path) -> None:
    playlist = tmp_path / "clip.mp4"
    playlist.write_text("#EXTM3U\n#EXT-X-VERSION:3\nfile:///etc/passwd\n")
    concat = tmp_path / "list.avi"
    concat.write_text("ffconcat version 1.0\nfile '/etc/passwd'\n")
    ps = tmp_path / "sweep.mov"
    ps.write_bytes(postscript(tmp_path / "never"))
    for path, kind in ((playlist, "playlist"), (concat, "concat"), (ps, "PostScript")):
        with pytest.raises(ImageError) as info:
            VideoSource(path)
        assert kind in str(info.value) and str(path) in str(info.value)
    fifo = tmp_path / "live.mp4"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="named pipe"):
        open_source(fifo)  # returns at once: never blocks on the pipe
    assert video_format(b"\0\0\0\x18ftypmp42" + bytes(20)) == "MP4/MOV"
    assert video_format(b"RIFF\0\0\0\0AVI LIST") == "AVI"
    assert video_format(b"YUV4MPEG2 W8 H8") == "Y4M"


# ------------------------------------------------------------------ HTTP framing


def test_framing_rules() -> None:
    both = {"headers": [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")]}
    assert "both Content-Length and Transfer-Encoding" in (framing_problem(both) or "")
    twice = {"headers": [(b"content-length", b"5"), (b"content-length", b"6")]}
    assert "conflicting" in (framing_problem(twice) or "")
    same = {"headers": [(b"content-length", b"5"), (b"content-length", b"5")]}
    assert framing_problem(same) is None
    scope = {"method": "GET", "raw_path": b"/healthz", "headers": [(b"x", b"a" * 1000)]}
    assert 1000 < head_bytes(scope) < 1100


@pytest.fixture(scope="module")
def tiny_predictor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from test_faults import make_tiny_run

    from fetalplanes.inference.predictor import Predictor

    return Predictor.from_run(make_tiny_run(tmp_path_factory.mktemp("tiny") / "run"))


def _responses(sock: socket.socket, limit: float = 10) -> list[bytes]:
    """Every response status line the server sends before closing the connection."""
    sock.settimeout(limit)
    data = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


@pytest.mark.slow
def test_smuggled_request_is_never_answered(tiny_predictor: object) -> None:
    from test_server_hardening import connect, live_server

    smuggled = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    head = (b"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n")
    with live_server(tiny_predictor) as port:
        s = connect(port)
        s.sendall(head + body)
        statuses = _responses(s)
        s.close()
        ok = connect(port)  # the server itself is fine
        ok.sendall(smuggled)
        after = _responses(ok, limit=3)
        ok.close()
    assert statuses == [b"HTTP/1.1 400 Bad Request"]  # one answer: the smuggled GET got none
    assert after and after[0].startswith(b"HTTP/1.1 200")


@pytest.mark.slow
def test_request_head_over_the_limit_in_one_read(tiny_predictor: object) -> None:
    """A 100 KB head sent at once (h11 bounds only incomplete heads) gets 431."""
    from test_server_hardening import connect, live_server

    with live_server(tiny_predictor) as port:  # default limit: 64 KiB
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000
                  + b"\r\n\r\n")
        statuses = _responses(s)
        s.close()
    assert statuses and statuses[0].split()[1] in (b"431", b"400")


# ------------------------------------------------------------------ memory


def test_decode_cost_is_by_bytes_not_pixels() -> None:
    webp = encoded("WEBP", "RGB", size=(400, 300), lossless=True)
    png = encoded("PNG", "RGB", size=(400, 300))
    assert decode_cost(webp, "a.webp") > 2 * decode_cost(png, "a.png") > 0
    assert decode_cost(b"%!PS", "a.png") == 0


def test_decode_budget_never_exceeds_its_total() -> None:
    budget = DecodeBudget(100)
    inside = []
    lock = threading.Lock()

    def work(cost: int) -> None:
        with budget.hold(cost):
            with lock:
                inside.append(budget.used)
            time.sleep(0.01)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, [60, 60, 30, 30, 90, 10, 40, 100]))
    assert budget.peak <= 100 and max(inside) <= 100 and budget.used == 0


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _smooth_png(width: int, height: int) -> bytes:
    """A large colour PNG that compresses well (under the 20 MB upload limit)."""
    x = np.linspace(0, 255, width, dtype=np.uint8)
    arr = np.stack([np.broadcast_to(x, (height, width))] * 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, files: list[tuple[str, bytes]], path: str = "/api/v1/predict") -> int:
    import http.client
    import uuid

    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{n}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + d + b"\r\n"
        for n, d in files
    ) + f"--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", path, body,
                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_server_under_hostile_uploads(tmp_path: Path) -> None:
    """Hostile and good uploads at once: no 5xx, peak memory within 1 GB of idle, memory
    back near idle after, and nothing written to TMPDIR, HOME or the working folder."""
    home, tmp, cwd = (tmp_path / n for n in ("home", "tmp", "cwd"))
    for d in (home, tmp, cwd):
        d.mkdir()
    port = _free_port()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home)}
    env.pop("ORT_DISABLE_TELEMETRY", None)  # the package must switch it off by itself
    server = subprocess.Popen(
        [sys.executable, "-m", "fetalplanes", "serve", "sononet16", "--port", str(port)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        good = ("good.png", ALLOWED["PNG"])
        assert _post(port, [good]) == 200  # warm: model loaded, first batch run
        idle = _status(server.pid)["VmRSS"]
        webp = {}
        for side in (8000, 6700):  # 64 MP: over the decode budget; 45 MP: just under it
            buf = io.BytesIO()
            Image.new("RGBA", (side, side), (10, 200, 30, 255)).save(buf, "WEBP", lossless=True)
            webp[side] = buf.getvalue()  # a few KB each
        hostile = [
            [("a.webp", webp[8000]), ("b.webp", webp[8000])],  # the tester's 5 KB request
            [("a.webp", webp[6700]), ("b.webp", webp[6700])],  # the worst that is decoded
            [("scan.png", postscript(tmp / "never")), good],
            [("big.png", _smooth_png(6000, 6000)), good],
            [("cut.png", ALLOWED["PNG"][:40]), good],
        ]
        scans = [[("sweep.mp4", postscript(tmp / "never"))], [("cut.mp4", b"\0\0\0\x18ftypmp42")]]
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda f: _post(port, f), hostile * 2 + [[good]] * 4))
            statuses += list(pool.map(lambda f: _post(port, f, "/api/v1/scan"), scans))
        assert all(s < 500 for s in statuses), statuses
        assert statuses.count(200) >= 10 and statuses[-2:] == [415, 415]
        after = _status(server.pid)
        assert after["VmHWM"] - idle <= 1024**3, (idle, after)
        assert after["VmRSS"] - idle <= 160 * 1024**2, (idle, after)  # back near idle
    finally:
        server.terminate()
        out = server.communicate(timeout=30)[0].decode(errors="replace")
    assert "Traceback" not in out and "INTERPRETED" not in out
    for d in (home, tmp, cwd):
        assert not any(d.rglob("*")), (d, list(d.rglob("*")))
