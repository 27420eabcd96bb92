"""Parallel, streaming decode of image files into preprocessed uint8 batches.

Decoding a PNG costs more than a small network's forward pass, so decoding runs
in worker processes (torch DataLoader) overlapped with whatever consumes the
batches. A bad file never stops a batch: it comes back as a failure with its
one-line message.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch.utils.data import DataLoader, Dataset

from fetalplanes.data.images import decode_image
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.errors import ImageError


def content_hash(data: bytes) -> str:
    """Short content key of a file's bytes (cache key, duplicate detection)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Item:
    index: int
    array: np.ndarray | None
    error: str | None
    digest: str


class PathDataset(Dataset[Item]):
    """Reads, hashes and prepares one file per item; errors become data, not exceptions."""

    def __init__(self, paths: Sequence[Path], pp: Preprocess, indices: Sequence[int] | None = None):
        self.paths = list(paths)
        self.pp = pp
        self.indices = list(range(len(self.paths))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Item:
        idx = self.indices[i]
        path = self.paths[idx]
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            msg = "file not found" if isinstance(exc, FileNotFoundError) else str(exc)
            return Item(idx, None, f"{path}: {msg}", "")
        digest = content_hash(data)
        try:
            arr = self.pp.prepare_array(decode_image(data, str(path)))
        except ImageError as exc:
            return Item(idx, None, str(exc), digest)
        return Item(idx, arr, None, digest)


@dataclass
class Batch:
    """Prepared images of one batch; `indices` index the original path list."""

    indices: list[int]
    arrays: np.ndarray  # (n, H, W) uint8, n may be 0
    digests: list[str]
    failures: list[tuple[int, str]]
    outputs: Any = None  # the model's outputs for `arrays`, when the workers ran it


class WorkerModel(Protocol):
    """A picklable recipe for a model that each worker process builds once for itself.

    Why: on a CPU, one single-threaded model per worker process (decode -> crop ->
    resize -> network, no hand-over) keeps every core busy, whereas a multi-threaded
    model in the main process stalls whenever a decode worker takes one of its cores.
    """

    def build(self) -> Callable[[np.ndarray], Any]:
        """(N,H,W) uint8 -> the model's outputs (`inference.outputs.Outputs`)."""
        ...


_built: dict[tuple[int, int], Callable[[np.ndarray], Any]] = {}


def _worker_outputs(model: WorkerModel, arrays: np.ndarray) -> Any:
    """Run `model`, built once per process (a forked worker never reuses its parent's)."""
    key = (os.getpid(), id(model))
    if key not in _built:
        _built.clear()
        _built[key] = model.build()
    return _built[key](arrays)


def _collate(items: list[Item], model: WorkerModel | None = None) -> Batch:
    ok = [it for it in items if it.array is not None]
    arrays = np.stack([it.array for it in ok]) if ok else np.zeros((0, 0, 0), dtype=np.uint8)
    batch = Batch(
        [it.index for it in ok],
        arrays,
        [it.digest for it in ok],
        [(it.index, it.error or "unknown error") for it in items if it.array is None],
    )
    if model is not None and ok:
        batch.outputs = _worker_outputs(model, arrays)
    return batch


def default_workers(n_items: int) -> int:
    """Worker processes worth starting: none for a handful of files."""
    if n_items < 32:
        return 0
    return max(1, min(4, (os.cpu_count() or 1)))


def iter_batches(
    paths: Sequence[Path],
    pp: Preprocess,
    batch_size: int = 32,
    workers: int | None = None,
    indices: Sequence[int] | None = None,
    model: WorkerModel | None = None,
) -> Iterator[Batch]:
    """Yield prepared batches in input order, decoding in `workers` processes.

    With `model`, each worker also runs the model on its batches and fills
    `Batch.outputs` (see `WorkerModel`).
    """
    ds = PathDataset(paths, pp, indices)
    n_workers = default_workers(len(ds)) if workers is None else workers
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=n_workers,
        collate_fn=partial(_collate, model=model),
        prefetch_factor=4 if n_workers else None,
        persistent_workers=False,
    )
    yield from loader
