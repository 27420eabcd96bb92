"""Fetch published weights and public data sets: an explicit user command, never run implicitly.

Weights have a pinned URL and sha256. Data sets come from Zenodo records: their size and md5
are read from the record API, downloads resume over HTTP Range after an interruption, and
archives are extracted only after every member has been checked to stay inside the target.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import lzma
import os
import posixpath
import re
import shlex
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetalplanes.console import progress as progress_bar
from fetalplanes.errors import FetalPlanesError

_USER_AGENT = "fetalplanes-download"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str
    url: str
    sha256: str
    license: str


@dataclass(frozen=True)
class Dataset:
    """A data set published as one archive in a Zenodo record."""

    name: str
    filename: str
    record_id: str
    approx_bytes: int  # archive size for the space estimate when the record API is unreachable
    unpacked_ratio: float  # extracted size / archive size, for the estimate before download
    license: str

    @property
    def url(self) -> str:
        return f"https://zenodo.org/records/{self.record_id}/files/{self.filename}?download=1"

    @property
    def record_api(self) -> str:
        return f"https://zenodo.org/api/records/{self.record_id}"


@dataclass(frozen=True)
class Expected:
    """What a downloaded file must match; None means not known, so not checked."""

    size: int | None = None
    md5: str | None = None
    sha256: str | None = None


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

DATASETS: dict[str, Dataset] = {
    "fpdb": Dataset(
        "fpdb",
        "FETAL_PLANES_ZENODO.zip",
        "3904280",
        2_300_000_000,
        1.1,  # PNG images barely compress
        "CC BY 4.0 (Burgos-Artizzu et al., Sci Rep 2020; FETAL_PLANES_DB)",
    ),
    "african": Dataset(
        "african",
        "Zenodo_dataset.tar.xz",
        "7540448",
        60_000_000,
        2.0,
        "CC BY 4.0 (Sendra-Balcells et al., Sci Rep 2023; African fetal planes)",
    ),
}


def available() -> list[str]:
    """Every name `download` accepts, weights first."""
    return [*ASSETS, *DATASETS]


def download(
    name: str,
    to: str | Path = ".",
    url: str | None = None,
    timeout: float = 60,
    progress: bool = True,
    *,
    sha256: str | None = None,
    record_api: str | None = None,
    keep_archive: bool = False,
) -> Path:
    """Download `name` into folder `to`; verify it; never overwrite anything.

    Weights return the file path; data sets return the extracted folder `to/<name>`.
    `url` is a mirror (the checks still apply), `sha256` pins the file's hash, `record_api`
    replaces the Zenodo record address the size and md5 are read from.
    """
    if name in ASSETS:
        return _download_weights(ASSETS[name], Path(to), url, timeout, progress, sha256)
    if name in DATASETS:
        ds = DATASETS[name]
        return _download_dataset(ds, Path(to), url, timeout, progress, sha256, record_api,
                                 keep_archive)
    raise FetalPlanesError(
        f"no download for {name!r}; available: {', '.join(available())} (SonoNet-32/64 "
        "weights are published only as .npz in baumgach/SonoNet-weights)"
    )


def next_command(folder: str | Path) -> str:
    """The command to run after a data set download: check the folder holding its labels."""
    folder = Path(folder)
    csvs = sorted(folder.rglob("*.csv"), key=lambda p: (len(p.parts), str(p)))
    root = csvs[0].parent if csvs else folder
    return f"fetalplanes data check {shlex.quote(str(root))}"


def sha256_of(path: Path) -> str:
    return _hashes(path)[1]


# --- weights and data sets -------------------------------------------------------------------


def _download_weights(asset: Asset, to: Path, url: str | None, timeout: float, progress: bool,
                      sha256: str | None) -> Path:
    dest = to / asset.filename
    if sha256 and sha256.lower() != asset.sha256:
        raise FetalPlanesError(
            f"{asset.name}: --sha256 {sha256[:12]}... differs from the pinned "
            f"{asset.sha256[:12]}...; refusing"
        )
    if dest.exists():
        if sha256_of(dest) == asset.sha256:
            return dest
        raise FetalPlanesError(f"{dest}: exists with different content; not overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = url or asset.url
    _fetch_verified(source, dest, Expected(sha256=asset.sha256), timeout, progress)
    return dest


def _download_dataset(ds: Dataset, to: Path, url: str | None, timeout: float, progress: bool,
                      sha256: str | None, record_api: str | None, keep_archive: bool) -> Path:
    target = to / ds.name
    _refuse_nonempty(target)
    archive = to / ds.filename
    expected = _record_expectation(record_api or ds.record_api, ds.filename, timeout)
    if sha256:
        expected = Expected(expected.size, expected.md5, sha256.lower())
    if archive.exists():
        _reuse_archive(archive, expected)
    else:
        _check_space_for_download(to, ds, expected.size, _part_of(archive))
        to.mkdir(parents=True, exist_ok=True)
        _fetch_verified(url or ds.url, archive, expected, timeout, progress)
    try:
        folder = safe_extract(archive, target)
    except _UnsafeArchive:
        if not keep_archive:
            archive.unlink()
        raise
    if not keep_archive:
        archive.unlink()
    return folder


def _reuse_archive(archive: Path, expected: Expected) -> None:
    """An archive kept by an earlier run is used only if it still matches."""
    try:
        _verify(archive, expected, str(archive))
    except FetalPlanesError:
        raise FetalPlanesError(
            f"{archive}: exists with different content; not overwritten (remove it to download)"
        ) from None


def _refuse_nonempty(target: Path) -> None:
    if target.is_dir() and not any(target.iterdir()):
        return
    if target.exists() or target.is_symlink():
        raise FetalPlanesError(f"{target}: exists and is not empty; not overwritten")


# --- record API, verification, free space ----------------------------------------------------


def _record_expectation(api: str, filename: str, timeout: float) -> Expected:
    """Size and md5 as the Zenodo record lists them; unknown (said in one line) if unreachable."""
    request = urllib.request.Request(
        api, headers={"Accept": "application/json", "User-Agent": _USER_AGENT}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            record = json.load(resp)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        _say(f"{api}: record API unreachable ({_oneline(exc)}); continuing with size and md5 "
             "unknown")
        return Expected()
    entry = _file_entry(record, filename)
    if entry is None:
        _say(f"{api}: record lists no file {filename!r}; continuing with size and md5 unknown")
        return Expected()
    size = entry.get("size")
    checksum = str(entry.get("checksum") or "")
    algo, _, digest = checksum.partition(":")
    md5 = digest.lower() if algo == "md5" and re.fullmatch(r"[0-9a-fA-F]{32}", digest) else None
    return Expected(size if isinstance(size, int) and size >= 0 else None, md5)


def _file_entry(record: Any, filename: str) -> dict[str, Any] | None:
    """Zenodo lists files as a list, or (newer API) as {"entries": list-or-dict}."""
    files = record.get("files") if isinstance(record, dict) else None
    if isinstance(files, dict):
        files = files.get("entries", files)
    if isinstance(files, dict):
        files = list(files.values())
    for entry in files if isinstance(files, list) else []:
        if isinstance(entry, dict) and filename in (entry.get("key"), entry.get("filename")):
            return entry
    return None


def _verify(path: Path, expected: Expected, source: str, shown: str | None = None) -> str:
    """Check size, md5 and sha256 against what is known; print the sha256 either way."""
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        raise FetalPlanesError(
            f"{source}: size mismatch (got {size} bytes, record says {expected.size}); "
            "file discarded"
        )
    md5, sha = _hashes(path)
    for algo, got, want in (("md5", md5, expected.md5), ("sha256", sha, expected.sha256)):
        if want is not None and got != want:
            raise FetalPlanesError(
                f"{source}: checksum mismatch ({algo} got {got[:12]}..., expected "
                f"{want[:12]}...); file discarded"
            )
    _say(f"sha256 {sha}  {shown or path.name}")
    return sha


def _hashes(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def _check_space_for_download(to: Path, ds: Dataset, size: int | None, part: Path) -> None:
    archive = size if size is not None else ds.approx_bytes
    have = part.stat().st_size if part.exists() else 0
    fetch = max(archive - have, 0)
    unpack = int(archive * ds.unpacked_ratio)
    _check_space(to, fetch + unpack, f"{_gb(fetch)} download + {_gb(unpack)} extraction")


def _check_space(folder: Path, need: int, detail: str) -> None:
    free = shutil.disk_usage(_existing_ancestor(folder)).free
    if free < need:
        raise FetalPlanesError(
            f"{folder}: needs {_gb(need)} free ({detail}), only {_gb(free)} available"
        )


def _existing_ancestor(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# --- resumable HTTP download -----------------------------------------------------------------


def _part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _fetch_verified(url: str, dest: Path, expected: Expected, timeout: float,
                    progress: bool) -> None:
    """Download into the stable DEST.part (kept for resuming), verify, then move into place."""
    part = _part_of(dest)
    _fetch_resumable(url, part, expected.size, timeout, progress)
    try:
        _verify(part, expected, url, dest.name)
    except FetalPlanesError:
        part.unlink()
        raise
    os.replace(part, dest)


def _fetch_resumable(url: str, part: Path, size: int | None, timeout: float,
                     progress: bool) -> None:
    if not url.startswith(("https://", "http://")):
        raise FetalPlanesError(f"{url}: only http(s) URLs are supported")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size and have > 0:
        return
    headers = {"User-Agent": _USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=timeout) as resp:
            start = _resume_offset(resp, have, part, url)
            _stream(resp, part, start, url, progress)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            if _range_total(exc.headers.get("Content-Range")) == have:
                return  # the part already holds the whole file
            part.unlink()
            _fetch_resumable(url, part, size, timeout, progress)
            return
        raise FetalPlanesError(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from None
    except (OSError, http.client.HTTPException) as exc:
        kept = part.exists() and part.stat().st_size > 0
        hint = f"; rerun to resume from {part}" if kept else ""
        raise FetalPlanesError(f"{url}: download failed ({_oneline(exc)}){hint}") from None


def _resume_offset(resp: http.client.HTTPResponse, have: int, part: Path, url: str) -> int:
    """Append on a 206 for exactly our offset; start over on a 200; refuse any other range."""
    if resp.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range") or "")
    if have and match and int(match.group(1)) == have:
        return have
    part.unlink(missing_ok=True)
    raise FetalPlanesError(
        f"{url}: server sent another range than bytes={have}- "
        f"({resp.headers.get('Content-Range')!r}); partial file discarded, rerun to start over"
    )


def _range_total(content_range: str | None) -> int | None:
    match = re.search(r"/(\d+)\s*$", content_range or "")
    return int(match.group(1)) if match else None


def _stream(resp: http.client.HTTPResponse, part: Path, start: int, url: str,
            progress: bool) -> None:
    length = resp.headers.get("Content-Length")
    body = int(length) if length and length.isdigit() else None
    if body is not None:
        _check_space(part.parent, body, f"{_gb(body)} download")
    got = 0
    with open(part, "ab" if start else "wb") as out, progress_bar(
        total=start + body if body is not None else None, initial=start, unit="B",
        unit_scale=True, unit_divisor=1024, desc=part.name.removesuffix(".part"),
        disable=not progress, leave=False,
    ) as bar:
        for chunk in iter(lambda: resp.read(_CHUNK), b""):
            out.write(chunk)
            got += len(chunk)
            bar.update(len(chunk))
    if body is not None and got < body:
        raise FetalPlanesError(
            f"{url}: connection dropped at {start + got} of {start + body} bytes; "
            f"rerun to resume from {part}"
        )


# --- safe extraction -------------------------------------------------------------------------


class _UnsafeArchive(FetalPlanesError):
    """An archive member would land outside the target or is not a plain file or folder."""


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract `archive` into `target` only if every member is safe; all or nothing.

    Members go to a temporary folder beside `target` that is renamed into place at the end;
    a single top-level folder in the archive is dropped so `target` holds the files.
    """
    archive, target = Path(archive), Path(target)
    _refuse_nonempty(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                total = _plan_zip(zf, archive)
                return _extract_into(archive, target, total, zf.extractall)
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            total = _plan_tar(members, archive)
            return _extract_into(archive, target, total, lambda d: _extract_tar(tf, members, d))
    except (tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError, EOFError) as exc:
        if isinstance(exc, getattr(tarfile, "FilterError", ())):
            raise _UnsafeArchive(f"{archive}: {_oneline(exc)}; archive refused, nothing "
                                 "extracted") from None
        raise FetalPlanesError(f"{archive}: not a readable archive ({_oneline(exc)})") from None


def _extract_into(archive: Path, target: Path, total: int, extract: Any) -> Path:
    _check_space(target.parent, total, f"{_gb(total)} extraction of {archive.name}")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.",
                                suffix=".extracting"))
    try:
        try:
            extract(tmp)
        except OSError as exc:
            raise FetalPlanesError(
                f"{archive}: extraction failed ({_oneline(exc)}); nothing extracted, archive kept"
            ) from None
        _move_into_place(_single_top(tmp), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _extract_tar(tf: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: a second line of defence
        tf.extractall(dest, members=members, filter="data")
    else:
        tf.extractall(dest, members=members)  # every member was checked by _plan_tar


def _single_top(folder: Path) -> Path:
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


def _move_into_place(src: Path, target: Path) -> None:
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    try:
        os.rename(src, target)
    except OSError:
        raise FetalPlanesError(f"{target}: exists and is not empty; not overwritten") from None


def _plan_tar(members: list[tarfile.TarInfo], archive: Path) -> int:
    """Refuse the archive if any member is unsafe; return the bytes extraction will write."""
    links = {_norm(m.name) for m in members if m.issym() or m.islnk()}
    total = 0
    for m in members:
        _check_name(m.name, archive)
        _check_not_under_link(m.name, links, archive)
        if m.issym():
            _check_link(m.name, posixpath.join(posixpath.dirname(_norm(m.name)), m.linkname),
                        m.linkname, archive)
        elif m.islnk():
            _check_link(m.name, m.linkname, m.linkname, archive)
        elif not (m.isfile() or m.isdir()):
            _refuse(archive, m.name, "is a device, fifo or other special file")
        total += m.size if m.isfile() else 0
    return total


def _plan_zip(zf: zipfile.ZipFile, archive: Path) -> int:
    total = 0
    for info in zf.infolist():
        _check_name(info.filename, archive)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            _refuse(archive, info.filename, "is a symlink (links in zip files are not supported)")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded
            _refuse(archive, info.filename, "is a device, fifo or other special file")
        total += info.file_size
    return total


def _norm(name: str) -> str:
    return posixpath.normpath(name.replace("\\", "/"))


def _check_name(name: str, archive: Path) -> None:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        _refuse(archive, name, "has an absolute path")
    if ".." in re.split(r"[/\\]", name):
        _refuse(archive, name, "has a '..' component")


def _check_not_under_link(name: str, links: Iterable[str], archive: Path) -> None:
    parts = _norm(name).split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            _refuse(archive, name, "lies under a link member")


def _check_link(name: str, resolved: str, linkname: str, archive: Path) -> None:
    if linkname.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", linkname):
        _refuse(archive, name, f"links to absolute path {linkname!r}")
    target = _norm(resolved)
    if target == ".." or target.startswith("../"):
        _refuse(archive, name, f"links outside the folder ({linkname!r})")


def _refuse(archive: Path, member: str, why: str) -> None:
    raise _UnsafeArchive(f"{archive}: member {member!r} {why}; archive refused, nothing extracted")


# --- small helpers ---------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

