"""Reading images from disk or bytes into grayscale uint8 arrays.

One place decodes every image so that train, evaluate, predict, sort and serve
see identical pixels and report bad files with the same one-line messages.

Why it is careful: every format's dimensions are read from its header before any pixel is
decoded (a few KB can declare gigapixels), and files are stat-ed before they are opened
(a FIFO named `x.png` would block a reader forever, a device would never end).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fetalplanes.data.formats import (
    HEAD_BYTES,
    image_format,
    jpeg_header,
    not_accepted,
    pillow_open,
)
from fetalplanes.errors import FetalPlanesError, ImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm",
     ".dicom"}
)
#: Refuse images above this many pixels (decompression-bomb guard); 8k x 8k is plenty.
MAX_PIXELS = 64_000_000
#: Refuse files above this size before reading them into memory (a sparse or runaway file).
MAX_FILE_BYTES = 2 * 1024**3

_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}
_ERRNO_WORDS = {
    errno.ENOENT: "file not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ELOOP: "symlink loop",
    errno.EISDIR: "is a folder, not a file",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "file not found (part of the path is a file, not a folder)",
}


#: Video containers a folder walk lists beside images (their frames become items).
VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".y4m"}
)


def is_image_path(path: Path) -> bool:
    """True for file names that look like images we can read (by extension). Folder walks
    also take files without a known extension whose first bytes are DICOM (`looks_like_dicom`),
    as scanners name them (`IM000001` in a DICOMDIR export)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_input_path(path: Path) -> bool:
    """True for file names a folder walk lists: images, DICOM files and videos."""
    return is_image_path(path) or path.suffix.lower() in VIDEO_EXTENSIONS


# ---------------------------------------------------------------- files


def os_error_text(exc: OSError) -> str:
    """A short lower-case reason for an OSError ('permission denied', 'symlink loop')."""
    if exc.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[exc.errno]
    if exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return " ".join(str(exc).split()) or type(exc).__name__


def _missing_text(path: Path) -> str:
    """'file not found', or why a symlink named like a file leads nowhere."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return f"dangling symlink (points to {os.readlink(path)}, which does not exist)"
    except OSError:
        pass
    return "file not found"


def _why_not_regular(mode: int) -> str | None:
    """Why a file of this mode cannot be read as a file, or None for a regular file."""
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return f"not a regular file but {_KINDS.get(stat.S_IFMT(mode), 'a special file')}"
    return None


def read_file(
    path: str | Path, max_bytes: int | None = None, error: type[FetalPlanesError] = ImageError
) -> bytes:
    """All bytes of a regular file, or `error` with one line naming it.

    Stat first, then open without blocking and check again on the open file, so a FIFO,
    socket or device (even one swapped in between) is refused instead of hanging the reader.
    """
    path = Path(path)
    limit = MAX_FILE_BYTES if max_bytes is None else max_bytes
    try:
        mode = os.stat(path).st_mode
        why = _why_not_regular(mode)
        if why:
            raise error(f"{path}: {why}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            why = _why_not_regular(st.st_mode)
            if why:
                raise error(f"{path}: {why}")
            data = f.read(limit + 1) if st.st_size <= limit else b""
            if st.st_size > limit or len(data) > limit:
                size = max(st.st_size, len(data))
                raise error(f"{path}: file too large ({_size(size)}; limit {_size(limit)})")
            return data
    except FileNotFoundError:
        raise error(f"{path}: {_missing_text(path)}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({os_error_text(exc)})") from None


def read_head(
    path: str | Path, n: int = HEAD_BYTES, error: type[FetalPlanesError] = ImageError
) -> bytes:
    """The first `n` bytes of a regular file (format sniffing), guarded like `read_file`:
    a FIFO, socket or device is refused in one line instead of blocking the reader."""
    path = Path(path)
    try:
        why = _why_not_regular(os.stat(path).st_mode)
        if why:
            raise error(f"{path}: {why}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            why = _why_not_regular(os.fstat(f.fileno()).st_mode)
            if why:
                raise error(f"{path}: {why}")
            return f.read(n)
    except FileNotFoundError:
        raise error(f"{path}: {_missing_text(path)}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({os_error_text(exc)})") from None


def _refusal(path: Path, mode: int, what: str | None) -> str | None:
    """Why `path` of this mode is not opened, phrased for a named kind of file, or None."""
    why = _why_not_regular(mode)
    if why is None or what is None:
        return f"{path}: {why}" if why else None
    if stat.S_ISDIR(mode):
        return f"{path}: the {what} is a folder, not a file"
    return f"{path}: the {what} is {why.removeprefix('not a regular file but ')}, not a file"


def open_file(
    path: str | Path,
    flags: int = os.O_RDONLY,
    error: type[FetalPlanesError] = ImageError,
    what: str | None = None,
    mode: int = 0o666,
) -> int:
    """A file descriptor of the regular file `path`, for readers that stream or append
    (a sort journal, a lock, a weights file handed to a loader).

    The sibling of `read_file`: stat first, open without blocking, check again on the open
    descriptor, so a FIFO, socket, device or folder is refused with `error` in one line
    ("OUT/x.lock: the sort lock is a folder, not a file" when `what` names the kind of
    file) and never hangs an open() or a read. Other OSErrors (permission denied, a full
    disk on O_CREAT) are raised as they are, for the caller to phrase.
    """
    path = Path(path)
    try:
        problem = _refusal(path, os.stat(path).st_mode, what)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
        problem = None
    if problem:
        raise error(problem)
    fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        problem = _refusal(path, os.fstat(fd).st_mode, what)
        if problem:
            raise error(problem)
        if flags & os.O_NONBLOCK == 0 and hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: ordinary reads and writes from here
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(fd: int, path: str | Path) -> str:
    """A path that opens the file `fd` already has open (`/proc/self/fd/N` on Linux,
    `/dev/fd/N` elsewhere), for loaders that take only a path: they read the checked file,
    not whatever `path` names by then. `path` itself where neither exists."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(folder):
            return f"{folder}/{fd}"
    return str(path)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def read_image_bytes(path: str | Path) -> bytes:
    """The bytes of an image file; ImageError (one line naming it) for anything unreadable.

    What every reader of image files should call (the decode workers, the cache), so a
    FIFO, a device, a folder, a symlink loop or a permission problem reads the same way.
    """
    return read_file(path)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as 2-D grayscale uint8; raises ImageError naming the file."""
    return decode_image(read_image_bytes(path), str(path))


# ---------------------------------------------------------------- listing


#: Bytes read from a file without a known image extension to tell whether it is DICOM.
SNIFF_BYTES = 132
#: Files fetalplanes itself writes beside images (run folders, sort journals, scan reports):
#: left out of folder walks without a line each, like hidden files.
OWN_OUTPUTS = frozenset(
    {"predictions.csv", "model.json", "weights.safetensors", "feature_bank.safetensors",
     "state.json", "state.safetensors", "train_config.json", "metrics.json", "history.csv",
     "timeline.csv", "report.md", "index.json", "index.html", "trials.csv",
     "best_config.json", "cv_summary.json"}
)
_OWN_SUFFIXES = (".onnx", ".partial", ".lock")
#: Explicit VRs whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_SANE_FIRST_LENGTH = 1024


class ListResult(list[Path]):
    """The files a listing found (a plain list of paths, as before), plus what it left out:
    `skipped` holds the one-line reason of every file it named and did not list (also
    printed, or added to the caller's `errors`); `hidden` counts hidden files and
    fetalplanes' own outputs left out without a line."""

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        super().__init__(paths)
        self.skipped: list[str] = []
        self.hidden = 0


def looks_like_dicom(head: bytes, name: str = "") -> bool:
    """Whether the first bytes of a file are DICOM: 'DICM' after the 128-byte preamble, or a
    data set starting at byte 0 (files without preamble) with a group 0002 or 0008 element of
    a sane even length, in implicit or explicit VR little endian (or, for a file named .dcm or
    .dicom, whatever pydicom can start to parse). Reads no more than `SNIFF_BYTES` (4 KB with
    a name); cheap enough for every file of a folder walk."""
    if head[128:132] == b"DICM":
        return True
    if name.lower().endswith((".dcm", ".dicom")) and _named_dicom(head, name):
        return True
    if len(head) < 12 or int.from_bytes(head[:2], "little") not in (0x0002, 0x0008):
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR
        at, size = (8, 4) if vr in _LONG_VRS else (6, 2)
        length = int.from_bytes(head[at : at + size], "little")
    else:
        length = int.from_bytes(head[4:8], "little")
    if int.from_bytes(head[2:4], "little") == 0:  # a group length is 4 bytes long
        return length == 4
    return length <= _SANE_FIRST_LENGTH and length % 2 == 0


def _sniff(path: Path) -> bytes:
    """The first `SNIFF_BYTES` of a regular file, opened without blocking (it was stat-ed as
    regular, but could be swapped for a FIFO in between)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, SNIFF_BYTES)
    finally:
        os.close(fd)


def is_dicom_file(path: str | Path) -> bool:
    """Whether `path` is DICOM by name (.dcm, .dicom) or by its first bytes. Never blocks
    (special files are not opened) and never raises: an unreadable file is not DICOM here,
    its reader says why. For callers that expand a DICOM's frames (`data.loading`)."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        return stat.S_ISREG(os.stat(path).st_mode) and looks_like_dicom(_sniff(path))
    except OSError:
        return False


def _report(problem: str, errors: list[str] | None) -> None:
    """Hand a listing problem to the caller, or say it on stderr: never skip silently."""
    if errors is not None:
        errors.append(problem)
        return
    from rich.markup import escape

    from fetalplanes.console import err, safe_text

    err.print(f"[yellow]skipped:[/yellow] {escape(safe_text(problem))}")


def _special_entry(path: Path) -> str | None:
    """Why an entry found in a folder cannot be read as a file, or None if it can."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{path}: {_missing_text(path)}"
    except OSError as exc:
        return f"{path}: {os_error_text(exc)}"
    if stat.S_ISDIR(mode):
        if os.path.islink(path):  # folders are walked without following symlinks (no loops)
            return f"{path}: symlink to a folder, not followed"
        return None  # a folder named x.png is walked like any folder
    why = _why_not_regular(mode)
    return f"{path}: {why}" if why else None


def _quiet_skip(name: str, hidden_folder: bool) -> bool:
    """Files left out without a line: hidden ones, those in hidden folders and fetalplanes'
    own outputs (a sort journal in OUT, a run folder's weights)."""
    return (
        hidden_folder
        or name.startswith(".")
        or name in OWN_OUTPUTS
        or name.lower().endswith(_OWN_SUFFIXES)
    )


def _entry(f: Path, hidden_folder: bool, result: ListResult, errors: list[str] | None) -> None:
    """Sort one folder entry into `result`: listed, skipped with a line, or left out quietly."""
    named_image = is_input_path(f)  # images, DICOM and videos by name; the rest by content
    if not named_image and _quiet_skip(f.name, hidden_folder):
        if not os.path.isdir(f):
            result.hidden += 1
        return
    problem = _special_entry(f)
    if problem:
        result.skipped.append(problem)
        _report(problem, errors)
        return
    if not f.is_file():
        return  # a real folder: os.walk goes into it
    if named_image:
        result.append(f)
        return
    try:
        dicom = looks_like_dicom(_sniff(f))
    except OSError as exc:
        problem = f"{f}: {os_error_text(exc)}"
    else:
        if dicom and f.name.upper() == "DICOMDIR":
            problem = f"{f}: a DICOMDIR index, not an image (its images are read from the folder)"
        elif dicom:
            result.append(f)
            return
        else:
            problem = f"{f}: not an image or DICOM file"
    result.skipped.append(problem)
    _report(problem, errors)


def _walk(folder: Path, recursive: bool, errors: list[str] | None) -> ListResult:
    """Image files under `folder`, and DICOM files by content; symlinked folders are not
    followed (no loops). Every other entry is named once (`_report`), except hidden files
    and fetalplanes' own outputs."""
    result = ListResult()

    def unreadable(exc: OSError) -> None:
        where = exc.filename if exc.filename is not None else folder
        problem = f"{where}: folder not searched ({os_error_text(exc)})"
        result.skipped.append(problem)
        _report(problem, errors)

    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=False):
        base = Path(root)
        hidden_folder = any(part.startswith(".") for part in base.relative_to(folder).parts)
        names = sorted(files) + sorted(d for d in dirs if os.path.islink(base / d))
        for name in names:
            _entry(base / name, hidden_folder, result, errors)
        if not recursive:
            break
    result.sort()
    return result


def list_images(
    paths: Iterable[str | Path], recursive: bool = True, errors: list[str] | None = None
) -> ListResult:
    """Expand files and folders into a sorted list of image files (folders recursively).

    In folders, files are taken by image extension (PNG, JPEG/JFIF, BMP, TIFF, GIF, WebP,
    DICOM .dcm/.dicom) and, without a known one, by content when they are DICOM
    (`looks_like_dicom`: the first 132 bytes, nothing is decoded). Files given by name are
    returned as given (the reader reports a missing or unreadable one per file), except
    special files (FIFO, socket, device) that a reader could block on.

    Nothing is skipped silently: every file left out (not an image, a special file, a
    dangling symlink or loop, a folder that cannot be searched) becomes one line in
    `errors` when a list is given, else a line on stderr. Hidden files and fetalplanes' own
    outputs are only counted. The result is a list; its `skipped` and `hidden` attributes
    give the counts for summaries (`ListResult`).
    """
    found = ListResult()
    for p in paths:
        p = Path(p)
        try:
            mode: int | None = os.stat(p).st_mode
        except OSError:
            mode = None  # missing or unreadable: the reader says which, per file
        if mode is not None and stat.S_ISDIR(mode):
            walked = _walk(p, recursive, errors)
            found.extend(walked)
            found.skipped.extend(walked.skipped)
            found.hidden += walked.hidden
        elif mode is not None and not stat.S_ISREG(mode):
            problem = f"{p}: {_why_not_regular(mode)}"
            found.skipped.append(problem)
            _report(problem, errors)
        else:
            found.append(p)
    return found


# ---------------------------------------------------------------- headers


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) of a PNG, from its IHDR chunk."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return (
        int.from_bytes(data[16:20], "big"),
        int.from_bytes(data[20:24], "big"),
        data[24],
        data[25],
    )


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment (`jpeg_header`)."""
    head = jpeg_header(data)
    return None if head is None else (head[2], head[1])


_MAGIC = (
    (_PNG_SIGNATURE, "PNG"),
    (b"\xff\xd8", "JPEG"),
    (b"GIF8", "GIF"),
    (b"II*\0", "TIFF"),
    (b"MM\0*", "TIFF"),
    (b"BM", "BMP"),
)


def _unidentified(data: bytes) -> str:
    """Why Pillow could not open `data`: a broken file of a known format, or no image."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return f"corrupt or truncated {fmt} (header unreadable)"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "corrupt or truncated WebP (header unreadable)"
    return not_accepted(data[:HEAD_BYTES])


def accepted_format(data: bytes, name: str) -> str:
    """The allowed image format of `data` from its first bytes; ImageError for anything else
    (PostScript, PDF, SVG ...), before any decoder sees a byte (`data.formats`)."""
    fmt = image_format(data[:HEAD_BYTES])
    if fmt is None:
        raise ImageError(f"{name}: {not_accepted(data[:HEAD_BYTES])}")
    return fmt


def _pillow_size(data: bytes, name: str) -> tuple[int, int]:
    """Size from Pillow's lazy open (reads the header only), allowed formats only."""
    fmt = accepted_format(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bombs are judged by size; no stray stderr lines
            with pillow_open(data, fmt) as img:
                return img.size
    except UnidentifiedImageError:
        raise ImageError(f"{name}: {_unidentified(data)}") from None
    except Image.DecompressionBombError:
        raise ImageError(
            f"{name}: image too large (decompression-bomb guard; limit {MAX_PIXELS:,} pixels)"
        ) from None
    except Exception as exc:  # Pillow raises assorted errors on corrupt headers
        why = _unidentified(data)
        if why.startswith("not an image"):
            why = f"unreadable image header ({_one_line(exc)})"
        raise ImageError(f"{name}: {why}") from None


def image_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """(width, height) read from the header alone, without decoding any pixel.

    PNG IHDR and JPEG SOF are parsed here, DICOM by `data.dicom` (first frame), anything
    else by Pillow's lazy open. Raises ImageError for empty data and unrecognised formats.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    if _sniff_dicom(data, name):
        dcm = _open_dicom(data, name)
        return dcm.columns, dcm.rows
    png = _png_header(data)
    if png is not None:
        return png[0], png[1]
    return _jpeg_size(data) or _pillow_size(data, name)


def decoded_pixels(data: bytes, name: str = "<bytes>") -> int:
    """Pixels `decode_image` would decode for `data`, from the header alone: 0 when it would
    refuse the data before decoding (not an image, no pixels, over MAX_PIXELS). Lets a
    server budget decoding work per request before doing any."""
    try:
        width, height = image_size(data, name)
    except ImageError:
        return 0
    pixels = max(width, 0) * max(height, 0)
    return pixels if pixels <= MAX_PIXELS else 0


#: Peak bytes of memory per decoded pixel, measured (decode -> grey -> crop -> resize) on
#: 64-megapixel files with `ru_maxrss` (docs/reliability.md): lossless WebP 15.3 (libwebp
#: decodes into a buffer Pillow then copies), colour PNG/JPEG 6.1, grey PNG 5.8; DICOM adds
#: pydicom's frame array. Rounded up: an estimate must never be below the real cost.
BYTES_PER_PIXEL = {"WEBP": 17, "DICOM": 9}
DEFAULT_BYTES_PER_PIXEL = 7


def decode_cost(data: bytes, name: str = "<bytes>") -> int:
    """Bytes of memory decoding `data` may take at its peak, from the header alone (0 when
    `decode_image` would refuse it before decoding). Lets a server bound the memory of the
    decoding it runs at once, by bytes rather than pixels."""
    pixels = decoded_pixels(data, name)
    if not pixels:
        return 0
    fmt = "DICOM" if _sniff_dicom(data, name) else image_format(data[:HEAD_BYTES]) or ""
    return pixels * BYTES_PER_PIXEL.get(fmt, DEFAULT_BYTES_PER_PIXEL)


def _check_size(width: int, height: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: image too large ({width}x{height} pixels, limit {MAX_PIXELS:,})"
        )


# ---------------------------------------------------------------- DICOM


def _sniff_dicom(data: bytes, name: str) -> bool:
    """DICOM by its bytes, whatever the file is called (`looks_like_dicom`)."""
    return looks_like_dicom(data[:4096], name)


def _named_dicom(head: bytes, name: str) -> bool:
    """A bare data set in a file named .dcm/.dicom that pydicom can start to read."""
    try:
        from fetalplanes.data.dicom import is_dicom
    except ImportError:  # pydicom is an extra; without it only marked files are DICOM
        return False
    return is_dicom(head[:4096], name if name.lower().endswith(".dcm") else name + ".dcm")


def open_dicom_bytes(source: bytes | str | Path, name: str) -> Any:
    """A DICOM file (bytes, or a path read lazily) opened and validated without decoding
    pixels; every failure is one ImageError line naming it."""
    if not isinstance(source, bytes):
        read_head(source)  # a FIFO or device named .dcm is refused, never opened blocking
    return _open_dicom(source, name)


def guarded_decode(decode: Any, name: str) -> np.ndarray:
    """Run a pixel decoder with library warnings kept off stderr and any failure turned into
    one ImageError line naming the item."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return decode()
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"{name}: out of memory decoding the pixels") from None
    except Exception as exc:
        raise ImageError(f"{name}: cannot decode the pixels ({_one_line(exc)})") from None


def _open_dicom(data: bytes | str | Path, name: str) -> Any:
    """`data.dicom.open_dicom`: header checks (bombs, syntax, pixels) before any decoding."""
    try:
        from fetalplanes.data.dicom import open_dicom
    except ImportError:  # pragma: no cover - depends on the install
        raise ImageError(
            f"{name}: DICOM file needs pydicom (pip install 'fetalplanes[dicom]')"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's notes on odd headers: not for stderr
            return open_dicom(data, name)
    except ImageError:
        raise
    except Exception as exc:  # a header pydicom cannot parse
        raise ImageError(f"{name}: unreadable DICOM ({_one_line(exc)})") from None


def _decode_dicom(data: bytes, name: str) -> np.ndarray:
    """First frame of a DICOM file, as the same gray image a PNG of it would give."""
    dcm = _open_dicom(data, name)
    _check_size(dcm.columns, dcm.rows, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = dcm.frame(0)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{name}: cannot decode DICOM pixels ({_one_line(exc)})") from None
    if frame.ndim == 3:
        from fetalplanes.data.crop import to_gray

        return to_gray(frame)
    return np.ascontiguousarray(frame)


# ---------------------------------------------------------------- pixels


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_uint8_gray(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if arr.dtype != np.uint8:
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        arr = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    """Gray stays as is; colour screen captures use the channel mean (what SonoNet saw)
    with saturated overlays (Doppler, coloured text) damped."""
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA"):
        from fetalplanes.data.crop import STRIP_PIXELS, to_gray

        # strip by strip: a 64-megapixel colour image never exists twice (as a converted
        # Pillow image and as a numpy copy); per-pixel conversions give the same pixels
        width, height = img.size
        out = np.empty((height, width), np.uint8)
        rows = max(1, STRIP_PIXELS // max(1, width))
        for y in range(0, height, rows):
            strip = img.crop((0, y, width, min(height, y + rows))).convert("RGB")
            out[y : y + rows] = to_gray(np.asarray(strip, dtype=np.uint8))
        return out
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[-1] < 3:  # e.g. PA, La: the first channel is the gray
        arr = arr[..., 0]
    return _to_uint8_gray(arr)


@functools.cache
def opencv() -> Any:
    """OpenCV, set up once for this package.

    Its own thread pool deadlocks in forked DataLoader workers (parallelism comes from
    worker processes instead, and per-image ops are too small to gain from threads),
    and its log lines about corrupt files would duplicate our one-line errors.
    """
    import cv2

    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


#: Formats whose EXIF Orientation tag viewers honour (a phone or scanner may store the
#: pixels sideways and say so there); PNG's rarely used eXIf chunk is left alone.
EXIF_FORMATS = ("JPEG", "TIFF", "WEBP")


def _upright(img: Image.Image, fmt: str) -> Image.Image:
    """The image as every viewer shows it: its EXIF Orientation applied (JPEG, TIFF, WebP)."""
    if fmt not in EXIF_FORMATS:
        return img
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # an unreadable EXIF block: the pixels as stored
        return img
    if orientation in (None, 1):
        return img
    from PIL import ImageOps

    return ImageOps.exif_transpose(img)


def _decode_pillow(data: bytes, name: str) -> np.ndarray:
    allowed = accepted_format(data, name)
    fmt = ""  # "PNG " once Pillow has read the header, for the messages
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on odd files: not for stderr
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with pillow_open(data, allowed) as img:
                fmt = f"{img.format} " if img.format else ""
                _check_size(img.width, img.height, name)
                img.load()
                return _pil_to_gray(_upright(img, allowed))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: {_unidentified(data)}") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(f"{name}: image too large (decompression-bomb guard)") from None
    except OSError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ImageError(f"{name}: truncated or corrupt {fmt}image ({reason})") from None
    except Exception as exc:  # Pillow raises assorted errors on corrupt data
        raise ImageError(f"{name}: corrupt {fmt}image ({_one_line(exc)})") from None


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode image bytes (PNG, JPEG, BMP, TIFF, WebP, GIF or DICOM) to a 2-D uint8 array.

    The content is sniffed, never the extension, so a mislabelled file is still read
    and a non-image with an image extension is rejected with a clear message. Only the
    formats of `data.formats` reach a decoder (never Pillow's EPS/PostScript plugin). The
    size is checked from the header before any decoder runs; every failure is an ImageError.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    if _sniff_dicom(data, name):
        return _decode_dicom(data, name)
    accepted_format(data, name)  # the allow-list, before any decoder runs
    _check_size(*image_size(data, name), name)
    return _decode_pillow(data, name)
