"""`download`: pinned checksum, atomic write, no overwrite; tested on a loopback server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fetalplanes import download as dl
from fetalplanes.errors import FetalPlanesError


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
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
