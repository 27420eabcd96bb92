"""Scan a recorded sweep: classify its frames, smooth over time, find each plane's segments and
its best frame.

Why it works this way:

- **One path, one schema.** Frames go through the predictor's own `Preprocess.prepare_array`
  and `predict_prepared`, so a frame gets exactly the `Prediction` an image file would; the
  timeline CSV is the result schema with time and smoothed columns added.
- **Speed.** Decoding and preparing (crop, resize) run in a background thread while the
  network classifies the previous batch; OpenCV, Pillow and torch release the GIL, so on two
  cores the two overlap.
- **Constant memory.** Results are smoothed as they stream, with a lag of ``window // 2``
  frames; only the frames inside the window, the open segment's best frame and one best
  frame per plane are held, however long the recording.

**Smoothing rule** (docs/scan.md): the calibrated probabilities (folded, for zero-shot models)
are averaged over a centred window of ``window`` scanned frames, truncated at the ends. The
smoothed label is their argmax. A frame is ``not_target`` after smoothing when that argmax is
``not_target`` or when strictly more than half of its window was rejected by the model's
per-frame rule; it is ``uncertain`` when the smoothed confidence is below the predictor's
``min_confidence``. A **segment** is a run of consecutive scanned frames with the same
accepted (neither rejected nor uncertain) smoothed plane. Its **best frame** is the frame with
the highest calibrated probability of that plane among the segment's frames that the
per-frame rule accepted (all of its frames, if none was); a plane's best frame is the best of
its segments.
"""

from __future__ import annotations

import base64
import copy
import csv
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.data.images import opencv
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.data.video import FrameSource, open_source
from fetalplanes.errors import FetalPlanesError, ImageError
from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import NOT_TARGET, Prediction, columns, safe_cell

DEFAULT_WINDOW = 5
"""Frames in the centred smoothing window (0.2 s at 25 fps: steadies the label, keeps edges)."""
DEFAULT_BATCH = 8
"""Frames per network call: eager torch on a CPU runs several times faster per frame at 8 than
at 1; with two single-threaded batches at once (`_network_workers`) 16 is no faster and holds
~300 MB more activations."""
SMOOTHED_PREFIX = "smoothed_p_"
SMOOTHED_COLUMNS = (
    "smoothed_label",
    "smoothed_confidence",
    "smoothed_not_target",
    "smoothed_uncertain",
)


class ScanLimitError(FetalPlanesError):
    """A recording has more frames than the caller allows (the server's per-request limit)."""


def timeline_columns(classes: Sequence[str]) -> list[str]:
    """timeline.csv header: time, the result schema, then the smoothed label and probabilities."""
    return ["time_s", *columns(classes), *SMOOTHED_COLUMNS,
            *(SMOOTHED_PREFIX + c for c in classes)]


@dataclass
class TimelineRow:
    """One scanned frame: its own result and its smoothed label (see the module's rule)."""

    prediction: Prediction
    time_s: float
    probs: dict[str, float]
    label: str
    confidence: float
    not_target: bool
    uncertain: bool

    @property
    def frame(self) -> int:
        return int(self.prediction.frame or 0)

    @property
    def accepted(self) -> bool:
        """Counts towards a plane's segment: neither rejected nor uncertain after smoothing."""
        return not self.not_target and not self.uncertain

    def to_row(self, classes: Sequence[str]) -> dict[str, str]:
        """CSV view: one string per column of `timeline_columns(classes)`."""
        row = {"time_s": f"{self.time_s:.6f}", **self.prediction.to_row(classes)}
        row |= {
            "smoothed_label": safe_cell(self.label),
            "smoothed_confidence": f"{self.confidence:.6f}",
            "smoothed_not_target": str(int(self.not_target)),
            "smoothed_uncertain": str(int(self.uncertain)),
        }
        for c in classes:
            row[SMOOTHED_PREFIX + c] = f"{self.probs.get(c, 0.0):.6f}"
        return row

    def to_dict(self) -> dict[str, Any]:
        """JSON view: frame, time, the frame's own result (`Prediction.to_dict` without the
        path) and the smoothed label under `smoothed`."""
        own = {k: v for k, v in self.prediction.to_dict().items() if k not in ("path", "frame")}
        return {
            "frame": self.frame,
            "time_s": round(self.time_s, 6),
            **own,
            "smoothed": {
                "label": self.label,
                "confidence": round(self.confidence, 6),
                "not_target": self.not_target,
                "uncertain": self.uncertain,
                "probabilities": {k: round(v, 6) for k, v in self.probs.items()},
            },
        }


@dataclass
class BestFrame:
    """The frame that shows a plane best; `pixels` are the frame as decoded (grey, before the
    model's crop and resize), kept only for each plane's overall best."""

    plane: str
    frame: int
    time_s: float
    confidence: float
    pixels: np.ndarray | None = field(default=None, repr=False)

    def png(self) -> bytes:
        """The frame as PNG bytes."""
        if self.pixels is None:
            raise FetalPlanesError(f"best frame {self.frame} of {self.plane} was not kept")
        ok, buf = opencv().imencode(".png", self.pixels)
        if not ok:
            raise FetalPlanesError(f"cannot encode best frame {self.frame} as PNG")
        return buf.tobytes()

    def to_dict(self, image: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "plane": self.plane,
            "frame": self.frame,
            "time_s": round(self.time_s, 6),
            "confidence": round(self.confidence, 6),
        }
        if image:
            d["png"] = base64.b64encode(self.png()).decode("ascii")
        return d


@dataclass
class Segment:
    """A run of consecutive scanned frames with the same accepted smoothed plane."""

    plane: str
    start: int
    end: int  # frame index, inclusive
    start_s: float
    end_s: float
    n_frames: int
    best: BestFrame

    def to_dict(self) -> dict[str, Any]:
        return {
            "plane": self.plane,
            "start_frame": self.start,
            "end_frame": self.end,
            "start_s": round(self.start_s, 6),
            "end_s": round(self.end_s, 6),
            "frames": self.n_frames,
            "best": self.best.to_dict(),
        }


@dataclass
class ScanResult:
    """Everything a scan found: per-frame rows, segments, best frame per plane, timing."""

    name: str
    kind: str
    fps: float
    every: int
    window: int
    classes: list[str]
    rows: list[TimelineRow]
    segments: list[Segment]
    best: dict[str, BestFrame]
    seconds: float
    spacing_mm: tuple[float, float] | None = None
    crop_box: tuple[int, int, int, int] | None = None

    @property
    def planes(self) -> list[str]:
        """The planes the model can find (its output classes without `not_target`)."""
        return [c for c in self.classes if c != NOT_TARGET]

    @property
    def found(self) -> list[str]:
        return [p for p in self.planes if p in self.best]

    @property
    def missing(self) -> list[str]:
        return [p for p in self.planes if p not in self.best]

    @property
    def frames_per_second(self) -> float:
        """Scanned frames per second of wall time (decode, prepare, network, smoothing)."""
        return len(self.rows) / self.seconds if self.seconds > 0 else float("inf")

    @property
    def duration_s(self) -> float:
        return self.rows[-1].time_s + self.every / self.fps if self.rows else 0.0

    def summary_lines(self) -> list[str]:
        """Human summary: what was scanned, each plane found (when, best frame), what is
        missing. Names only what the user gave (`name`) and the model's classes."""
        step = "every frame" if self.every == 1 else f"every {self.every}th frame"
        lines = [
            f"{self.name}: {len(self.rows)} frames scanned ({step} of {self.duration_s:.2f} s "
            f"at {self.fps:g} fps) in {self.seconds:.1f} s ({self.frames_per_second:.1f} "
            "frames/s)"
        ]
        if self.spacing_mm is not None:
            lines.append(f"pixel spacing {self.spacing_mm[0]:.4g} x {self.spacing_mm[1]:.4g} mm")
        for plane in self.found:
            spans = ", ".join(
                f"{s.start_s:.2f}-{s.end_s:.2f} s (frames {s.start}-{s.end})"
                for s in self.segments if s.plane == plane
            )
            b = self.best[plane]
            lines.append(
                f"found {plane}: {spans}; best frame {b.frame} at {b.time_s:.2f} s, "
                f"confidence {b.confidence:.3f}"
            )
        lines.append("missing: " + (", ".join(self.missing) if self.missing else "none"))
        return lines

    def to_dict(self, images: bool = False) -> dict[str, Any]:
        """JSON view (the scan API's body); `images` adds each best frame as base64 PNG."""
        return {
            "name": self.name,
            "kind": self.kind,
            "fps": self.fps,
            "every": self.every,
            "window": self.window,
            "frames_scanned": len(self.rows),
            "duration_s": round(self.duration_s, 6),
            "seconds": round(self.seconds, 3),
            "frames_per_second": round(self.frames_per_second, 2),
            "classes": self.classes,
            "pixel_spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
            "timeline": [r.to_dict() for r in self.rows],
            "segments": [s.to_dict() for s in self.segments],
            "best": [self.best[p].to_dict(image=images) for p in self.found],
            "found": self.found,
            "missing": self.missing,
        }


# ------------------------------------------------------------------ smoothing and segments
class _Smoother:
    """Centred moving average over the stream, emitted `window // 2` frames late."""

    def __init__(self, window: int, classes: Sequence[str], min_confidence: float):
        self.half = window // 2
        self.classes = list(classes)
        self.min_confidence = min_confidence
        self.buf: deque[tuple[Prediction, float, np.ndarray]] = deque()
        self.base = 0  # stream position of buf[0]
        self.next = 0  # stream position of the next row to emit

    def push(self, pred: Prediction, time_s: float, gray: np.ndarray) -> list[
        tuple[TimelineRow, np.ndarray]
    ]:
        self.buf.append((pred, time_s, gray))
        out = []
        while self.next + self.half < self.base + len(self.buf):
            out.append(self._emit())
        return out

    def flush(self) -> list[tuple[TimelineRow, np.ndarray]]:
        out = []
        while self.next < self.base + len(self.buf):
            out.append(self._emit())
        return out

    def _emit(self) -> tuple[TimelineRow, np.ndarray]:
        pos = self.next
        lo, hi = max(self.base, pos - self.half), pos + self.half + 1
        window = [self.buf[i - self.base][0] for i in range(lo, min(hi, self.base + len(self.buf)))]
        pred, time_s, gray = self.buf[pos - self.base]
        row = self._row(pred, time_s, window)
        self.next += 1
        while self.base < self.next - self.half:
            self.buf.popleft()
            self.base += 1
        return row, gray

    def _row(self, pred: Prediction, time_s: float, window: list[Prediction]) -> TimelineRow:
        probs = np.array([[p.probs.get(c, 0.0) for c in self.classes] for p in window])
        mean = probs.mean(axis=0)
        k = int(mean.argmax())
        rejected = 2 * sum(p.not_target for p in window) > len(window)
        not_target = rejected or self.classes[k] == NOT_TARGET
        confidence = float(mean[k])
        return TimelineRow(
            prediction=pred,
            time_s=time_s,
            probs={c: float(v) for c, v in zip(self.classes, mean, strict=True)},
            label=NOT_TARGET if not_target else self.classes[k],
            confidence=confidence,
            not_target=not_target,
            uncertain=not not_target and confidence < self.min_confidence,
        )


@dataclass
class _Open:
    """The segment being built: first/last row and the best frames seen so far."""

    plane: str
    first: TimelineRow
    last: TimelineRow
    n: int = 0
    best_ok: BestFrame | None = None  # among frames the per-frame rule accepted
    best_any: BestFrame | None = None

    def add(self, row: TimelineRow, gray: np.ndarray) -> None:
        self.last, self.n = row, self.n + 1
        conf = float(row.prediction.probs.get(self.plane, 0.0))
        if not row.prediction.not_target and (self.best_ok is None or
                                              conf > self.best_ok.confidence):
            self.best_ok = BestFrame(self.plane, row.frame, row.time_s, conf, gray.copy())
        if self.best_ok is None and (self.best_any is None or conf > self.best_any.confidence):
            self.best_any = BestFrame(self.plane, row.frame, row.time_s, conf, gray.copy())
        if self.best_ok is not None:
            self.best_any = None  # never needed again: frees its pixels

    def close(self) -> Segment:
        best = self.best_ok or self.best_any
        assert best is not None
        return Segment(self.plane, self.first.frame, self.last.frame, self.first.time_s,
                       self.last.time_s, self.n, best)


class _SegmentTracker:
    """Groups smoothed rows into segments and keeps each plane's best frame."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.best: dict[str, BestFrame] = {}
        self.open: _Open | None = None

    def push(self, row: TimelineRow, gray: np.ndarray) -> None:
        if self.open is not None and not (row.accepted and row.label == self.open.plane):
            self.close()
        if row.accepted:
            if self.open is None:
                self.open = _Open(row.label, row, row)
            self.open.add(row, gray)

    def close(self) -> None:
        if self.open is None:
            return
        seg = self.open.close()
        self.open = None
        best = self.best.get(seg.plane)
        if best is None or seg.best.confidence > best.confidence:
            self.best[seg.plane] = seg.best
        seg.best = replace(seg.best, pixels=None)  # only each plane's overall best is kept
        self.segments.append(seg)


# ------------------------------------------------------------------ decoding in a thread
@dataclass
class _Item:
    index: int
    time_s: float
    gray: np.ndarray
    pixels: np.ndarray  # model input (cropped, resized)


_DONE = object()


class _Prefetch:
    """Decode and prepare frames in a daemon thread, handing them over a bounded queue, so
    the network never waits for the decoder (and memory stays bounded)."""

    def __init__(self, items: Iterator[_Item], size: int):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(items,), daemon=True, name="fetalplanes-scan-decode"
        )
        self._thread.start()

    def _run(self, items: Iterator[_Item]) -> None:
        try:
            with closing(items):  # type: ignore[type-var]
                for item in items:
                    if not self._put(item):
                        return
            self._put(_DONE)
        except Exception as exc:  # re-raised in the consumer's thread
            self._put(exc)

    def _put(self, obj: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[_Item]:
        while True:
            obj = self._queue.get()
            if obj is _DONE:
                return
            if isinstance(obj, Exception):
                raise obj
            yield obj

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _prepare(source: FrameSource, every: int, pp: Preprocess,
             max_frames: int | None) -> Iterator[_Item]:
    for n, (index, time_s, gray) in enumerate(source.frames(every)):
        if max_frames is not None and n >= max_frames:
            raise ScanLimitError(_too_many(source, max_frames))
        yield _Item(index, time_s, gray, pp.prepare_array(gray))


def _too_many(source: FrameSource, max_frames: int) -> str:
    return (f"{source.name}: more than {max_frames} frames to scan; "
            "scan every K-th frame (every=K) or a shorter recording")


def _batches(items: Iterable[_Item], size: int) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextmanager
def _network_workers(predictor: Predictor, workers: int | None) -> Iterator[int]:
    """How many batches to run at once. Given: as given. Automatic: on a torch CPU backend
    with a budget of N >= 2 torch threads, 2 batches of N // 2 threads each for the scan
    (restored after): eager torch spends a third of its CPU time waiting between threads on
    small machines, and two single-threaded batches keep both cores busy instead. Otherwise 1.
    """
    device = getattr(getattr(predictor, "backend", None), "device", None)
    if workers is not None or getattr(device, "type", None) != "cpu":
        yield max(1, workers or 1)
        return
    import torch

    budget = torch.get_num_threads()
    if budget < 2:
        yield 1
        return
    torch.set_num_threads(budget // 2)
    try:
        yield 2
    finally:
        torch.set_num_threads(budget)


def _classify(predictor: Predictor, source: FrameSource, batches: Iterable[list[_Item]],
              workers: int) -> Iterator[tuple[list[_Item], list[Prediction]]]:
    """(batch, predictions) in order; with `workers` > 1, that many batches run at once,
    each on its own copy of the predictor (models keep per-call state, e.g. feature taps)."""
    copies = [predictor] + [copy.deepcopy(predictor) for _ in range(workers - 1)]

    def run(k: int, batch: list[_Item]) -> list[Prediction]:
        names = [source.item_name(it.index) for it in batch]
        return copies[k % workers].predict_prepared(np.stack([it.pixels for it in batch]), names)

    if workers == 1:
        for batch in batches:
            yield batch, run(0, batch)
        return
    pending: deque[tuple[list[_Item], Future[list[Prediction]]]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="fetalplanes-scan-net") as pool:
        for k, batch in enumerate(batches):
            pending.append((batch, pool.submit(run, k, batch)))
            if len(pending) == workers:  # copy k % workers is free again once this returns
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def check_options(every: int, window: int, batch_size: int = DEFAULT_BATCH) -> None:
    """One-line FetalPlanesError for options `scan` cannot use (checked before any work)."""
    if every < 1:
        raise FetalPlanesError(f"--every must be at least 1 (got {every})")
    if window < 1 or window % 2 == 0:
        raise FetalPlanesError(f"--window must be an odd number of frames >= 1 (got {window})")
    if batch_size < 1:
        raise FetalPlanesError(f"--batch-size must be at least 1 (got {batch_size})")


# ------------------------------------------------------------------ public entry points
def scan(
    predictor: Predictor,
    source: FrameSource,
    *,
    every: int = 1,
    window: int = DEFAULT_WINDOW,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = False,
    max_frames: int | None = None,
    workers: int | None = None,
) -> ScanResult:
    """Classify every `every`-th frame of `source`, smooth, and find segments and best frames.

    `max_frames` bounds the frames scanned (ScanLimitError beyond it, before decoding when
    the container says how many there are). `workers` batches run at once (None: see
    `_network_workers`).
    """
    from tqdm import tqdm

    check_options(every, window, batch_size)
    expected = source.expected(every)
    if max_frames is not None and expected is not None and expected > max_frames:
        raise ScanLimitError(_too_many(source, max_frames))
    classes = predictor.output_classes
    smoother = _Smoother(window, classes, predictor.min_confidence)
    tracker = _SegmentTracker()
    rows: list[TimelineRow] = []

    def take(done: list[tuple[TimelineRow, np.ndarray]]) -> None:
        for row, gray in done:
            rows.append(row)
            tracker.push(row, gray)

    start = time.perf_counter()
    bar = tqdm(total=expected, desc="scanning", unit="frame",
               disable=not progress, smoothing=0.1)
    feed = _Prefetch(_prepare(source, every, predictor.pp, max_frames), 2 * batch_size)
    try:
        with _network_workers(predictor, workers) as n_workers, closing(
            _classify(predictor, source, _batches(feed, batch_size), n_workers)
        ) as classified:
            for batch, preds in classified:
                for it, pred in zip(batch, preds, strict=True):
                    pred.frame, pred.pixel_spacing_mm = it.index, source.spacing_mm
                    take(smoother.push(pred, it.time_s, it.gray))
                bar.update(len(batch))
        take(smoother.flush())
    finally:
        feed.close()
        bar.close()
    tracker.close()
    if not rows:
        raise ImageError(f"{source.name}: no frames to scan")
    return ScanResult(
        name=source.name, kind=source.kind, fps=source.fps, every=every, window=window,
        classes=classes, rows=rows, segments=tracker.segments, best=tracker.best,
        seconds=time.perf_counter() - start, spacing_mm=source.spacing_mm,
        crop_box=source.crop_box,
    )


def scan_path(predictor: Predictor, path: str | Path, *, fps: float | None = None,
              **kw: Any) -> ScanResult:
    """`scan` of a video file, DICOM cine or folder of frames (see `data.video.open_source`)."""
    return scan(predictor, open_source(path, fps), **kw)


def measure_scan_fps(predictor: Predictor, clip: str | Path, *, every: int = 1,
                     batch_size: int = DEFAULT_BATCH) -> float:
    """End-to-end scan speed in frames/s (decode, prepare, network, smoothing) on `clip`,
    after one warm-up batch so one-off start-up costs are not counted; for benchmarks."""
    h, w = predictor.pp.size
    predictor.outputs(np.zeros((batch_size, h, w), np.uint8), batch_size)
    return scan_path(predictor, clip, every=every, batch_size=batch_size).frames_per_second


# ------------------------------------------------------------------ files
def plane_filename(plane: str) -> str:
    """A safe file name for a plane: 'Fetal abdomen' -> 'Fetal_abdomen.png'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", plane).strip("._") or "plane"
    return f"{stem}.png"


def write_timeline_csv(result: ScanResult, path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, timeline_columns(result.classes))
        writer.writeheader()
        for row in result.rows:
            writer.writerow(row.to_row(result.classes))
    return path


def write_best_frames(result: ScanResult, folder: Path) -> dict[str, Path]:
    """`folder/<plane>.png` for each plane found: the original frame, not the model input."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for plane in result.found:
        path = folder / plane_filename(plane)
        path.write_bytes(result.best[plane].png())
        written[plane] = path
    return written


_PALETTE = ("#0f766e", "#4338ca", "#b45309", "#be185d", "#0369a1", "#4d7c0f", "#7c3aed")
_REJECTED, _UNCERTAIN = "#cbd5e1", "#fbbf24"


def plot_timeline(result: ScanResult, path: Path) -> Path:
    """Smoothed probability of each plane over time, and a band coloured by the smoothed plane
    (grey: not a target plane; amber: uncertain); dots mark the best frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    colors = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(result.planes)}
    t = np.array([r.time_s for r in result.rows])
    step = result.every / result.fps
    fig, (ax, band) = plt.subplots(
        2, 1, figsize=(10, 4), sharex=True, gridspec_kw={"height_ratios": [4, 1]}
    )
    for plane in result.planes:
        ax.plot(t, [r.probs.get(plane, 0.0) for r in result.rows], color=colors[plane],
                label=plane, lw=1.6)
        if plane in result.best:
            b = result.best[plane]
            ax.plot([b.time_s], [b.confidence], "o", color=colors[plane], ms=7, mec="black")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("smoothed probability")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    strip = np.array([[to_rgb(_REJECTED if r.not_target else _UNCERTAIN if r.uncertain
                              else colors[r.label]) for r in result.rows]])
    band.imshow(strip, aspect="auto", interpolation="nearest",
                extent=(t[0] - step / 2, t[-1] + step / 2, 0, 1))
    band.set_yticks([])
    band.set_xlabel("time (s)")
    band.set_ylabel("plane", rotation=0, ha="right", va="center")
    ax.set_title(f"{Path(result.name).name}: planes over time (window {result.window} frames; "
                 "dots: best frames)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_scan(result: ScanResult, out: Path) -> dict[str, Path]:
    """timeline.csv, timeline.png and best/<plane>.png in `out` (which must exist)."""
    files = {
        "timeline.csv": write_timeline_csv(result, out / "timeline.csv"),
        "timeline.png": plot_timeline(result, out / "timeline.png"),
    }
    for plane, path in write_best_frames(result, out / "best").items():
        files[plane] = path
    return files
