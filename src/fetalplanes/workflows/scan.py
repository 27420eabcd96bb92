"""Scan a recorded sweep: classify its frames, smooth over time, find each plane's segments and
its best frame.

Why it works this way:

- **One engine, one schema.** A recording's items (`data.sources`) go through the engine
  (`Predictor.stream`) like any other way in, so a frame gets exactly the `Prediction` the
  same frame gets from predict, sort or the server; the timeline CSV is the result schema
  with the smoothed columns added. This module is a sink: it never decodes or classifies.
- **Speed.** The engine decodes and prepares frames in worker processes (and runs ONNX models
  there) while results stream back in order.
- **One sink, any pace.** `Timeline` takes the engine's results one at a time and hands
  out the rows that became final; `scan` feeds it a recording, a live session
  (`workflows.live`) feeds it frames as they arrive, so both get the same rows.
- **Constant memory.** Results are smoothed as they stream, with a lag of ``window // 2``
  frames; only the items inside the window, the open segment's best item and one best item
  per plane are held (a video frame's pixels travel with its item), however long the
  recording. The best frames' pixels are decoded again from their items at the end.

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
import csv
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.data.images import opencv
from fetalplanes.data.sources import Item, Source, load, open_source
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
    """timeline.csv header: the result schema (time included), then the smoothed label and
    probabilities."""
    return [*columns(classes), *SMOOTHED_COLUMNS, *(SMOOTHED_PREFIX + c for c in classes)]


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
        row = self.prediction.to_row(classes)
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
        own = {k: v for k, v in self.prediction.to_dict().items()
               if k not in ("path", "frame", "time_s")}
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
    item: Item | None = field(default=None, repr=False, compare=False)

    def materialise(self) -> BestFrame:
        """The same best frame with its pixels decoded from its item (the frame cut to its
        declared region, grey) and the item dropped."""
        pixels = self.pixels if self.pixels is not None or self.item is None \
            else np.ascontiguousarray(load(self.item).cropped())
        return replace(self, pixels=pixels, item=None)

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
    skipped: list[str] = field(default_factory=list)  # frames that could not be read

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
        self.buf: deque[tuple[Prediction, float, Item]] = deque()
        self.base = 0  # stream position of buf[0]
        self.next = 0  # stream position of the next row to emit

    def push(self, pred: Prediction, time_s: float, item: Item) -> list[
        tuple[TimelineRow, Item]
    ]:
        self.buf.append((pred, time_s, item))
        out = []
        while self.next + self.half < self.base + len(self.buf):
            out.append(self._emit())
        return out

    def flush(self) -> list[tuple[TimelineRow, Item]]:
        out = []
        while self.next < self.base + len(self.buf):
            out.append(self._emit())
        return out

    def _emit(self) -> tuple[TimelineRow, Item]:
        pos = self.next
        lo, hi = max(self.base, pos - self.half), pos + self.half + 1
        window = [self.buf[i - self.base][0] for i in range(lo, min(hi, self.base + len(self.buf)))]
        pred, time_s, item = self.buf[pos - self.base]
        row = self._row(pred, time_s, window)
        self.next += 1
        while self.base < self.next - self.half:
            self.buf.popleft()
            self.base += 1
        return row, item

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

    def add(self, row: TimelineRow, item: Item) -> None:
        self.last, self.n = row, self.n + 1
        conf = float(row.prediction.probs.get(self.plane, 0.0))
        if not row.prediction.not_target and (self.best_ok is None or
                                              conf > self.best_ok.confidence):
            self.best_ok = BestFrame(self.plane, row.frame, row.time_s, conf, item=item)
        if self.best_ok is None and (self.best_any is None or conf > self.best_any.confidence):
            self.best_any = BestFrame(self.plane, row.frame, row.time_s, conf, item=item)
        if self.best_ok is not None:
            self.best_any = None  # never needed again: frees its item (a video's pixels)

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

    def push(self, row: TimelineRow, item: Item) -> None:
        if self.open is not None and not (row.accepted and row.label == self.open.plane):
            self.close()
        if row.accepted:
            if self.open is None:
                self.open = _Open(row.label, row, row)
            self.open.add(row, item)

    def close(self) -> None:
        if self.open is None:
            return
        seg = self.open.close()
        self.open = None
        best = self.best.get(seg.plane)
        if best is None or seg.best.confidence > best.confidence:
            self.best[seg.plane] = seg.best
        seg.best = replace(seg.best, pixels=None, item=None)  # only planes' overall bests kept
        self.segments.append(seg)


def check_options(every: int, window: int, batch_size: int = DEFAULT_BATCH) -> None:
    """One-line FetalPlanesError for options `scan` cannot use (checked before any work)."""
    if every < 1:
        raise FetalPlanesError(f"--every must be at least 1 (got {every})")
    if window < 1 or window % 2 == 0:
        raise FetalPlanesError(f"--window must be an odd number of frames >= 1 (got {window})")
    if batch_size < 1:
        raise FetalPlanesError(f"--batch-size must be at least 1 (got {batch_size})")


# ------------------------------------------------------------------ the incremental sink
class Timeline:
    """The scan sink, one result at a time: what `scan` does with the engine's results,
    for any caller that gets them one by one (a recording, a live stream).

    `push(item, prediction)` takes results in stream order and returns the timeline rows
    that became final (a row is final once the centred window around it is complete, so a
    frame's row comes ``window // 2`` results late); `flush()` ends the stream and returns
    the rest. Unreadable frames are skipped (`skipped`). With `keep_rows=False` rows are
    only returned, never held (a live session of any length in constant memory).
    """

    def __init__(self, classes: Sequence[str], min_confidence: float, *,
                 window: int = DEFAULT_WINDOW, fps: float = 25.0, every: int = 1,
                 spacing_mm: tuple[float, float] | None = None, keep_rows: bool = True):
        check_options(every, window)
        self.classes = list(classes)
        self.window, self.fps, self.every = window, fps, every
        self.spacing_mm = spacing_mm
        self.keep_rows = keep_rows
        self.rows: list[TimelineRow] = []
        self.skipped: list[str] = []  # one-line message per frame that could not be read
        self.emitted = 0  # rows made final so far
        self._smoother = _Smoother(window, classes, min_confidence)
        self._tracker = _SegmentTracker()
        self._pushed = 0
        self._done = False

    def push(self, item: Item, pred: Prediction) -> list[TimelineRow]:
        """Add the next result of the stream; the rows that became final."""
        if self._done:
            raise FetalPlanesError("this timeline was flushed; start a new one")
        n, self._pushed = self._pushed, self._pushed + 1
        if not pred.ok:
            self.skipped.append(pred.error or f"{item.name}: unreadable")
            return []
        index = item.frame if item.frame is not None else n * self.every
        time_s = item.time_s if item.time_s is not None else index / self.fps
        pred.frame, pred.time_s = index, time_s
        pred.pixel_spacing_mm = pred.pixel_spacing_mm or self.spacing_mm
        return self._take(self._smoother.push(pred, time_s, item))

    def flush(self) -> list[TimelineRow]:
        """End of the stream: the remaining rows (the window truncated at the end)."""
        if self._done:
            return []
        rows = self._take(self._smoother.flush())
        self._tracker.close()
        self._done = True
        return rows

    def _take(self, done: list[tuple[TimelineRow, Item]]) -> list[TimelineRow]:
        for row, item in done:
            if self.keep_rows:
                self.rows.append(row)
            self._tracker.push(row, item)
        self.emitted += len(done)
        return [row for row, _ in done]

    @property
    def segments(self) -> list[Segment]:
        """The segments closed so far (all of them after `flush`)."""
        return self._tracker.segments

    @property
    def open_plane(self) -> str | None:
        """The plane of the segment still growing (None when the last row was not accepted)."""
        return None if self._tracker.open is None else self._tracker.open.plane

    @property
    def best(self) -> dict[str, BestFrame]:
        """Each plane's best frame so far, the open segment's included (the items are kept,
        the pixels are not decoded: see `BestFrame.materialise`)."""
        best = dict(self._tracker.best)
        seg = self._tracker.open
        if seg is not None:
            candidate = seg.best_ok or seg.best_any
            held = best.get(seg.plane)
            if candidate is not None and (held is None or candidate.confidence > held.confidence):
                best[seg.plane] = candidate
        return best

    def result(self, name: str, kind: str, *, seconds: float,
               crop_box: tuple[int, int, int, int] | None = None) -> ScanResult:
        """The `ScanResult` of the stream (after `flush`), best frames decoded again."""
        if not self._done:
            self.flush()
        return ScanResult(
            name=name, kind=kind, fps=self.fps, every=self.every, window=self.window,
            classes=self.classes, rows=self.rows, segments=self.segments,
            best={plane: b.materialise() for plane, b in self._tracker.best.items()},
            seconds=seconds, spacing_mm=self.spacing_mm, crop_box=crop_box,
            skipped=self.skipped,
        )


# ------------------------------------------------------------------ public entry points
def _limited(items: Iterator[Item], source: Source, max_frames: int | None) -> Iterator[Item]:
    for n, item in enumerate(items):
        if max_frames is not None and n >= max_frames:
            raise ScanLimitError(_too_many(source, max_frames))
        yield item


def _too_many(source: Source, max_frames: int) -> str:
    return (f"{source.name}: more than {max_frames} frames to scan; "
            "scan every K-th frame (every=K) or a shorter recording")


def scan(
    predictor: Predictor,
    source: Source,
    *,
    every: int = 1,
    window: int = DEFAULT_WINDOW,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = False,
    max_frames: int | None = None,
    workers: int | None = None,
) -> ScanResult:
    """Classify every `every`-th frame of `source` through the engine (`Predictor.stream`),
    smooth, and find segments and best frames (the `Timeline` sink).

    `max_frames` bounds the frames scanned (ScanLimitError beyond it, before decoding when
    the container says how many there are). `workers`: decode processes (None: chosen by
    the engine from the frame count; 0: in this process). A frame that cannot be read is
    skipped with its one-line message in `ScanResult.skipped`.
    """
    check_options(every, window, batch_size)
    expected = source.expected(every)
    if max_frames is not None and expected is not None and expected > max_frames:
        raise ScanLimitError(_too_many(source, max_frames))
    timeline = Timeline(predictor.output_classes, predictor.min_confidence, window=window,
                        fps=source.fps, every=every, spacing_mm=source.spacing_mm)
    start = time.perf_counter()
    items = _limited(source.items(every), source, max_frames)
    stream = predictor.stream(items, batch_size=batch_size, workers=workers, expected=expected,
                              progress=progress, desc="scanning")
    with closing(stream):
        for result in stream:
            timeline.push(result.item, result.prediction)
    timeline.flush()
    if not timeline.rows:
        why = f" ({timeline.skipped[0]})" if timeline.skipped else ""
        raise ImageError(f"{source.name}: no frames to scan{why}")
    return timeline.result(source.name, source.kind, seconds=time.perf_counter() - start,
                           crop_box=source.crop_box)


def scan_path(predictor: Predictor, path: str | Path, *, fps: float | None = None,
              **kw: Any) -> ScanResult:
    """`scan` of a video file, DICOM cine or folder of frames (see `data.sources.open_source`)."""
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
