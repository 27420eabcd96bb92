"""Decode-once cache: prepared uint8 images in a memory-mapped, content-addressed store.

Rows are keyed by the file's content hash inside a folder keyed by the
preprocessing (size, crop, algorithm version), so a changed file or a changed
preprocessing is never served stale, and a renamed or copied file is a hit.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fetalplanes.console import progress as progress_bar
from fetalplanes.data.loading import content_hash, iter_batches
from fetalplanes.data.preprocess import Preprocess


def default_cache_dir() -> Path:
    """$FETALPLANES_CACHE, else ~/.cache/fetalplanes."""
    env = os.environ.get("FETALPLANES_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fetalplanes"


@dataclass
class LoadedArrays:
    """Prepared images for a list of paths; failed files are listed, not raised."""

    arrays: np.ndarray  # (n_ok, H, W) uint8
    ok: list[int]  # indices into the input paths, row i of arrays is paths[ok[i]]
    failures: list[tuple[int, str]]
    hits: int = 0
    decoded: int = 0


class ArrayCache:
    """Append-only uint8 row store for one preprocessing setting."""

    def __init__(self, root: Path, pp: Preprocess):
        self.dir = Path(root) / pp.cache_key()
        self.shape = pp.size
        self.row_bytes = pp.size[0] * pp.size[1]
        self.data_path = self.dir / "rows.u8"
        self.index_path = self.dir / "index.json"
        self.index: dict[str, int] = {}
        if self.index_path.is_file():
            try:
                self.index = json.loads(self.index_path.read_text())
            except (json.JSONDecodeError, OSError):
                self.index = {}
        self._validate()

    def _validate(self) -> None:
        """Drop index entries pointing past the data file (e.g. after a crash)."""
        size = self.data_path.stat().st_size if self.data_path.is_file() else 0
        n_rows = size // self.row_bytes
        self.index = {k: v for k, v in self.index.items() if v < n_rows}

    def rows(self) -> np.ndarray:
        n = len(self.index) and max(self.index.values()) + 1
        if not n:
            return np.zeros((0, *self.shape), dtype=np.uint8)
        return np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=(n, *self.shape))

    def append(self, digests: list[str], arrays: np.ndarray) -> None:
        """Write new rows, then the index (so a crash never indexes missing rows)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        new: dict[str, np.ndarray] = {}
        for d, arr in zip(digests, arrays, strict=True):
            if d not in self.index and d not in new:  # identical files stored once
                new[d] = arr
        if not new:
            return
        start = self.data_path.stat().st_size // self.row_bytes if self.data_path.exists() else 0
        with open(self.data_path, "ab") as f:
            f.truncate(start * self.row_bytes)
            for i, (d, a) in enumerate(new.items()):
                f.write(np.ascontiguousarray(a, dtype=np.uint8).tobytes())
                self.index[d] = start + i

    def flush(self) -> None:
        if not self.index:
            return
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.index))
        os.replace(tmp, self.index_path)


def _hash_files(paths: Sequence[Path]) -> list[str | None]:
    out: list[str | None] = []
    for p in paths:
        try:
            out.append(content_hash(Path(p).read_bytes()))
        except OSError:
            out.append(None)
    return out


def load_arrays(
    paths: Sequence[Path],
    pp: Preprocess,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "decoding images",
) -> LoadedArrays:
    """Prepare every image once; with a cache folder, later calls read the cache instead.

    Concurrent processes filling the same cache are serialised by a file lock, so one
    writer never truncates or re-indexes another's rows.
    """
    if cache_dir is None:
        return _load(paths, pp, None, workers, progress, desc)
    folder = Path(cache_dir) / pp.cache_key()
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        return _load(paths, pp, ArrayCache(cache_dir, pp), workers, progress, desc)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load(
    paths: Sequence[Path],
    pp: Preprocess,
    cache: ArrayCache | None,
    workers: int | None,
    progress: bool,
    desc: str,
) -> LoadedArrays:
    digests = _hash_files(paths) if cache is not None else [None] * len(paths)
    todo = [i for i, d in enumerate(digests) if cache is None or d not in cache.index]
    got: dict[int, np.ndarray] = {}
    failures: list[tuple[int, str]] = []
    bar = progress_bar(total=len(todo), desc=desc, unit="img",
                       disable=not progress or not todo)
    for batch in iter_batches(paths, pp, batch_size=64, workers=workers, indices=todo):
        failures.extend(batch.failures)
        for i, idx in enumerate(batch.indices):
            got[idx] = batch.arrays[i]
        if cache is not None and batch.indices:
            cache.append(batch.digests, batch.arrays)
        bar.update(len(batch.indices) + len(batch.failures))
    bar.close()
    if cache is not None:
        cache.flush()
    failed = {i for i, _ in failures}
    ok = [i for i in range(len(paths)) if i not in failed]
    rows = cache.rows() if cache is not None else None
    arrays = np.empty((len(ok), *pp.size), dtype=np.uint8)
    for j, i in enumerate(ok):
        if i in got:
            arrays[j] = got[i]
        else:
            assert rows is not None and digests[i] is not None
            arrays[j] = rows[cache.index[digests[i]]]  # type: ignore[union-attr]
    hits = len(paths) - len(todo)
    return LoadedArrays(arrays, ok, sorted(failures), hits=hits, decoded=len(got))
