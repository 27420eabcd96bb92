"""Fetch published weights for users online: pinned URL, pinned sha256, atomic write.

Nothing in the package downloads at run time; this is an explicit user command.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fetalplanes.errors import FetalPlanesError


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str
    url: str
    sha256: str
    license: str


_SONONET_COMMIT = "58e9f636be6fbfd87fbd1a27520b872828afa218"
ASSETS: dict[str, Asset] = {
    "sononet16": Asset(
        "sononet16",
        "SonoNet16.pth",
        "https://raw.githubusercontent.com/rdroste/SonoNet_PyTorch/"
        f"{_SONONET_COMMIT}/sononet/SonoNet16.pth",
        "d744684e20d87dc8192bc46e37d44733d12f5263902eab615e5064cb866c8c21",
        "Apache-2.0 (Baumgartner et al., IEEE TMI 2017; PyTorch port by R. Droste)",
    ),
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(name: str, to: str | Path = ".", url: str | None = None, timeout: float = 60,
             progress: bool = True) -> Path:
    """Download asset `name` into folder `to`; verify its sha256; never overwrite.

    `url` overrides the pinned address (a mirror); the pinned checksum still applies.
    """
    if name not in ASSETS:
        raise FetalPlanesError(
            f"no download for {name!r}; available: {', '.join(ASSETS)} (SonoNet-32/64 "
            "weights are published only as .npz in baumgach/SonoNet-weights)"
        )
    asset = ASSETS[name]
    dest = Path(to) / asset.filename
    if dest.exists():
        if sha256_of(dest) == asset.sha256:
            return dest
        raise FetalPlanesError(f"{dest}: exists with different content; not overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{asset.filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url or asset.url, out, timeout, progress)
        got = sha256_of(Path(tmp))
        if got != asset.sha256:
            raise FetalPlanesError(
                f"{url or asset.url}: checksum mismatch (got {got[:12]}..., expected "
                f"{asset.sha256[:12]}...); file discarded"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _fetch(url: str, out: object, timeout: float, progress: bool) -> None:
    if not url.startswith(("https://", "http://")):
        raise FetalPlanesError(f"{url}: only http(s) URLs are supported")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="downloading",
                      disable=not progress) as bar:
                for chunk in iter(lambda: resp.read(1 << 16), b""):
                    out.write(chunk)  # type: ignore[attr-defined]
                    bar.update(len(chunk))
    except OSError as exc:
        raise FetalPlanesError(f"{url}: download failed ({exc})") from None
