"""Parallel, streaming decode of image files into preprocessed uint8 batches.

Decoding a PNG costs more than a small network's forward pass, so decoding runs in
worker processes (a `multiprocessing` pool, no torch needed) overlapped with whatever
consumes the batches; at most a few batches per worker are in flight, so memory stays
flat however many files stream through. A bad file never stops a batch: it comes back
as a failure with its one-line message.

Items are files or frames of multi-frame DICOM files (`file.dcm#frame=N`,
`expand_frames`); a DICOM's declared B-mode region replaces the guessed ultrasound crop
and its pixel spacing travels with the item (`Batch.meta`).

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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fetalplanes.data.crop import to_gray
from fetalplanes.data.images import decode_image, list_images, read_image_bytes
from fetalplanes.data.items import frame_name, parse_frame_name
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.errors import FetalPlanesError, ImageError


def content_hash(data: bytes) -> str:
    """Short content key of a file's bytes (cache key, duplicate detection)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Item:
    index: int
    array: np.ndarray | None
    error: str | None
    digest: str
    meta: dict[str, Any] = field(default_factory=dict)  # frame, pixel_spacing_mm


def read_dicom_item(source: bytes | str, name: str, frame: int | None) -> tuple[np.ndarray, dict]:
    """A DICOM frame as gray uint8, cropped to its declared B-mode region, with metadata.

    `meta["region_cropped"]` tells `Preprocess` not to guess the crop again.
    """
    from fetalplanes.data.dicom import open_dicom  # pydicom only for DICOM files

    dcm = open_dicom(source, name)
    if frame is not None and not 0 <= frame < dcm.n_frames:
        raise ImageError(f"{name}: frame {frame} out of range (the file has {dcm.n_frames})")
    img = dcm.frame(frame or 0)
    gray = to_gray(img) if img.ndim == 3 else img
    meta: dict[str, Any] = {"frame": frame, "pixel_spacing_mm": dcm.spacing_mm()}
    region = dcm.bmode_region()
    if region is not None:
        gray = gray[region.y0 : region.y1 + 1, region.x0 : region.x1 + 1]
        meta["region_cropped"] = True
    return np.ascontiguousarray(gray), meta


def read_item(name: str) -> tuple[np.ndarray, dict[str, Any], str]:
    """(gray image, metadata, content digest) of a file or a `file.dcm#frame=N` item."""
    path, frame = parse_frame_name(str(name))
    data = read_image_bytes(path)  # refuses FIFOs, devices, folders: one line each
    digest = content_hash(data) + ("" if frame is None else f"#{frame}")
    if frame is not None or _maybe_dicom(data, path):
        from fetalplanes.data.dicom import is_dicom

        if frame is not None or is_dicom(data[:132], path):
            gray, meta = read_dicom_item(data, str(name), frame)
            return gray, meta, digest
    return decode_image(data, str(name)), {}, digest


def _maybe_dicom(data: bytes, path: str) -> bool:
    return data[128:132] == b"DICM" or path.lower().endswith((".dcm", ".dicom"))


def expand_frames(paths: Sequence[str | Path]) -> list[str]:
    """Files as items, each frame of a multi-frame DICOM as its own `file.dcm#frame=N` item.

    Only the header is read here; a file that cannot be opened stays one item, so its
    one-line error is reported where it is decoded.
    """
    items: list[str] = []
    for p in paths:
        name = str(p)
        if Path(name).suffix.lower() not in (".dcm", ".dicom") or "#frame=" in name:
            items.append(name)
            continue
        from fetalplanes.data.dicom import open_dicom

        try:
            n = open_dicom(Path(name), name).n_frames
        except (FetalPlanesError, OSError):
            n = 1
        items.extend([name] if n <= 1 else [frame_name(name, i) for i in range(n)])
    return items


def list_items(inputs: Sequence[str | Path]) -> list[str]:
    """Files and folders (recursively) -> items: image files, and every frame of a
    multi-frame DICOM as its own item."""
    return expand_frames(list_images([Path(p) for p in inputs]))


class PathDataset:
    """Reads, hashes and prepares one item per index; errors become data, not exceptions."""

    def __init__(self, paths: Sequence[Path], pp: Preprocess, indices: Sequence[int] | None = None):
        self.paths = list(paths)
        self.pp = pp
        self.indices = list(range(len(self.paths))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Item:
        idx = self.indices[i]
        try:
            gray, meta, digest = read_item(str(self.paths[idx]))
            pp = self.pp.with_(crop=False) if meta.pop("region_cropped", False) else self.pp
            return Item(idx, pp.prepare_array(gray), None, digest, meta)
        except ImageError as exc:
            return Item(idx, None, str(exc), "")


@dataclass
class Batch:
    """Prepared images of one batch; `indices` index the original path list."""

    indices: list[int]
    arrays: np.ndarray  # (n, H, W) uint8, n may be 0
    digests: list[str]
    failures: list[tuple[int, str]]
    outputs: Any = None  # the model's outputs for `arrays`, when the workers ran it
    meta: list[dict[str, Any]] = field(default_factory=list)  # per index: frame, spacing


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
        meta=[it.meta for it in ok],
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


#: The worker's copy of what it reads: set once per worker by `_init_worker`.
_WORK: dict[str, Any] = {}


def _init_worker(ds: PathDataset, model: WorkerModel | None, parent_pid: int | None,
                 by_main: bool) -> None:
    _die_with_parent(parent_pid, by_main, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler is not ours
    _WORK.update(ds=ds, model=model)


def _load_chunk(ds: PathDataset, positions: range, model: WorkerModel | None) -> Batch:
    return _collate([ds[i] for i in positions], model=model)


def _work(positions: range) -> Batch:
    return _load_chunk(_WORK["ds"], positions, _WORK["model"])


def _pool_context() -> Any:
    """fork where there is one: the dataset and model recipe are inherited, not pickled."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else methods[0])


def iter_batches(
    paths: Sequence[Path | str],
    pp: Preprocess,
    batch_size: int = 32,
    workers: int | None = None,
    indices: Sequence[int] | None = None,
    model: WorkerModel | None = None,
) -> Iterator[Batch]:
    """Yield prepared batches in input order, decoding in `workers` processes.

    With `model`, each worker also runs the model on its batches and fills
    `Batch.outputs` (see `WorkerModel`). At most `4 x workers` batches are in flight.
    """
    ds = PathDataset(paths, pp, indices)
    n_workers = default_workers(len(ds)) if workers is None else workers
    chunks = [range(i, min(i + batch_size, len(ds))) for i in range(0, len(ds), batch_size)]
    if n_workers <= 0 or len(chunks) <= 1:
        with sigterm_interrupts():
            for c in chunks:
                yield _load_chunk(ds, c, model)
        return
    by_main = threading.current_thread() is threading.main_thread()
    ctx = _pool_context()
    parent = None if ctx.get_start_method() == "forkserver" else os.getpid()
    pool = ProcessPoolExecutor(
        min(n_workers, len(chunks)), ctx, _init_worker, (ds, model, parent, by_main)
    )
    try:
        with sigterm_interrupts():
            todo = iter(chunks)
            pending = deque(pool.submit(_work, c) for c in _take(todo, 4 * n_workers))
            while pending:
                try:
                    batch = pending.popleft().result()
                except BrokenProcessPool:
                    raise FetalPlanesError(
                        "a decode worker process died (out of memory, or killed); "
                        "run again with --workers 0 to decode in one process"
                    ) from None
                pending.extend(pool.submit(_work, c) for c in _take(todo, 1))
                yield batch
    finally:
        _stop(pool)


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
