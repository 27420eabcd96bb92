"""Sort images into one folder per predicted plane, safely.

Guarantees:

- Inputs are only ever read. OUT may lie inside IN (its files are then excluded from
  the input) but may neither be IN nor contain it.
- Nothing existing is overwritten (a name collision with different content gets a
  `-1`, `-2` ... suffix). Each copy appears atomically: it is written to
  `.NAME.PID.partial` beside its destination and hard-linked into place, so a crash
  never leaves a half file under a final name. `.partial` files left by a killed run
  are removed when the next sort starts.
- One sort at a time per OUT: `OUT/.fetalplanes-sort.lock` is held with `flock` for the
  whole run. The kernel drops the lock when the process dies, so a killed sort never
  blocks the next one; a second sort running at the same time refuses with one line
  naming the holder (pid, host, start time).
- The journal `OUT/predictions.csv` (result columns + `destination`) is created with
  its header atomically (temp file, fsync, link), then grows by whole rows, one per
  image, written after its copy and fsynced at most every `FSYNC_SECONDS`; a row whose
  write fails is cut off again. A rerun skips images journalled without error, so an
  interrupted run resumes losslessly: a copy whose row was lost is found identical and
  reused, never duplicated.
- Journal repair, when a sort starts: trailing NUL bytes and a torn last line (no final
  newline) are dropped; an empty or headerless journal is rebuilt with the header
  (rows of the journal's width kept, malformed ones dropped: their images are sorted
  again, existing copies reused); a fetalplanes 0.1 journal (`source` column instead of
  `path`) is rewritten in the current layout and its rows still count as done. A
  journal written for other classes, or a file that is no sort journal, is refused
  with one line. Rewrites are atomic (temp file + rename).
- Unreadable images are journalled once, with their error. A rerun reads them again: an
  image that now decodes is sorted and journalled as usual; one that still fails with
  the same message is reported but not journalled again (a new message gets a new
  row). When every input is unreadable, `SortSummary.all_unreadable` says so (the CLI
  exits 1).
- Output faults (a read-only folder or journal, a full disk) end the sort with one
  `FetalPlanesError` line naming the path and the problem; no `.partial` file is left
  behind and the journal stays valid, so a later run carries on where this one stopped.
- SIGTERM ends a sort like Ctrl-C (KeyboardInterrupt): temp files removed, the lock
  released, decode workers gone (they also die with a `kill -9`ed sort; `data.loading`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import os
import re
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fetalplanes.console import info, report_failures, warn
from fetalplanes.data.images import open_file, opencv, read_file
from fetalplanes.data.items import parse_frame_name
from fetalplanes.data.loading import sigterm_interrupts
from fetalplanes.data.sources import (
    Item,
    collect,
    count_items,
    iter_items,
    mark_output,
    raw_pixels,
)
from fetalplanes.errors import FetalPlanesError, ImageError, NoInputError
from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import PROB_PREFIX, Prediction, columns, failed
from fetalplanes.workflows.durable_files import fsync_dir

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; sorts into one OUT must not overlap
    fcntl = None  # type: ignore[assignment]

JOURNAL = "predictions.csv"
LOCK = ".fetalplanes-sort.lock"
FSYNC_SECONDS = 0.5  # a disk flush per image would cost ~10 ms on a spinning disk
#: The journal is the result schema (`results.columns`) plus where the copy went.
DEST_COLUMN = "destination"
#: fetalplanes 0.1 journals named the path column `source`.
LEGACY_PATH_COLUMN = "source"
#: Temp files of copies and journal rewrites: `.NAME.PID.partial`.
PARTIAL = re.compile(r"^\..+\.(\d+)\.partial$")
_ENCODING = ("utf-8", "surrogateescape")  # any file name round-trips
_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


@dataclass
class SortSummary:
    out: Path
    counts: Counter[str] = field(default_factory=Counter)
    copied: int = 0
    skipped_done: int = 0
    failures: list[str] = field(default_factory=list)
    found: int = 0  # images found in the input folder

    @property
    def all_unreadable(self) -> bool:
        """Images were found and not one of them could be read."""
        return self.found > 0 and len(self.failures) == self.found


# ------------------------------------------------------------------ faults
def _reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0) or exc.strerror or str(exc)


def _output_error(path: Path, exc: OSError) -> FetalPlanesError:
    return FetalPlanesError(f"{path}: cannot write the output ({_reason(exc)})")


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FetalPlanesError(f"{folder}: exists and is not a folder") from None
    except OSError as exc:
        raise _output_error(folder, exc) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ------------------------------------------------------------------ copies
def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_content(src: Path, dest: Path) -> bool:
    try:
        size, digest = src.stat().st_size, _digest(src)
    except OSError as exc:
        raise ImageError(f"{src}: {_reason(exc)}") from None
    try:
        return dest.stat().st_size == size and _digest(dest) == digest
    except OSError as exc:
        raise FetalPlanesError(f"{dest}: cannot read the output ({_reason(exc)})") from None


def _copy_file(src: Path, tmp: Path, dest: Path) -> None:
    """src -> tmp with src's times and mode; a write fault names `dest`, a read fault src."""
    try:
        fsrc = open(src, "rb")  # noqa: SIM115 (a `with` follows; open faults are the source's)
    except OSError as exc:
        raise ImageError(f"{src}: {_reason(exc)}") from None
    with fsrc:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        except OSError as exc:
            raise _output_error(tmp.parent, exc) from None
        written = False
        try:
            while True:
                try:
                    chunk = fsrc.read(1 << 20)
                except OSError as exc:
                    raise ImageError(f"{src}: {_reason(exc)}") from None
                if not chunk:
                    break
                try:
                    _write_all(fd, chunk)
                except OSError as exc:
                    raise _output_error(dest, exc) from None
            written = True
        finally:
            try:
                os.close(fd)
            except OSError as exc:  # e.g. a full network file system reports on close
                if written:
                    raise _output_error(dest, exc) from None
    with contextlib.suppress(OSError):
        shutil.copystat(src, tmp)  # like shutil.copy2; metadata is best effort


def _link_into_place(tmp: Path, dest: Path) -> bool:
    """Give tmp the name dest unless dest exists (False): never overwrites."""
    try:
        os.link(tmp, dest)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise _output_error(dest, exc) from None
    if os.path.lexists(dest):  # file systems without hard links
        return False
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        raise _output_error(dest, exc) from None
    return True


def safe_copy(src: Path, folder: Path) -> Path:
    """Copy src into folder without overwriting; reuse an identical earlier copy.

    Raises `ImageError` when src cannot be read and `FetalPlanesError` (naming the
    path) when the copy cannot be written; no temp file is left either way.
    """
    _make_dir(folder)
    stem, suffix = src.stem, src.suffix
    for i in range(100_000):
        dest = folder / (src.name if i == 0 else f"{stem}-{i}{suffix}")
        if os.path.lexists(dest):
            if dest.is_file() and _same_content(src, dest):
                return dest  # done by an earlier, interrupted run
            continue
        tmp = folder / f".{dest.name}.{os.getpid()}.partial"
        try:
            _copy_file(src, tmp, dest)
            if _link_into_place(tmp, dest):
                return dest
        finally:
            _unlink_quietly(tmp)
    raise FetalPlanesError(f"{folder}: too many files named like {src.name}")


#: Staging folder for frames of cine loops being written out as PNG (cleaned each run).
FRAMES_STAGING = ".fetalplanes-frames"


def copy_item(item: Item, folder: Path, out: Path) -> Path:
    """Copy an item's file, or write one frame of a cine or video (`x.dcm#frame=N`) as the
    lossless PNG `x_frameNNNN.png` (its pixels as stored), into folder with `safe_copy`'s
    guarantees."""
    if item.frame is None and item.path is not None:
        return safe_copy(Path(item.path), folder)
    staging = out / FRAMES_STAGING
    _make_dir(staging)
    stem = Path(parse_frame_name(item.name)[0]).stem
    png = staging / f"{stem}_frame{item.frame or 0:04d}.png"
    img = raw_pixels(item)
    ok, buf = opencv().imencode(".png", img if img.ndim == 2 else img[..., ::-1])
    if not ok:
        raise ImageError(f"{item.name}: could not encode the frame as PNG")
    try:
        png.write_bytes(buf.tobytes())
    except OSError as exc:
        _unlink_quietly(png)
        raise _output_error(png, exc) from None
    try:
        return safe_copy(png, folder)
    finally:
        _unlink_quietly(png)


# ------------------------------------------------------------------ the output folder
class _OutputLock:
    """`flock` on OUT/.fetalplanes-sort.lock: one sort per output folder at a time."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / LOCK
        self.fd = -1

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def __enter__(self) -> _OutputLock:
        if fcntl is None:
            return self
        while True:
            try:  # a folder, FIFO or device here is refused in one line, never waited on
                fd = open_file(self.path, os.O_RDWR | os.O_CREAT, FetalPlanesError, "sort lock")
            except FetalPlanesError as exc:
                raise FetalPlanesError(f"{exc}; remove it") from None
            except OSError as exc:
                raise _output_error(self.out, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise FetalPlanesError(
                    f"{self.out}: another sort is writing into this folder ({holder}); "
                    "wait for it to finish or choose another output folder"
                ) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    warn(
                        f"{self.path}: this file system cannot lock ({_reason(exc)}); "
                        "make sure no other sort writes into this folder"
                    )
                    return self
                raise FetalPlanesError(f"{self.path}: cannot lock ({_reason(exc)})") from None
            if _is_same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed it between our open and flock: lock the new one
        self.fd = fd
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        note = f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n"
        with contextlib.suppress(OSError):
            os.ftruncate(fd, os.pwrite(fd, note.encode(), 0))  # never empty in between
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            _unlink_quietly(self.path)  # while still holding it (see _is_same_file)
            os.close(self.fd)
            self.fd = -1


def _is_same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock_holder(fd: int) -> str:
    for _ in range(10):  # the holder writes its note just after taking the lock
        with contextlib.suppress(OSError):
            note = os.pread(fd, 400, 0).decode("utf-8", "replace").strip()
            if note:
                return note.splitlines()[0]
        time.sleep(0.02)
    return "holder unknown"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, someone else's
        return True
    return True


def _clean_partials(out: Path, locked: bool) -> None:
    """Remove temp files of killed runs: all of them under the lock (none is being
    written), else only those whose process is gone."""
    folders = [out]
    with contextlib.suppress(OSError):
        folders += [Path(e.path) for e in os.scandir(out) if e.is_dir(follow_symlinks=False)]
    for folder in folders:
        try:
            found = [(e.name, PARTIAL.match(e.name)) for e in os.scandir(folder) if e.is_file()]
        except OSError:
            continue
        for name, m in found:
            if m is None or (not locked and _pid_alive(int(m.group(1)))):
                continue
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                warn(f"{folder / name}: cannot remove this temp file ({_reason(exc)})")


def _check_folders(inp: Path, out: Path) -> None:
    if not inp.is_dir():
        raise FetalPlanesError(f"{inp}: input folder not found")
    i, o = inp.resolve(), out.resolve()
    if i == o:
        raise FetalPlanesError(f"{out}: output folder must differ from the input folder")
    if o in i.parents:
        raise FetalPlanesError(
            f"{out}: output folder contains the input folder {inp}; "
            "choose an output folder outside it"
        )
    if i in o.parents:
        info(f"note: {out} is inside {inp}; its files are excluded from the input")


# ------------------------------------------------------------------ the journal
def journal_columns(classes: list[str]) -> list[str]:
    return [*columns(classes), DEST_COLUMN]


def _csv_bytes(header: list[str], rows: list[dict[str, str]], with_header: bool) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, header, restval="", extrasaction="ignore")
    if with_header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode(*_ENCODING)


class _Journal:
    """Appends whole rows to an open journal; a failed write is cut off again."""

    def __init__(self, path: Path, header: list[str]):
        self.path = path
        self.header = header
        try:
            self.fd = open_file(path, os.O_WRONLY | os.O_APPEND, FetalPlanesError, "sort journal")
            self.size = os.fstat(self.fd).st_size
        except OSError as exc:
            raise _output_error(path, exc) from None
        self.synced = time.monotonic()

    def append(self, row: dict[str, str]) -> None:
        data = _csv_bytes(self.header, [row], with_header=False)
        try:
            _write_all(self.fd, data)
        except BaseException as exc:  # a full disk, or an interrupt mid-row
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            if isinstance(exc, OSError):
                raise _output_error(self.path, exc) from None
            raise
        self.size += len(data)
        if time.monotonic() - self.synced > FSYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise _output_error(self.path, exc) from None
        self.synced = time.monotonic()

    def __enter__(self) -> _Journal:
        return self

    def __exit__(self, exc_type: Any, *rest: object) -> None:
        try:
            if exc_type is None:
                self.sync()
            else:
                with contextlib.suppress(OSError):
                    os.fsync(self.fd)
        finally:
            os.close(self.fd)


def _write_new_journal(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    """Write header + rows to a temp file, fsync, then put it in place atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, _csv_bytes(header, rows, with_header=True))
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.exists():
            os.replace(tmp, path)  # a repair: the old content is already read
        elif not _link_into_place(tmp, path):  # only if still absent
            raise FetalPlanesError(f"{path}: appeared while the sort started; run it again")
        fsync_dir(path.parent)
    except OSError as exc:
        raise _output_error(path, exc) from None
    finally:
        _unlink_quietly(tmp)


def _is_header(record: list[str]) -> bool:
    return DEST_COLUMN in record and ("path" in record or LEGACY_PATH_COLUMN in record)


def _class_names(header: list[str]) -> list[str]:
    return [c.removeprefix(PROB_PREFIX) for c in header if c.startswith(PROB_PREFIX)]


def _not_a_journal(path: Path, why: str) -> FetalPlanesError:
    return FetalPlanesError(
        f"{path}: not a sort journal ({why}); move it away or choose another output folder"
    )


def _parse_journal(
    path: Path, data: bytes, want: list[str]
) -> tuple[list[str], list[dict[str, str]], int | None, list[str]]:
    """(header, rows, keep, notes): the journal after repair, see the module doc.

    `keep` is the byte length to truncate the file to when that is the whole repair,
    None when the file must be rewritten (or needs nothing: keep == len(data)).
    """
    notes: list[str] = []
    clean = data.rstrip(b"\0")
    if clean and not clean.endswith(b"\n"):
        clean = clean[: clean.rfind(b"\n") + 1]
        notes.append("dropped its torn last line")
    try:
        text = clean.decode(*_ENCODING)
        records = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
    except (csv.Error, UnicodeDecodeError) as exc:
        raise _not_a_journal(path, str(exc)) from None
    if not records:
        return want, [], None, [*notes, "rebuilt it (it was empty)"]
    first = records[0]
    if not _is_header(first):
        rows = [
            dict(zip(want, r, strict=True))
            for r in records
            if len(r) == len(want) and os.path.isabs(r[0])
        ]
        if not rows:
            raise _not_a_journal(path, f"no header and no rows of {len(want)} columns")
        dropped = len(records) - len(rows)
        notes.append(f"restored its header (kept {len(rows)} rows, dropped {dropped})")
        return want, rows, None, notes
    if sorted(_class_names(first)) != sorted(_class_names(want)):
        raise FetalPlanesError(
            f"{path}: journal of a model with other classes "
            f"({', '.join(_class_names(first))}; this model: {', '.join(_class_names(want))}); "
            "sort into another output folder"
        )
    good = [dict(zip(first, r, strict=True)) for r in records[1:] if len(r) == len(first)]
    dropped = len(records) - 1 - len(good)
    if "path" not in first:  # fetalplanes 0.1
        rows = [{c: r.get(c, "") for c in want} | {"path": r[LEGACY_PATH_COLUMN]} for r in good]
        notes.append("rewrote it in the current layout (fetalplanes 0.1 journal)")
        return want, rows, None, notes
    if set(first) != set(want):
        raise _not_a_journal(path, "columns of another fetalplanes version")
    if dropped:
        notes.append(f"dropped {dropped} malformed rows (those images are sorted again)")
        return first, good, None, notes
    return first, good, len(clean), notes


def _open_journal(path: Path, classes: list[str]) -> tuple[_Journal, set[str], dict[str, str]]:
    """The journal ready to append (created or repaired), sources done, errors journalled."""
    want = journal_columns(classes)
    if not os.path.lexists(path):
        _write_new_journal(path, want, [])
        return _Journal(path, want), set(), {}
    try:  # a FIFO or folder named like the journal: one line, never a blocked open()
        os.close(open_file(path, os.O_WRONLY | os.O_APPEND, FetalPlanesError, "sort journal"))
        data = read_file(path, error=FetalPlanesError)  # read-only: refused just above
    except FetalPlanesError as exc:
        raise FetalPlanesError(f"{exc}; move it away or choose another output folder") from None
    except OSError as exc:
        raise _output_error(path, exc) from None
    header, rows, keep, notes = _parse_journal(path, data, want)
    if keep is None:
        _write_new_journal(path, header, rows)
    elif keep != len(data):
        try:
            os.truncate(path, keep)
        except OSError as exc:
            raise _output_error(path, exc) from None
    if notes:
        info(f"repaired {path}: {'; '.join(notes)}")
    done: set[str] = set()
    errors: dict[str, str] = {}
    for r in rows:
        src = r.get("path", "")
        if r.get("error"):
            errors[src] = r["error"]
        else:
            done.add(src)
    return _Journal(path, header), done, {k: v for k, v in errors.items() if k not in done}


# ------------------------------------------------------------------ sorting
def sort_images(
    predictor: Predictor,
    input_dir: str | Path,
    out_dir: str | Path,
    min_confidence: float | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    model: str | None = None,
) -> SortSummary:
    """Copy every image (and every frame of a cine or video) under input_dir into
    out_dir/<predicted plane>/ through the engine (see the module doc). `model` names the
    model in the settings recorded beside the journal."""
    inp, out = Path(input_dir), Path(out_dir)
    _check_folders(inp, out)
    if min_confidence is not None:
        predictor.min_confidence = min_confidence
    classes = predictor.output_classes
    out_res = out.resolve()
    # the input folder resolved: the same file has the same path (and error text) every run
    sources = collect([inp.resolve()], skip=lambda f: out_res in f.resolve().parents)
    summary = SortSummary(out, found=count_items(sources) or 0)
    if not sources:
        raise NoInputError(f"{inp}: no images, DICOM files or videos found")
    _make_dir(out)
    with sigterm_interrupts(), _OutputLock(out) as lock:
        _clean_partials(out, lock.held)
        if lock.held:
            shutil.rmtree(out / FRAMES_STAGING, ignore_errors=True)
        journal, done, errors = _open_journal(out / JOURNAL, classes)
        check_settings(out, sort_settings(predictor, model))
        try:
            mark_output(out, "sort")  # listings of a folder holding OUT skip it
        except OSError as exc:
            raise _output_error(out, exc) from None
        with journal:

            def todo() -> Iterator[Item]:
                for item in iter_items(sources):
                    if item.name in done:
                        summary.skipped_done += 1
                    else:
                        yield item

            already = sum(1 for s in sources for it in _names(s) if it in done)
            if already:
                info(f"{already} images already sorted in {out} (skipped)")
            stream = predictor.stream(todo(), batch_size=batch_size, workers=workers,
                                      expected=max(0, summary.found - already),
                                      progress=progress)
            try:
                for result in stream:
                    row = _journal_row(result.item, result.prediction, out, summary, classes,
                                       errors)
                    if row is not None:
                        journal.append(row)
            finally:
                stream.close()  # shuts the decode workers down now, also on errors
    report_failures(summary.failures)
    return summary


def _names(source: Any) -> list[str]:
    """Item names of a source known without decoding (a video's are not: none)."""
    if source.kind in ("image", "unreadable"):
        return [source.name]
    if source.kind == "dicom":
        return [it.name for it in source.items()]
    return []


# ------------------------------------------------------------------ settings
SETTINGS = ".fetalplanes-sort.json"


def sort_settings(predictor: Predictor, model: str | None) -> dict[str, Any]:
    """What decides where an image goes: the model and the confidence threshold."""
    card = predictor.card
    return {
        "model": model or card.architecture,
        "architecture": card.architecture,
        "classes": predictor.output_classes,
        "created": card.created,
        "min_confidence": round(float(predictor.min_confidence), 6),
    }


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record the settings of the first sort into OUT; a later sort with other settings is
    refused in one line (its images would land by other rules than those already sorted)."""
    import json

    path = out / SETTINGS
    try:
        recorded = json.loads(read_file(path, 1 << 20, FetalPlanesError)) if path.exists() \
            else None
    except (ValueError, FetalPlanesError):
        recorded = None  # unreadable: rewritten below
    if recorded is None or not isinstance(recorded, dict):
        tmp = out / f".{SETTINGS}.{os.getpid()}.partial"
        try:
            tmp.write_text(json.dumps(settings, indent=2), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _output_error(path, exc) from None
        return
    differ = [k for k in ("model", "architecture", "classes", "created", "min_confidence")
              if recorded.get(k) != settings.get(k)]
    if differ:
        was = ", ".join(f"{k} {recorded.get(k)!s}" for k in differ if k != "classes")
        now = ", ".join(f"{k} {settings.get(k)!s}" for k in differ if k != "classes")
        raise FetalPlanesError(
            f"{out} was sorted with other settings ({was or 'other classes'}; this run: "
            f"{now or 'other classes'}); sort into a new output folder, or delete {out} "
            "to sort again with these settings"
        )


def _journal_row(
    item: Item,
    p: Prediction,
    out: Path,
    summary: SortSummary,
    classes: list[str],
    errors: dict[str, str],
) -> dict[str, str] | None:
    """Copy a readable item to its folder; the journal row records source and copy
    (None: an error journalled before, unchanged)."""
    if p.ok:
        folder = p.destination
        try:
            dest = copy_item(item, out / folder, out)
        except ImageError as exc:  # the source went away after it was read
            p = failed(p.path, str(exc), p.frame)
        else:
            summary.counts[folder] += 1
            summary.copied += 1
            return p.to_row(classes) | {DEST_COLUMN: str(dest.relative_to(out))}
    summary.failures.append(p.error or "unknown error")
    row = p.to_row(classes) | {DEST_COLUMN: ""}
    return None if errors.get(row["path"]) == row["error"] else row
