"""Frame sources for `fetalplanes scan`: a video file, a multi-frame DICOM, or a folder of frames.

A sweep can be minutes long, so every source decodes one frame at a time and yields
``(index, time_s, gray)``: the frame's position in the recording (from 0), its time in seconds
(``index / fps``) and the frame as uint8 (H, W) grey, converted by the project's colour rule
(`crop.to_gray`). Memory stays that of one frame whatever the length.

- **Video** (MP4, AVI, MOV, ...): OpenCV's FFmpeg reader; fps from the container. With
  ``every=K`` the skipped frames are only grabbed (demuxed and decoded, never converted).
- **DICOM cine**: `dicom.open_dicom(...).iter_frames`, which decodes only the frames asked for;
  fps from the file; each frame is cropped to the declared B-mode region (scanner UI, where
  patient details are printed, is cut off) and the region's pixel spacing is carried along.
- **Folder of frames**: image files in natural order (``frame2`` before ``frame10``); the folder
  carries no timing, so fps is given (``DEFAULT_FPS`` when not).

Uploads are never written to disk: DICOM decodes from bytes, and a video is put into an
anonymous in-memory file (`memory_file`, Linux ``memfd_create``) whose ``/proc/self/fd`` path
OpenCV opens like any file.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.data.crop import to_gray
from fetalplanes.data.formats import not_accepted, video_format
from fetalplanes.data.images import MAX_PIXELS, is_image_path, opencv, read_head, read_image
from fetalplanes.errors import ImageError

__all__ = [
    "DEFAULT_FPS",
    "DicomSource",
    "FolderSource",
    "Frame",
    "FrameSource",
    "VideoSource",
    "memory_file",
    "natural_key",
    "open_source",
    "open_upload",
    "write_video",
]

DEFAULT_FPS = 25.0
"""Frame rate assumed for a folder of frames, or a file that declares none (PAL video rate)."""
MAX_FPS = 1000.0
"""Above this a container's frame rate is taken as missing (some files report 90000)."""
Frame = tuple[int, float, np.ndarray]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive (DICOM region convention)
_DIGITS = re.compile(r"(\d+)")


def natural_key(path: Path) -> list[object]:
    """Sort key that orders ``frame2`` before ``frame10`` (digits compared as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(path.name)]


def _check_every(every: int) -> None:
    if every < 1:
        raise ValueError("every must be >= 1")


def _rate(declared: float | None, fallback: float | None) -> float:
    """The declared frame rate when sane, else the caller's, else `DEFAULT_FPS`."""
    if declared is not None and np.isfinite(declared) and 0 < declared <= MAX_FPS:
        return float(declared)
    return float(fallback) if fallback else DEFAULT_FPS


class FrameSource(ABC):
    """Frames of one recording, decoded one at a time; iterate with `frames(every)`."""

    kind = ""

    def __init__(self, name: str, fps: float, n_frames: int | None):
        self.name = name
        self.fps = fps
        self.n_frames = n_frames  # None when the container cannot say
        self.spacing_mm: tuple[float, float] | None = None
        self.crop_box: Box | None = None

    @abstractmethod
    def frames(self, every: int = 1) -> Iterator[Frame]:
        """Yield (index, time_s, gray uint8) for every `every`-th frame, in order."""

    def item_name(self, index: int) -> str:
        """How results name one frame: ``name#frame=N`` (see `dicom.frame_name`)."""
        return f"{self.name}#frame={index}"

    def expected(self, every: int = 1) -> int | None:
        """How many frames `frames(every)` will yield, when known (for progress bars)."""
        return None if self.n_frames is None else -(-self.n_frames // every)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.n_frames} frames, {self.fps:g} fps)"


class VideoSource(FrameSource):
    """A video file read with OpenCV's FFmpeg backend; fps from the container."""

    kind = "video"

    def __init__(self, path: str | Path, name: str | None = None, fps: float | None = None):
        self._path = str(path)
        cap = self._open(name or self._path)
        try:
            declared = cap.get(opencv().CAP_PROP_FPS)
            count = int(cap.get(opencv().CAP_PROP_FRAME_COUNT) or 0)
            width = int(cap.get(opencv().CAP_PROP_FRAME_WIDTH) or 0)
            height = int(cap.get(opencv().CAP_PROP_FRAME_HEIGHT) or 0)
        finally:
            cap.release()
        label = name or self._path
        if width * height > MAX_PIXELS:
            raise ImageError(f"{label}: video frames of {width}x{height} pixels are too large")
        super().__init__(label, _rate(declared, fps), count if count > 0 else None)

    def _open(self, label: str) -> Any:
        """An opened capture (cv2.VideoCapture); ImageError naming the file otherwise.

        FFmpeg only sees files whose first bytes name an allowed container (`data.formats`):
        never a playlist or list of other files, never a FIFO or device (guarded read)."""
        cv2 = opencv()
        head = read_head(self._path)
        if video_format(head) is None:
            raise ImageError(f"{label}: {not_accepted(head, 'video')}")
        cap = cv2.VideoCapture(self._path, cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise ImageError(
                f"{label}: not a readable video, DICOM file or folder of frames "
                "(FFmpeg could not open it)"
            )
        return cap

    def frames(self, every: int = 1) -> Iterator[Frame]:
        _check_every(every)
        cap = self._open(self.name)
        try:
            index = 0
            while True:
                if index % every:
                    if not cap.grab():  # skipped: demux only, no colour conversion
                        break
                else:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    yield index, index / self.fps, to_gray(bgr[..., ::-1])
                index += 1
        finally:
            cap.release()
        if index == 0:
            raise ImageError(f"{self.name}: no frame could be decoded (empty or corrupt video)")


class DicomSource(FrameSource):
    """A (multi-frame) DICOM file; frames cropped to the declared B-mode region."""

    kind = "dicom"

    def __init__(self, source: bytes | str | Path, name: str | None = None,
                 fps: float | None = None):
        from fetalplanes.data.dicom import open_dicom

        self._dcm = open_dicom(source, name)
        super().__init__(self._dcm.name, _rate(self._dcm.fps, fps), self._dcm.n_frames)
        self.spacing_mm = self._dcm.spacing_mm()
        region = self._dcm.bmode_region()
        if region is not None:
            self.crop_box = _clip_box(
                (region.x0, region.y0, region.x1, region.y1), self._dcm.columns, self._dcm.rows
            )

    def frames(self, every: int = 1) -> Iterator[Frame]:
        _check_every(every)
        for index, frame in self._dcm.iter_frames(every):
            if self.crop_box is not None:
                x0, y0, x1, y1 = self.crop_box
                frame = frame[y0 : y1 + 1, x0 : x1 + 1]
            yield index, index / self.fps, np.ascontiguousarray(to_gray(frame))


def _clip_box(box: Box, width: int, height: int) -> Box | None:
    """The region box inside the frame, or None when it misses the frame (ignored then)."""
    x0, y0 = max(0, box[0]), max(0, box[1])
    x1, y1 = min(width - 1, box[2]), min(height - 1, box[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


class FolderSource(FrameSource):
    """Image files of one folder (not its subfolders) in natural order, at a given fps."""

    kind = "folder"

    def __init__(self, folder: str | Path, fps: float | None = None):
        folder = Path(folder)
        files = sorted(
            (p for p in folder.iterdir() if p.is_file() and is_image_path(p)), key=natural_key
        )
        if not files:
            raise ImageError(f"{folder}: no image files (frames) in this folder")
        super().__init__(str(folder), float(fps) if fps else DEFAULT_FPS, len(files))
        self.files: Sequence[Path] = files

    def frames(self, every: int = 1) -> Iterator[Frame]:
        _check_every(every)
        for index in range(0, len(self.files), every):
            yield index, index / self.fps, read_image(self.files[index])

    def item_name(self, index: int) -> str:
        return str(self.files[index])


def _is_dicom_file(path: Path) -> bool:
    from fetalplanes.data.dicom import is_dicom

    return is_dicom(read_head(path), path.name)


def open_source(path: str | Path, fps: float | None = None) -> FrameSource:
    """The frame source for a path: a folder of frames, a DICOM file (sniffed), or a video.

    `fps` is the rate of a folder's frames, and the fallback for files that declare none.
    Raises ImageError (one line naming the path) when it cannot be read.
    """
    path = Path(path)
    if fps is not None and not 0 < fps <= MAX_FPS:
        raise ImageError(f"{path}: --fps must be between 0 and {MAX_FPS:g} (got {fps:g})")
    if path.is_dir():
        return FolderSource(path, fps)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    dicom = _is_dicom_file(path)  # guarded: a FIFO or device is one line, never a hang
    return DicomSource(path, str(path), fps) if dicom else VideoSource(path, str(path), fps)


@contextmanager
def memory_file(data: bytes, name: str) -> Iterator[str]:
    """A path to ``data`` that lives only in memory (Linux ``memfd_create``), for readers such
    as OpenCV that need a path. Nothing is written to any file system; closed on exit."""
    create = getattr(os, "memfd_create", None)
    if create is None:
        raise ImageError(
            f"{name}: reading a video from memory needs Linux (memfd_create); "
            "send a DICOM cine or run the server on Linux"
        )
    fd = create("fetalplanes-upload", getattr(os, "MFD_CLOEXEC", 0))
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


@contextmanager
def open_upload(data: bytes, name: str, fps: float | None = None) -> Iterator[FrameSource]:
    """The frame source of an uploaded file, read from memory only: DICOM (sniffed) is decoded
    from the bytes, a video through `memory_file`."""
    from fetalplanes.data.dicom import is_dicom

    if not data:
        raise ImageError(f"{name}: empty file")
    if is_dicom(data[:4096], name):
        yield DicomSource(data, name, fps)
        return
    with memory_file(data, name) as path:
        yield VideoSource(path, name, fps)


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: float = DEFAULT_FPS) -> Path:
    """Write uint8 grey or RGB frames (same even size) as MP4 (mp4v), or as MJPG AVI when this
    OpenCV has no MP4 encoder; returns the path written (its suffix tells which).

    For benchmarks and tests that need a clip made from known frames.
    """
    cv2 = opencv()
    path = Path(path)
    height, width = frames[0].shape[:2]
    for fourcc, suffix in (("mp4v", path.suffix or ".mp4"), ("MJPG", ".avi")):
        target = path.with_suffix(suffix)
        writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*fourcc), fps,
                                 (width, height))
        if writer.isOpened():
            break
        writer.release()
    else:
        raise ImageError(f"{path}: OpenCV cannot write MP4 or MJPG video here")
    try:
        for frame in frames:
            rgb = frame if frame.ndim == 3 else np.repeat(frame[..., None], 3, axis=2)
            writer.write(np.ascontiguousarray(rgb[..., ::-1]))
    finally:
        writer.release()
    return target
