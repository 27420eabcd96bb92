"""Parallel, streaming decode of image files into preprocessed uint8 batches.

Decoding a PNG costs more than a small network's forward pass, so decoding runs
in worker processes (torch DataLoader) overlapped with whatever consumes the
batches. A bad file never stops a batch: it comes back as a failure with its
one-line message.

Workers never outlive the process that started them: each one asks Linux to SIGKILL it
when its parent dies (`PR_SET_PDEATHSIG`) and exits at once if the parent is already
gone, so a `kill -9` of a predict or sort leaves no decoders running. While batches
stream in the main thread, SIGTERM raises KeyboardInterrupt (`sigterm_interrupts`), so
a terminated command unwinds like Ctrl-C: workers shut down, temp files removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
import time
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


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_SECONDS = 0.5


def _set_parent_death_signal() -> None:
    """Linux: the kernel SIGKILLs this process when the thread that forked it exits."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the getppid checks still apply
        pass


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _die_with_parent(parent_pid: int | None, forked_by_main_thread: bool, worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker must not outlive the process that started it.

    The death signal follows the *thread* that forked the worker, so it is only armed
    when that is the main thread (whose end is the process's end); otherwise a daemon
    thread polls `getppid()`. `parent_pid` is None when the parent is not the process
    that iterates (forkserver start method): the forkserver then ends with it.
    """
    if forked_by_main_thread or parent_pid is None:
        _set_parent_death_signal()
    if parent_pid is None:
        return
    if os.getppid() != parent_pid:  # died before the death signal was armed
        os._exit(1)
    if not forked_by_main_thread:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within this block, SIGTERM raises KeyboardInterrupt (once; a second one kills).

    Only in the main thread and only when nobody else handles SIGTERM (a server's own
    handler is left alone). `finally` blocks then run as on Ctrl-C: worker processes
    are shut down and temp files removed; the CLI prints one line, "interrupted".
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        # a generator may be closed by another thread, where signals cannot be set
        with contextlib.suppress(ValueError):
            if signal.getsignal(signal.SIGTERM) is interrupt:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
    # workers are forked here, on the first next(), by the thread that iterates
    by_main = threading.current_thread() is threading.main_thread()
    method = multiprocessing.get_start_method(allow_none=True)  # never fixes the default
    forkserver = (method or multiprocessing.get_all_start_methods()[0]) == "forkserver"
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=n_workers,
        collate_fn=partial(_collate, model=model),
        prefetch_factor=4 if n_workers else None,
        persistent_workers=False,
        worker_init_fn=partial(_die_with_parent, None if forkserver else os.getpid(), by_main),
    )
    with sigterm_interrupts():
        yield from loader
