"""The decode stage of the engine: items -> prepared network inputs, in worker processes.

Decoding a PNG costs more than a small network's forward pass, so decoding (and, for ONNX
models, the network itself: `WorkerModel`) runs in worker processes (a `multiprocessing`
pool, no torch needed) overlapped with whatever consumes the batches; at most a few chunks
per worker are in flight, so memory stays flat however many items stream through. A bad
item never stops a batch: it comes back as a failure with its one-line message.

Every item goes through `prepare_item`: `sources.load` (the one decoder dispatch) then
`Preprocess.prepare_frame` (the declared region first, else the guessed crop; resize), in
the workers and in-process alike, so the executor never changes an answer.

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
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fetalplanes.data.images import list_images, read_image_bytes
from fetalplanes.data.items import parse_frame_name
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.data.sources import Item, load
from fetalplanes.errors import FetalPlanesError, ImageError


def content_hash(data: bytes) -> str:
    """Short content key of a file's bytes (cache key, duplicate detection)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Prepared:
    """One item after decode -> crop -> resize: the network input, or its one-line error."""

    array: np.ndarray | None
    error: str | None
    digest: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # pixel_spacing_mm, notes


def prepare_item(item: Item, pp: Preprocess, digest: bool = False) -> Prepared:
    """Decode an item (`sources.load`), apply the one crop rule and resize (`Preprocess.
    prepare_frame`). Errors become data, not exceptions; `digest` hashes a file's bytes."""
    key = ""
    try:
        if digest and item.path is not None and item.data is None and item.pixels is None:
            data = read_image_bytes(item.path)  # refuses FIFOs, devices, folders: one line each
            key = content_hash(data) + ("" if item.frame is None else f"#{item.frame}")
            item = replace(item, data=data)
        frame = load(item)
        meta = {"pixel_spacing_mm": frame.spacing_mm, "notes": frame.notes}
        return Prepared(pp.prepare_frame(frame), None, key, meta)
    except ImageError as exc:
        return Prepared(None, str(exc), key)
    except MemoryError:
        return Prepared(None, f"{item.name}: out of memory while decoding", key)


def read_item(name: str) -> tuple[np.ndarray, dict[str, Any], str]:
    """(grey image cut to its declared region, metadata, content digest) of a file or a
    `file.dcm#frame=N` item; `meta["region_cropped"]` says the region was applied."""
    path, frame = parse_frame_name(str(name))
    data = read_image_bytes(path)
    digest = content_hash(data) + ("" if frame is None else f"#{frame}")
    loaded = load(Item(str(name), frame, path=path, data=data))
    meta: dict[str, Any] = {"frame": frame, "pixel_spacing_mm": loaded.spacing_mm}
    if loaded.region is not None:
        meta["region_cropped"] = True
    return np.ascontiguousarray(loaded.cropped()), meta, digest


def path_items(paths: Sequence[str | Path]) -> list[Item]:
    """Items of files and `file.dcm#frame=N` names (the form item names take in journals)."""
    items = []
    for p in paths:
        path, frame = parse_frame_name(str(p))
        items.append(Item(str(p), frame, path=path))
    return items


def expand_frames(paths: Sequence[str | Path]) -> list[str]:
    """Files as item names, each frame of a multi-frame DICOM as its own `file.dcm#frame=N`
    (videos stay one name: their frames come from `sources.VideoFile`)."""
    from fetalplanes.data.sources import DicomFile, file_source

    names: list[str] = []
    for p in paths:
        name = str(p)
        if "#frame=" in name or Path(name).suffix.lower() not in (".dcm", ".dicom"):
            names.append(name)
            continue
        source = file_source(name)
        if isinstance(source, DicomFile):
            names.extend(it.name for it in source.items())
        else:
            names.append(name)
    return names


def list_items(inputs: Sequence[str | Path]) -> list[str]:
    """Files and folders (recursively) -> item names: image files, and every frame of a
    multi-frame DICOM as its own item."""
    return expand_frames(list_images([Path(p) for p in inputs]))


class PathDataset:
    """Reads, hashes and prepares one file item per index; errors become data."""

    def __init__(self, paths: Sequence[Path], pp: Preprocess, indices: Sequence[int] | None = None):
        self.paths = list(paths)
        self.pp = pp
        self.indices = list(range(len(self.paths))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> LoadedItem:
        idx = self.indices[i]
        item = path_items([self.paths[idx]])[0]
        done = prepare_item(item, self.pp, digest=True)
        return LoadedItem(idx, done.array, done.error, done.digest, done.meta)


@dataclass
class LoadedItem:
    index: int
    array: np.ndarray | None
    error: str | None
    digest: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """Prepared images of one chunk; `indices` index the chunk's items (or, from
    `iter_batches`, the original path list)."""

    indices: list[int]
    arrays: np.ndarray  # (n, H, W) uint8, n may be 0
    digests: list[str]
    failures: list[tuple[int, str]]
    outputs: Any = None  # the model's outputs for `arrays`, when the workers ran it
    meta: list[dict[str, Any]] = field(default_factory=list)  # per index: spacing, notes


#: item -> a context held while it is decoded (see `prepare_chunk`)
Hold = Callable[[Item], contextlib.AbstractContextManager[Any]]


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


def _collate(done: list[Prepared], model: WorkerModel | None = None) -> Batch:
    ok = [i for i, d in enumerate(done) if d.array is not None]
    arrays = (np.stack([done[i].array for i in ok]) if ok  # type: ignore[misc]
              else np.zeros((0, 0, 0), dtype=np.uint8))
    batch = Batch(
        ok,
        arrays,
        [done[i].digest for i in ok],
        [(i, d.error or "unknown error") for i, d in enumerate(done) if d.array is None],
        meta=[done[i].meta for i in ok],
    )
    if model is not None and ok:
        batch.outputs = _worker_outputs(model, arrays)
    return batch


def prepare_chunk(items: Sequence[Item], pp: Preprocess, model: WorkerModel | None = None,
                  digest: bool = False, hold: Hold | None = None) -> Batch:
    """Decode and prepare a chunk of items (and run `model` on them): one worker task.
    `hold(item)` is entered around each item's decoding (a server's memory budget)."""
    if hold is None:
        return _collate([prepare_item(it, pp, digest) for it in items], model)
    done = []
    for it in items:
        with hold(it):
            done.append(prepare_item(it, pp, digest))
    return _collate(done, model)


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


#: The worker's copy of what it needs: set once per worker by `_init_worker`.
_WORK: dict[str, Any] = {}


def _init_worker(pp: Preprocess, model: WorkerModel | None, digest: bool,
                 parent_pid: int | None, by_main: bool) -> None:
    _die_with_parent(parent_pid, by_main, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler is not ours
    _WORK.update(pp=pp, model=model, digest=digest)


def _work(items: list[Item]) -> Batch:
    return prepare_chunk(items, _WORK["pp"], _WORK["model"], _WORK["digest"])


def _pool_context() -> Any:
    """fork where there is one: the preprocessing and model recipe are inherited."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else methods[0])


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class DecodePool:
    """Decode workers (and, with `model`, the network in them) that outlive one stream.

    Why: a long-running node (`listen`, a server) classifies a few items at a time, and a
    pool per call would pay process start-up and a model load every time. Create it once,
    before the node starts its threads (workers are forked), pass it to every
    `Predictor.stream(..., pool=)`, and `close()` it at the end. Workers die with their
    parent, like every decode worker."""

    def __init__(self, pp: Preprocess, workers: int, model: WorkerModel | None = None,
                 digest: bool = False):
        self.pp, self.model, self.workers = pp, model, max(1, workers)
        by_main = threading.current_thread() is threading.main_thread()
        ctx = _pool_context()
        parent = None if ctx.get_start_method() == "forkserver" else os.getpid()
        self._executor = ProcessPoolExecutor(self.workers, ctx, _init_worker,
                                             (pp, model, digest, parent, by_main))

    def start(self) -> DecodePool:
        """Start every worker now (a fork pool starts them all at its first task), so they
        are forked from this thread before the caller starts others."""
        self._executor.submit(_work, []).result()
        return self

    def close(self) -> None:
        _stop(self._executor)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_prepared(
    items: Iterable[Item],
    pp: Preprocess,
    batch_size: int = 32,
    workers: int = 0,
    model: WorkerModel | None = None,
    digest: bool = False,
    hold: Hold | None = None,
    pool: DecodePool | None = None,
) -> Iterator[tuple[list[Item], Batch]]:
    """(chunk of items, its prepared batch) in input order, decoding in `workers` processes
    (0: here) or in a long-lived `pool`. Items are taken lazily (a video decodes while
    earlier frames are prepared); at most `4 x workers` chunks are in flight. With `model`,
    each worker also runs the model on its chunk and fills `Batch.outputs`."""
    chunks = _chunks(items, max(1, batch_size))
    if pool is None and (workers <= 0 or hold is not None):
        with sigterm_interrupts():
            for chunk in chunks:
                yield chunk, prepare_chunk(chunk, pp, model, digest, hold)
        return
    own = pool is None
    if pool is None:
        pool = DecodePool(pp, workers, model, digest)
    executor = pool._executor
    try:
        with sigterm_interrupts():
            pending: deque[tuple[list[Item], Any]] = deque(
                (c, executor.submit(_work, c)) for c in _take(chunks, 4 * pool.workers)
            )
            while pending:
                chunk, future = pending.popleft()
                try:
                    batch = future.result()
                except BrokenProcessPool:
                    raise FetalPlanesError(
                        "a decode worker process died (out of memory, or killed); "
                        "run again with --workers 0 to decode in one process"
                    ) from None
                pending.extend((c, executor.submit(_work, c)) for c in _take(chunks, 1))
                yield chunk, batch
    finally:
        if own:
            pool.close()


def iter_batches(
    paths: Sequence[Path | str],
    pp: Preprocess,
    batch_size: int = 32,
    workers: int | None = None,
    indices: Sequence[int] | None = None,
    model: WorkerModel | None = None,
) -> Iterator[Batch]:
    """Prepared batches of files (with their content digests) in input order; `indices`
    picks some of `paths`, and the batches' `indices` index `paths` (the cache's reader)."""
    picked = list(range(len(paths))) if indices is None else list(indices)
    n_workers = default_workers(len(picked)) if workers is None else workers
    if -(-len(picked) // max(1, batch_size)) <= 1:
        n_workers = 0
    items = path_items([paths[i] for i in picked])
    done = 0
    for chunk, batch in iter_prepared(items, pp, batch_size, n_workers, model, digest=True):
        where = picked[done : done + len(chunk)]
        batch.indices = [where[i] for i in batch.indices]
        batch.failures = [(where[i], m) for i, m in batch.failures]
        done += len(chunk)
        yield batch


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now, even mid-batch (an interrupted or abandoned stream)."""
    for proc in list(getattr(pool, "_processes", {}).values()):
        if proc.is_alive():
            proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _take(it: Iterator[range], n: int) -> list[range]:
    out = []
    for _ in range(n):
        c = next(it, None)
        if c is None:
            break
        out.append(c)
    return out
