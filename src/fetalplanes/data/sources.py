"""Sources and items: every way an image reaches fetalplanes, as items of one kind.

A *source* is one thing a user or a peer hands over: an image file, a DICOM file (every
frame), a video, a folder of frames, an uploaded file, an instance received over the DICOM
network, a frame of a live stream. It yields *items*, one per image to classify. An item
says where its pixels are (a file, bytes in memory, or an already decoded frame) and what
is known about it (frame index, time, declared ultrasound region, pixel spacing).

`load(item)` is the one decoder dispatch: whichever way an item arrived, the same bytes give
the same grey frame and the same declared region, so `Preprocess.prepare_frame` (region
first, else the guessed crop) and the network see the same pixels. That is what makes the
same frame get the same answer through predict, sort, scan, the server, Ray, the DICOM
network and live video (tests/test_consistency.py).

Items are small and picklable (decode workers and Ray tasks receive them); a video's frames
are decoded once, in order, by the source and travel as pixels, since videos cannot be read
at random cheaply. Nothing here imports torch, and pydicom only for DICOM.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.data.crop import to_gray
from fetalplanes.data.formats import HEAD_BYTES, image_format, not_accepted, video_format
from fetalplanes.data.images import (
    VIDEO_EXTENSIONS,
    decode_image,
    guarded_decode,
    is_image_path,
    list_images,
    looks_like_dicom,
    open_dicom_bytes,
    read_head,
    read_image_bytes,
)
from fetalplanes.data.items import frame_name
from fetalplanes.errors import FetalPlanesError, ImageError, NoInputError

Box = tuple[int, int, int, int]
"""x0, y0, x1, y1 of a declared region, inclusive (the DICOM convention)."""

DEFAULT_FPS = 25.0
"""Frame rate assumed for a folder of frames, or a file that declares none (PAL video rate)."""
MAX_FPS = 1000.0
"""Above this a container's frame rate is taken as missing (some files report 90000)."""


@dataclass
class Item:
    """One image to classify: where its pixels are and what is known about it.

    Exactly one of `path` (a file), `data` (the file's bytes, e.g. an upload) or `pixels`
    (a decoded frame, grey or RGB uint8) holds the pixels; `error` marks an item already
    known to be unreadable (its one-line message). `name` is how results name it.
    """

    name: str
    frame: int | None = None
    time_s: float | None = None
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    pixels: np.ndarray | None = field(default=None, repr=False)
    region: Box | None = None
    spacing_mm: tuple[float, float] | None = None
    error: str | None = None


@dataclass
class Frame:
    """A decoded item: the whole frame in grey, and its declared B-mode region (clipped to
    the frame; None when none is declared or it is unusable: the guessed crop applies)."""

    gray: np.ndarray
    region: Box | None = None
    spacing_mm: tuple[float, float] | None = None
    notes: tuple[str, ...] = ()

    def cropped(self) -> np.ndarray:
        """The frame cut to its declared region (the whole frame without one)."""
        if self.region is None:
            return self.gray
        x0, y0, x1, y1 = self.region
        return self.gray[y0 : y1 + 1, x0 : x1 + 1]


def clip_box(box: Box | None, width: int, height: int) -> Box | None:
    """The region inside a width x height frame, or None when it is empty, inverted or
    misses the frame (the caller then falls back to the guessed crop)."""
    if box is None:
        return None
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(width - 1, int(box[2])), min(height - 1, int(box[3]))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _region_note(name: str, declared: Box | None, used: Box | None) -> tuple[str, ...]:
    if declared is None or used is not None:
        return ()
    return (f"{name}: declared ultrasound region {declared} is empty or outside the frame; "
            "using the guessed crop",)


# ------------------------------------------------------------------ decoding
def load(item: Item) -> Frame:
    """Decode an item to a grey frame with its declared region: the one decoder dispatch.

    Raises ImageError (one line naming the item) for anything unreadable.
    """
    if item.error is not None:
        raise ImageError(item.error)
    if item.pixels is not None:
        gray = _gray(item.pixels, item.name)
        region = clip_box(item.region, gray.shape[1], gray.shape[0])
        return Frame(gray, region, item.spacing_mm, _region_note(item.name, item.region, region))
    kind = _stored_kind(item)
    if kind == "dicom":
        return _dicom_frame(item)
    if kind == "video":
        return Frame(_gray(_video_frame(item), item.name))
    return Frame(decode_image(_bytes(item), item.name), None, item.spacing_mm)


def raw_pixels(item: Item) -> np.ndarray:
    """An item's frame as stored (uint8 grey or RGB, whole frame): what a copy of one frame
    of a cine or video is written from."""
    if item.pixels is not None:
        return np.asarray(item.pixels)
    kind = _stored_kind(item)
    if kind == "dicom":
        dcm = _dicom(item)
        return guarded_decode(lambda: dcm.frame(item.frame or 0), item.name)
    if kind == "video":
        return _video_frame(item)
    return decode_image(_bytes(item), item.name)


def _stored_kind(item: Item) -> str:
    """'dicom', 'video' (a frame of one) or 'image' for an item stored as a file or bytes."""
    head = item.data[:HEAD_BYTES] if item.data is not None else read_head(_path(item))
    if looks_like_dicom(head, _file_name(item)):
        return "dicom"
    if item.frame is not None and video_format(head) is not None:
        return "video"
    return "image"


def _bytes(item: Item) -> bytes:
    return item.data if item.data is not None else read_image_bytes(_path(item))


def _video_frame(item: Item) -> np.ndarray:
    from fetalplanes.data.video import read_video_frame

    return read_video_frame(item.data if item.data is not None else _path(item),
                            item.frame or 0, item.name)


def _gray(pixels: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageError(f"{name}: not an image frame (array of shape {arr.shape})")
    try:
        return np.ascontiguousarray(to_gray(arr))
    except ValueError as exc:
        raise ImageError(f"{name}: {exc}") from None


def _path(item: Item) -> str:
    if item.path is None:
        raise ImageError(f"{item.name}: no pixels, bytes or file to read")
    return item.path


def _file_name(item: Item) -> str:
    return item.path or item.name.split("#frame=")[0]


def _dicom(item: Item) -> Any:
    """The item's DICOM file, opened (header only) from its bytes or lazily from its path."""
    return open_dicom_bytes(item.data if item.data is not None else _path(item), item.name)


def _dicom_frame(item: Item) -> Frame:
    dcm = _dicom(item)
    index = item.frame or 0
    if not 0 <= index < dcm.n_frames:
        raise ImageError(f"{item.name}: frame {index} out of range (the file has {dcm.n_frames})")
    gray = _gray(guarded_decode(lambda: dcm.frame(index), item.name), item.name)
    declared = _declared_box(dcm)
    region = clip_box(declared, gray.shape[1], gray.shape[0])
    notes = _region_note(item.name, declared, region) + tuple(getattr(dcm, "warnings", ()) or ())
    return Frame(gray, region, dcm.spacing_mm(), notes)


def _declared_box(dcm: Any) -> Box | None:
    region = dcm.bmode_region()
    return None if region is None else (region.x0, region.y0, region.x1, region.y1)


# ------------------------------------------------------------------ sources
def _rate(declared: float | None, fallback: float | None) -> float:
    """The declared frame rate when sane, else the caller's, else `DEFAULT_FPS`."""
    if declared is not None and np.isfinite(declared) and 0 < declared <= MAX_FPS:
        return float(declared)
    return float(fallback) if fallback else DEFAULT_FPS


def _check_every(every: int) -> None:
    if every < 1:
        raise ValueError("every must be >= 1")


class Source(ABC):
    """One thing handed over (a file, an upload, a recording); iterate `items(every)`."""

    kind = ""

    def __init__(self, name: str, fps: float = DEFAULT_FPS, n_frames: int | None = 1):
        self.name = name
        self.fps = fps
        self.n_frames = n_frames  # None when the container cannot say
        self.spacing_mm: tuple[float, float] | None = None
        self.crop_box: Box | None = None

    @abstractmethod
    def items(self, every: int = 1) -> Iterator[Item]:
        """The items to classify, in order (every `every`-th frame of a recording)."""

    def expected(self, every: int = 1) -> int | None:
        """How many items `items(every)` yields, when known (progress bars, limits)."""
        return None if self.n_frames is None else -(-self.n_frames // every)

    def frames(self, every: int = 1) -> Iterator[tuple[int, float, np.ndarray]]:
        """(index, time_s, grey frame cut to its declared region): for tools and tests
        that want the pixels; classification goes through `items` and the engine."""
        for n, item in enumerate(self.items(every)):
            index = item.frame if item.frame is not None else n * every
            time_s = item.time_s if item.time_s is not None else index / self.fps
            yield index, time_s, np.ascontiguousarray(load(item).cropped())

    def item_name(self, index: int) -> str:
        """How results name frame `index` (`name#frame=N` for multi-frame sources)."""
        return frame_name(self.name, index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.n_frames} frames, {self.fps:g} fps)"


class ImageFile(Source):
    """One image file (or uploaded image bytes): one item."""

    kind = "image"

    def __init__(self, path: str | Path | None = None, name: str | None = None,
                 data: bytes | None = None, fps: float | None = None):
        super().__init__(name or str(path), float(fps) if fps else DEFAULT_FPS, 1)
        self._path = None if path is None else str(path)
        self._data = data

    def items(self, every: int = 1) -> Iterator[Item]:
        _check_every(every)
        yield Item(self.name, path=self._path, data=self._data)

    def item_name(self, index: int) -> str:
        return self.name


class DicomFile(Source):
    """A (multi-frame) DICOM file or its bytes: every frame is an item (`name#frame=N` when
    there is more than one); only the header is read here."""

    kind = "dicom"

    def __init__(self, source: bytes | str | Path, name: str | None = None,
                 fps: float | None = None, opened: Any = None):
        """``opened``: the `data.dicom.DicomFile` of these same bytes when the caller has
        already opened and checked them (the DICOM node, before storing them), so the
        header is not parsed again; the frames are still read from ``source``."""
        label = name or str(source)
        self._path = None if isinstance(source, bytes) else str(source)
        self._data = source if isinstance(source, bytes) else None
        dcm = opened if opened is not None else open_dicom_bytes(source, label)
        super().__init__(label, _rate(dcm.fps, fps), dcm.n_frames)
        self.spacing_mm = dcm.spacing_mm()
        self.crop_box = clip_box(_declared_box(dcm), dcm.columns, dcm.rows)

    def items(self, every: int = 1) -> Iterator[Item]:
        _check_every(every)
        n = self.n_frames or 1
        for index in range(0, n, every):
            name = self.name if n == 1 else frame_name(self.name, index)
            yield Item(name, None if n == 1 else index, index / self.fps, self._path, self._data)


class VideoFile(Source):
    """A video read with OpenCV's FFmpeg backend, frame after frame (RGB pixels in the
    items); fps from the container. With `every=K` skipped frames are only grabbed."""

    kind = "video"

    def __init__(self, path: str | Path, name: str | None = None, fps: float | None = None):
        from fetalplanes.data.video import probe_video

        self._path = str(path)
        label = name or self._path
        declared, count = probe_video(self._path, label)
        super().__init__(label, _rate(declared, fps), count)

    def items(self, every: int = 1) -> Iterator[Item]:
        from fetalplanes.data.video import read_video

        _check_every(every)
        for index, rgb in read_video(self._path, self.name, every):
            yield Item(frame_name(self.name, index), index, index / self.fps, pixels=rgb)


class FrameFolder(Source):
    """Image files of one folder (not its subfolders) in natural order, at a given fps."""

    kind = "folder"

    def __init__(self, folder: str | Path, fps: float | None = None):
        from fetalplanes.data.video import natural_key

        folder = Path(folder)
        files = sorted(
            (p for p in folder.iterdir() if p.is_file() and is_image_path(p)), key=natural_key
        )
        if not files:
            raise NoInputError(f"{folder}: no image files (frames) in this folder")
        super().__init__(str(folder), float(fps) if fps else DEFAULT_FPS, len(files))
        self.files: Sequence[Path] = files

    def items(self, every: int = 1) -> Iterator[Item]:
        _check_every(every)
        for index in range(0, len(self.files), every):
            path = str(self.files[index])
            yield Item(path, index, index / self.fps, path)

    def item_name(self, index: int) -> str:
        return str(self.files[index])


class Unreadable(Source):
    """Something that cannot be read at all: one item carrying its one-line error, so it
    is reported in order with the other results."""

    kind = "unreadable"

    def __init__(self, name: str, error: str):
        super().__init__(name)
        self.error = error

    def items(self, every: int = 1) -> Iterator[Item]:
        yield Item(self.name, error=self.error)


class Frames(Source):
    """Frames already in memory (a live stream, a caller's arrays): one item each."""

    kind = "frames"

    def __init__(self, frames: Iterable[np.ndarray], name: str = "frames",
                 fps: float | None = None, n_frames: int | None = None,
                 region: Box | None = None):
        super().__init__(name, float(fps) if fps else DEFAULT_FPS, n_frames)
        self._frames = frames
        self.region = region

    def items(self, every: int = 1) -> Iterator[Item]:
        _check_every(every)
        for index, pixels in enumerate(self._frames):
            if index % every == 0:
                yield Item(frame_name(self.name, index), index, index / self.fps,
                           pixels=pixels, region=self.region)


class LiveStream(Source):
    """Frames of a live video (a capture card or camera, a network stream), newest first.

    A reader thread takes every frame as it comes (`read()`: RGB or grey uint8, None at the
    end of the stream) and keeps only the newest one not yet handed out: when the engine is
    slower than the video, the frames in between are dropped (counted in `dropped`), so
    every answer is about what the probe shows now, never about a backlog. `items()` ends
    on `stop()`, after `duration_s`, or when the stream ends; frame numbers count every
    frame received (dropped ones too) and times are seconds since the first frame.
    """

    kind = "live"

    def __init__(self, read: Callable[[], np.ndarray | None], name: str = "live",
                 fps: float | None = None, close: Callable[[], None] | None = None,
                 duration_s: float | None = None):
        super().__init__(name, _rate(fps, None), None)
        self._read, self._close = read, close
        self.duration_s = duration_s
        self.received = 0
        self.dropped = 0
        self.ended: str | None = None  # why the stream ended, when it did by itself
        self.t0: float | None = None  # time.monotonic() of the first frame
        self._latest: tuple[int, float, np.ndarray] | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()

    def stop(self) -> None:
        """End `items()` (from any thread, a signal handler included)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def age(self, item: Item) -> float:
        """Seconds since `item`'s frame was received (capture-to-answer latency)."""
        return time.monotonic() - (self.t0 or 0.0) - (item.time_s or 0.0)

    def _reader(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self._read()
                if frame is None:
                    self.ended = "the stream ended"
                    break
                now = time.monotonic()
                with self._cond:
                    self.t0 = now if self.t0 is None else self.t0
                    if self._latest is not None:
                        self.dropped += 1
                    self._latest = (self.received, now - self.t0, frame)
                    self.received += 1
                    self._cond.notify_all()
        except Exception as exc:  # a decoder error ends the stream with its reason
            self.ended = f"the stream failed ({type(exc).__name__}: {exc})"
        finally:
            with self._cond:
                self._cond.notify_all()

    def _next(self, thread: threading.Thread, deadline: float | None
              ) -> tuple[int, float, np.ndarray] | None:
        with self._cond:
            while self._latest is None:
                if self._stop.is_set() or not thread.is_alive():
                    return None
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                self._cond.wait(0.1)
            latest, self._latest = self._latest, None
            return latest

    def items(self, every: int = 1) -> Iterator[Item]:
        if every != 1:
            raise ValueError("a live stream is read frame by frame (every=1)")
        thread = threading.Thread(target=self._reader, name="live-reader", daemon=True)
        thread.start()
        deadline = None if self.duration_s is None else time.monotonic() + self.duration_s
        try:
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                latest = self._next(thread, deadline)
                if latest is None:
                    if not thread.is_alive():
                        break
                    continue
                index, time_s, pixels = latest
                yield Item(frame_name(self.name, index), index, time_s, pixels=pixels)
        finally:
            self.stop()
            thread.join(timeout=30)
            if self._close is not None and not thread.is_alive():
                self._close()


def open_live(spec: str, *, duration_s: float | None = None,
              timeout_s: float = 10.0) -> LiveStream:
    """The live source of a capture device (`/dev/video0` or its index `0`) or a network
    stream URL (rtsp://, udp://, http(s):// MJPEG ...), opened now (ImageError, one line,
    when it cannot be)."""
    from fetalplanes.data.video import open_stream

    cap, fps = open_stream(spec, timeout_s)

    def read() -> np.ndarray | None:
        ok, bgr = cap.read()
        if not ok or bgr is None:
            return None
        return np.ascontiguousarray(bgr[..., ::-1]) if bgr.ndim == 3 else bgr

    return LiveStream(read, "live", fps, close=cap.release, duration_s=duration_s)


# ------------------------------------------------------------------ finding sources
def sniff_kind(head: bytes, name: str) -> str | None:
    """'dicom', 'video' or 'image' from a file's first bytes (None: no accepted format)."""
    if looks_like_dicom(head, name):
        return "dicom"
    if video_format(head) is not None:
        return "video"
    if image_format(head) is not None:
        return "image"
    return None


def file_source(path: str | Path, name: str | None = None, fps: float | None = None) -> Source:
    """The source for one file, by content: DICOM (every frame), a video, or an image. A file
    that cannot be opened is an `Unreadable` source (reported in order, never dropped)."""
    label = name or str(path)
    try:
        head = read_head(path)
        kind = sniff_kind(head, str(path))
        if kind == "dicom":
            return DicomFile(path, label, fps)
        if kind == "video":
            return VideoFile(path, label, fps)
        if kind is None:
            return Unreadable(label, f"{label}: {not_accepted(head)}")
    except ImageError as exc:
        return Unreadable(label, str(exc))
    return ImageFile(path, label)


#: Written into every folder fetalplanes writes results to (scan, sort, audit, listen ...):
#: listing an input skips such folders, so results are never taken for inputs.
OUTPUT_MARKER = ".fetalplanes-output"


def mark_output(folder: str | Path, what: str) -> None:
    """Mark `folder` as written by fetalplanes (`what`: the command), see OUTPUT_MARKER."""
    marker = Path(folder) / OUTPUT_MARKER
    if not marker.exists():
        marker.write_text(f"written by fetalplanes {what}; input listings skip this folder\n",
                          encoding="utf-8")


def _output_folder(path: Path, roots: Sequence[Path], seen: dict[Path, Path | None]
                   ) -> Path | None:
    """The fetalplanes output folder `path` lies in (below one of `roots`), or None."""
    for parent in path.parents:
        if parent in seen:
            return seen[parent]
        found = parent if _is_marker(parent / OUTPUT_MARKER) else None
        if found is None and any(parent == r for r in roots):
            seen[parent] = None
            return None
        if found is not None:
            seen[parent] = found
            return found
    return None


def _is_marker(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a folder that cannot be searched: its files are reported by the reader
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # unreadable: the listing or the reader says why, per file
        return False


def collect(
    inputs: Sequence[str | Path],
    errors: list[str] | None = None,
    skip: Any = None,
) -> list[Source]:
    """Files and folders (recursively) -> one source per file, in a stable order.

    Image files are taken by name (decoding reports a bad one in order); DICOM files and
    videos are opened by content so every frame becomes an item. Folders that fetalplanes
    wrote results into (`OUTPUT_MARKER`) are skipped with one line each, and so are paths
    for which `skip(path)` is true. Listing problems (a FIFO, a folder that cannot be
    searched) go to `errors`, or stderr when it is None.
    """
    from fetalplanes.console import info

    roots = [Path(p) for p in inputs if _is_dir(Path(p))]
    seen: dict[Path, Path | None] = {}
    outputs: dict[Path, int] = {}
    sources: list[Source] = []
    for path in list_images([Path(p) for p in inputs], errors=errors):
        if skip is not None and skip(path):
            continue
        owner = _output_folder(path, roots, seen) if roots else None
        if owner is not None:
            outputs[owner] = outputs.get(owner, 0) + 1
            continue
        text = str(path)
        if path.suffix.lower() in VIDEO_EXTENSIONS or path.suffix.lower() in (".dcm", ".dicom") \
                or not is_image_path(path):
            sources.append(file_source(text))
        else:
            sources.append(ImageFile(text))
    for folder, n in outputs.items():
        info(f"skipped {folder}: results written by fetalplanes ({n} files), not inputs")
    return sources


def open_source(path: str | Path, fps: float | None = None) -> Source:
    """The source of one recording for `scan`: a folder of frames, a DICOM file or a video
    (by content). Raises ImageError (one line naming the path) when it cannot be read."""
    path = Path(path)
    if fps is not None and not 0 < fps <= MAX_FPS:
        raise ImageError(f"{path}: --fps must be between 0 and {MAX_FPS:g} (got {fps:g})")
    if path.is_dir():
        return FrameFolder(path, fps)
    head = read_head(path)  # guarded: a FIFO or device is one line, never a hang
    kind = sniff_kind(head, str(path))
    if kind == "dicom":
        return DicomFile(path, str(path), fps)
    if kind == "image":
        return ImageFile(path, str(path), fps=fps)
    if kind is None:
        raise ImageError(f"{path}: {not_accepted(head, 'video')}")
    return VideoFile(path, str(path), fps)


@contextmanager
def open_upload(data: bytes, name: str, fps: float | None = None) -> Iterator[Source]:
    """The source of an uploaded file, read from memory only: an image or DICOM from the
    bytes, a video through an anonymous in-memory file (`video.memory_file`)."""
    if not data:
        raise ImageError(f"{name}: empty file")
    kind = sniff_kind(data[:HEAD_BYTES], name)
    if kind == "dicom":
        yield DicomFile(data, name, fps)
    elif kind == "image":
        yield ImageFile(None, name, data=data, fps=fps)
    elif kind == "video":
        from fetalplanes.data.video import memory_file

        with memory_file(data, name) as path:
            yield VideoFile(path, name, fps)
    else:
        raise ImageError(f"{name}: {not_accepted(data[:HEAD_BYTES])}")


def upload_source(data: bytes, name: str, stack: contextlib.ExitStack,
                  fps: float | None = None) -> Source:
    """`open_upload` kept open by `stack`; an unreadable upload is an `Unreadable` source."""
    try:
        return stack.enter_context(open_upload(data, name, fps))
    except FetalPlanesError as exc:
        return Unreadable(name, str(exc))


def iter_items(sources: Iterable[Source], every: int = 1) -> Iterator[Item]:
    """The items of every source in order. A source that fails while it yields (a video
    cut short) ends with one error item and the others go on."""
    for source in sources:
        try:
            yield from source.items(every)
        except ImageError as exc:
            yield Item(source.name, error=str(exc))


def count_items(sources: Sequence[Source], every: int = 1) -> int | None:
    """Items the sources will yield, when every one of them can say."""
    total = 0
    for s in sources:
        n = s.expected(every)
        if n is None:
            return None
        total += n
    return total
