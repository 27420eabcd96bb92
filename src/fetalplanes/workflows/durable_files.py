"""Files that survive a crash or a power cut: written to a temporary file, fsynced, renamed,
and the folder fsynced (the DICOM node acknowledges an instance only after this; the sort
journal is repaired this way)."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where dirs cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes, tmp_dir: Path, durable: bool = False) -> None:
    """Write ``data`` to a temporary file in ``tmp_dir`` (same file system), then rename:
    readers see the old file or the whole new one, never a part. ``durable``: fsync the
    file before and the folder after the rename (survives a power cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{threading.get_ident()}.part"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)
