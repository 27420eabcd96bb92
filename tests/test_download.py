"""`download`: checksums, resume, safe extraction, no overwrite; tested on a loopback server.

Nothing leaves 127.0.0.1: a fake Zenodo (files with HTTP Range, a record API) serves archives
generated here.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import zipfile
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fetalplanes.errors import FetalPlanesError
from fetalplanes.tools import download as dl


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()


@pytest.fixture()
def fake_asset(monkeypatch: pytest.MonkeyPatch) -> bytes:
    payload = b"weights" * 1000
    asset = dl.Asset("sononet16", "SonoNet16.pth", "https://example.invalid/x",
                     hashlib.sha256(payload).hexdigest(), "test")
    monkeypatch.setitem(dl.ASSETS, "sononet16", asset)
    return payload


def test_download_verifies_and_is_idempotent(server, fake_asset, tmp_path: Path) -> None:
    base, root = server
    (root / "w.pth").write_bytes(fake_asset)
    out = dl.download("sononet16", tmp_path / "dst", url=f"{base}/w.pth", progress=False)
    assert out.read_bytes() == fake_asset
    again = dl.download("sononet16", tmp_path / "dst", url=f"{base}/missing", progress=False)
    assert again == out  # already there with the right checksum: nothing fetched


def test_checksum_mismatch_discards(server, fake_asset, tmp_path: Path) -> None:
    base, root = server
    (root / "w.pth").write_bytes(b"tampered")
    with pytest.raises(FetalPlanesError, match="checksum mismatch"):
        dl.download("sononet16", tmp_path, url=f"{base}/w.pth", progress=False)
    assert not (tmp_path / "SonoNet16.pth").exists()
    assert not list(tmp_path.glob(".*.part"))


def test_never_overwrites_and_unknown_names(fake_asset, tmp_path: Path) -> None:
    (tmp_path / "SonoNet16.pth").write_bytes(b"mine")
    with pytest.raises(FetalPlanesError, match="not overwritten"):
        dl.download("sononet16", tmp_path, progress=False)
    assert (tmp_path / "SonoNet16.pth").read_bytes() == b"mine"
    with pytest.raises(FetalPlanesError, match="no download"):
        dl.download("sononet99", tmp_path)


def test_pinned_checksum_matches_shared_copy() -> None:
    from conftest import shared_dir

    weights = shared_dir() / "sononet" / "SonoNet16.pth"
    if not weights.is_file():
        pytest.skip(f"shared SonoNet weights not found at {weights} (set FETALPLANES_SHARED)")
    assert dl.sha256_of(weights) == dl.ASSETS["sononet16"].sha256


def test_download_error_is_one_line(server, fake_asset, tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(FetalPlanesError) as e:
        dl.download("sononet16", tmp_path, url=f"{base}/nothing-here", progress=False)
    assert "download failed" in str(e.value) and "\n" not in str(e.value)


# --- data sets: a fake Zenodo on the loopback interface ---------------------------------------


@dataclass
class FakeZenodo:
    """Files served with HTTP Range support and JSON records; every request is logged."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    records: dict[str, object] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)  # cut these after ~30% on first request
    range_shift: int = 0  # answer a Range request from this many bytes too early (a bad server)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)

    def publish(self, name: str, payload: bytes, record_id: str = "1", *,
                md5: str | None = None, size: int | None = None) -> str:
        """Serve `payload` at /files/<name> and list it in record `record_id`; return the URL."""
        self.files[f"/files/{name}"] = payload
        entry = {"key": name, "size": len(payload) if size is None else size,
                 "checksum": "md5:" + (md5 or hashlib.md5(payload).hexdigest())}
        self.records[f"/api/records/{record_id}"] = {"id": record_id, "files": [entry]}
        return f"{self.base}/files/{name}?download=1"

    def api(self, record_id: str = "1") -> str:
        return f"{self.base}/api/records/{record_id}"

    def file_requests(self) -> list[str | None]:
        return [rng for path, rng in self.requests if path.startswith("/files/")]


def _zenodo_handler(state: FakeZenodo) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            state.requests.append((path, self.headers.get("Range")))
            if path in state.records:
                self._send(200, json.dumps(state.records[path]).encode(), {})
            elif path in state.files:
                self._serve_file(path, state.files[path])
            else:
                self._send(404, b"not found", {})

        def _serve_file(self, path: str, body: bytes) -> None:
            rng = self.headers.get("Range")
            if path in state.drop_once:
                state.drop_once.discard(path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: int(len(body) * 0.3)])
                self.close_connection = True
                return
            if rng:
                start = int(rng.removeprefix("bytes=").split("-")[0]) - state.range_shift
                if start >= len(body):
                    self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                    return
                self._send(206, body[start:],
                           {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
                return
            self._send(200, body, {})

        def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(code)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture()
def zenodo() -> Iterator[FakeZenodo]:
    state = FakeZenodo()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _zenodo_handler(state))
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _png(seed: int) -> bytes:
    """A tiny noisy PNG: incompressible enough that archives have a real body to cut."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


AFRICAN_PNGS = {f"patient{p:03d}_DZA_plane{k}": _png(p * 10 + k) for p in (1, 2) for k in range(4)}


def _tar_xz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _fifo(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info, None


def african_archive() -> bytes:
    """Like Zenodo_dataset.tar.xz: a top folder with the CSV and the images in a subfolder."""
    rows = ["Patient_num,Plane,Train,Center,Filename"]
    rows += [f"{n[7:10]},plane{n[-1]},1,DZA,{n}" for n in AFRICAN_PNGS]
    members = [_file("Zenodo_dataset/African_planes_database.csv",
                     "\n".join(rows).encode() + b"\n")]
    members += [_file(f"Zenodo_dataset/images/{n}.png", png) for n, png in AFRICAN_PNGS.items()]
    return _tar_xz(members)


@pytest.fixture(scope="module")
def african_bytes() -> bytes:
    return african_archive()


def _get_african(zenodo: FakeZenodo, to: Path, payload: bytes, publish: dict | None = None,
                 **options: object) -> Path:
    """Publish `payload` as the african archive and download it through the fake Zenodo."""
    url = zenodo.publish("Zenodo_dataset.tar.xz", payload, **(publish or {}))
    return dl.download("african", to, url=url, record_api=zenodo.api(), progress=False,
                       **options)  # type: ignore[arg-type]


def test_interrupted_download_resumes_to_identical_file(
    zenodo: FakeZenodo, african_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = zenodo.publish("Zenodo_dataset.tar.xz", african_bytes)
    zenodo.drop_once.add("/files/Zenodo_dataset.tar.xz")
    part = tmp_path / "Zenodo_dataset.tar.xz.part"
    with pytest.raises(FetalPlanesError, match=r"connection dropped.*rerun to resume") as e:
        dl.download("african", tmp_path, url=url, record_api=zenodo.api(), progress=False)
    assert "\n" not in str(e.value)
    assert part.stat().st_size == int(len(african_bytes) * 0.3)
    assert not (tmp_path / "african").exists()

    folder = dl.download("african", tmp_path, url=url, record_api=zenodo.api(), progress=True,
                         keep_archive=True)
    assert zenodo.file_requests() == [None, f"bytes={int(len(african_bytes) * 0.3)}-"]
    assert (tmp_path / "Zenodo_dataset.tar.xz").read_bytes() == african_bytes
    assert not part.exists()
    assert folder == tmp_path / "african"
    err = capsys.readouterr().err
    assert "B/s" in err  # the progress bar shows a rate
    assert f"sha256 {hashlib.sha256(african_bytes).hexdigest()}" in err


def test_wrong_range_answer_discards_the_part(
    zenodo: FakeZenodo, african_bytes: bytes, tmp_path: Path
) -> None:
    url = zenodo.publish("Zenodo_dataset.tar.xz", african_bytes)
    part = tmp_path / "Zenodo_dataset.tar.xz.part"
    part.write_bytes(african_bytes[:100])
    zenodo.range_shift = 10
    with pytest.raises(FetalPlanesError, match="another range than bytes=100-"):
        dl.download("african", tmp_path, url=url, record_api=zenodo.api(), progress=False)
    assert not part.exists()
    zenodo.range_shift = 0
    assert dl.download("african", tmp_path, url=url, record_api=zenodo.api(),
                       progress=False).is_dir()


def test_server_ignoring_range_restarts_from_zero(
    server, african_bytes: bytes, tmp_path: Path
) -> None:
    base, root = server  # SimpleHTTPRequestHandler answers 200 to a Range request
    (root / "a.tar.xz").write_bytes(african_bytes)
    (tmp_path / "Zenodo_dataset.tar.xz.part").write_bytes(b"stale bytes from another file")
    folder = dl.download("african", tmp_path, url=f"{base}/a.tar.xz",
                         record_api=f"{base}/no-api", progress=False)
    assert (folder / "African_planes_database.csv").is_file()


def test_african_layout_keeps_csv_and_images(
    zenodo: FakeZenodo, african_bytes: bytes, tmp_path: Path
) -> None:
    (tmp_path / "african").mkdir()  # an empty target is fine
    folder = _get_african(zenodo, tmp_path, african_bytes)
    assert folder == tmp_path / "african"
    csv_rows = (folder / "African_planes_database.csv").read_text().splitlines()
    assert csv_rows[0] == "Patient_num,Plane,Train,Center,Filename" and len(csv_rows) == 9
    images = sorted(p.name for p in (folder / "images").glob("*.png"))
    assert images == sorted(f"{n}.png" for n in AFRICAN_PNGS)
    assert (folder / "images" / "patient001_DZA_plane0.png").read_bytes() == (
        AFRICAN_PNGS["patient001_DZA_plane0"]
    )
    assert not (tmp_path / "Zenodo_dataset.tar.xz").exists()  # archive removed by default
    assert sorted(p.name for p in tmp_path.iterdir()) == ["african"]  # no temp folders left
    assert dl.next_command(folder) == f"fetalplanes data check {folder}"


def test_fpdb_zip_extracts_without_its_top_folder(zenodo: FakeZenodo, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("FETAL_PLANES_ZENODO/FETAL_PLANES_DB_data.csv", "Image_name;Patient_num\n")
        zf.writestr("FETAL_PLANES_ZENODO/Images/Patient00001_Plane1_1_of_1.png", _png(0))
    url = zenodo.publish("FETAL_PLANES_ZENODO.zip", buf.getvalue(), "3904280")
    folder = dl.download("fpdb", tmp_path / "data", url=url, record_api=zenodo.api("3904280"),
                         progress=False)
    assert folder == tmp_path / "data" / "fpdb"
    assert (folder / "FETAL_PLANES_DB_data.csv").is_file()
    assert (folder / "Images" / "Patient00001_Plane1_1_of_1.png").read_bytes() == _png(0)


@pytest.mark.parametrize("corruption", ["flipped-byte", "wrong-size"])
def test_corrupt_download_is_discarded(
    zenodo: FakeZenodo, african_bytes: bytes, tmp_path: Path, corruption: str
) -> None:
    true_md5 = hashlib.md5(african_bytes).hexdigest()
    if corruption == "flipped-byte":
        served = bytearray(african_bytes)
        served[len(served) // 2] ^= 0x01
        publish, message = {"md5": true_md5}, "checksum mismatch \\(md5"
    else:
        served, publish, message = bytearray(african_bytes), {"size": 1000}, "size mismatch"
    with pytest.raises(FetalPlanesError, match=message) as e:
        _get_african(zenodo, tmp_path, bytes(served), publish)
    assert "\n" not in str(e.value) and "discarded" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no archive, no part file, no folder


def test_sha256_pin_is_enforced(zenodo: FakeZenodo, african_bytes: bytes, tmp_path: Path) -> None:
    with pytest.raises(FetalPlanesError, match="checksum mismatch \\(sha256"):
        _get_african(zenodo, tmp_path, african_bytes, sha256="0" * 64)
    good = hashlib.sha256(african_bytes).hexdigest()
    assert _get_african(zenodo, tmp_path, african_bytes, sha256=good.upper()).is_dir()


def test_unreachable_record_api_continues_with_one_line(
    zenodo: FakeZenodo, african_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = zenodo.publish("Zenodo_dataset.tar.xz", african_bytes)
    folder = dl.download("african", tmp_path, url=url, record_api=f"{zenodo.base}/api/gone",
                         progress=False)
    assert (folder / "African_planes_database.csv").is_file()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "record API" in ln]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "size and md5 unknown" in (
        warnings[0]
    )


def test_kept_archive_and_complete_part_are_reused(
    zenodo: FakeZenodo, african_bytes: bytes, tmp_path: Path
) -> None:
    _get_african(zenodo, tmp_path, african_bytes, keep_archive=True)
    shutil.rmtree(tmp_path / "african")
    _get_african(zenodo, tmp_path, african_bytes)  # verified against the record, not fetched
    assert len(zenodo.file_requests()) == 1
    shutil.rmtree(tmp_path / "african")
    (tmp_path / "Zenodo_dataset.tar.xz.part").write_bytes(african_bytes)  # finished, not moved
    _get_african(zenodo, tmp_path, african_bytes)
    assert len(zenodo.file_requests()) == 1


def test_existing_target_is_not_overwritten(
    zenodo: FakeZenodo, african_bytes: bytes, tmp_path: Path
) -> None:
    (tmp_path / "african").mkdir()
    (tmp_path / "african" / "mine.txt").write_text("keep")
    with pytest.raises(FetalPlanesError, match="african: exists and is not empty; not overwritten"):
        _get_african(zenodo, tmp_path, african_bytes)
    assert (tmp_path / "african" / "mine.txt").read_text() == "keep"
    assert zenodo.requests == []  # refused before any download


def test_free_space_shortfall_is_refused(
    zenodo: FakeZenodo, african_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(FetalPlanesError) as e:
        _get_african(zenodo, tmp_path, african_bytes)
    msg = str(e.value)
    size = len(african_bytes)
    assert f"needs {(size + 2 * size) / 1e6:.1f} MB free" in msg and "extraction" in msg
    assert "only 0.0 MB available" in msg and "\n" not in msg
    assert zenodo.file_requests() == [] and list(tmp_path.iterdir()) == []


def test_path_traversal_member_refuses_whole_archive(
    zenodo: FakeZenodo, tmp_path: Path
) -> None:
    payload = _tar_xz([_file("ok/a.txt", b"fine"), _file("../evil.txt", b"gotcha")])
    to = tmp_path / "deep" / "data"
    with pytest.raises(FetalPlanesError) as e:
        _get_african(zenodo, to, payload)
    assert "member '../evil.txt' has a '..' component" in str(e.value)
    assert "nothing extracted" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert list(to.iterdir()) == []  # no folder, no temp folder, unsafe archive removed


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([_file("/tmp/abs-evil.txt", b"x")], "'/tmp/abs-evil.txt' has an absolute path"),
        ([_link("top/link", "../../outside")], "'top/link' links outside the folder"),
        ([_link("link", "/etc/passwd")], "'link' links to absolute path"),
        ([_link("hard", "../x", tarfile.LNKTYPE)], "'hard' links outside the folder"),
        ([_link("ln", "sub"), _file("ln/a.txt", b"x")], "'ln/a.txt' lies under a link member"),
        ([_fifo("fifo")], "'fifo' is a device, fifo"),
    ],
    ids=["absolute", "symlink-up", "symlink-absolute", "hardlink-up", "under-symlink", "fifo"],
)
def test_unsafe_tar_members_are_refused(
    tmp_path: Path, members: list, message: str
) -> None:
    archive = tmp_path / "x.tar.xz"
    archive.write_bytes(_tar_xz([_file("fine.txt", b"ok"), *members]))
    with pytest.raises(FetalPlanesError, match=message):
        dl.safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar.xz"]


def test_unsafe_zip_members_are_refused(tmp_path: Path) -> None:
    for name, message in (("../evil.txt", "'..' component"), ("/abs.txt", "absolute path")):
        archive = tmp_path / "x.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("fine.txt", "ok")
            zf.writestr(zipfile.ZipInfo(name), "evil")
        with pytest.raises(FetalPlanesError, match=message):
            dl.safe_extract(archive, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_internal_symlink_is_allowed(tmp_path: Path) -> None:
    archive = tmp_path / "x.tar.xz"
    archive.write_bytes(_tar_xz([_file("d/a.txt", b"ok"), _link("d/b.txt", "a.txt")]))
    out = dl.safe_extract(archive, tmp_path / "out")
    assert (out / "b.txt").read_bytes() == b"ok"  # single top folder 'd' dropped


def test_downloaded_african_set_reads_with_450_images_and_4_classes(
    zenodo: FakeZenodo, tmp_path: Path
) -> None:
    """The whole path a user takes: download the (generated, full-size) African archive
    from the loopback server, then `data check` reads 450 images of 4 planes."""
    import json
    import tarfile as tf

    from test_african import noise, rows_450, write_african
    from typer.testing import CliRunner

    from fetalplanes.cli import app

    source = write_african(tmp_path / "src" / "Zenodo_dataset", rows_450(), noise)
    buf = io.BytesIO()
    with tf.open(fileobj=buf, mode="w:xz") as tar:
        tar.add(source, arcname="Zenodo_dataset")
    folder = _get_african(zenodo, tmp_path / "data", buf.getvalue())
    r = CliRunner().invoke(app, ["data", "check", str(folder), "--json"])
    report = json.loads(r.stdout)
    assert report["n_images"] == 450 and len(report["classes"]) == 4, r.output
    assert dl.next_command(folder).startswith("fetalplanes data check ")
