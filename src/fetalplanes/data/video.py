"""Reading and writing video with OpenCV's FFmpeg backend, one frame at a time.

A sweep can be minutes long, so frames are decoded one after another and handed on as RGB
uint8 arrays; memory stays that of one frame whatever the length. With ``every=K`` the skipped
frames are only grabbed (demuxed and decoded, never converted). The video sources themselves
(`data.sources.VideoFile`) turn these frames into items for the engine.

FFmpeg only ever sees files whose first bytes name an allowed container (`data.formats`), read
through the guarded reader: never a playlist, a list of other files, a FIFO or a device.
Uploads are never written to disk: a video is put into an anonymous in-memory file
(`memory_file`, Linux ``memfd_create``) whose ``/proc/self/fd`` path OpenCV opens like a file.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.data.formats import not_accepted, video_format
from fetalplanes.data.images import MAX_PIXELS, opencv, read_head
from fetalplanes.errors import ImageError

__all__ = [
    "memory_file",
    "natural_key",
    "open_stream",
    "probe_video",
    "read_video",
    "read_video_frame",
    "write_video",
]

_DIGITS = re.compile(r"(\d+)")


def natural_key(path: Path) -> list[object]:
    """Sort key that orders ``frame2`` before ``frame10`` (digits compared as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(path.name)]


def _capture(path: str, label: str) -> Any:
    """An opened cv2.VideoCapture of an allowed container; ImageError naming it otherwise."""
    head = read_head(path)
    if video_format(head) is None:
        raise ImageError(f"{label}: {not_accepted(head, 'video')}")
    cv2 = opencv()
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise ImageError(f"{label}: not a readable video (FFmpeg could not open it)")
    return cap


def probe_video(path: str, label: str) -> tuple[float | None, int | None]:
    """(declared fps, frame count) of a video from its container, refusing frames larger
    than the pixel limit before any is decoded."""
    cv2 = opencv()
    cap = _capture(path, label)
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    finally:
        cap.release()
    if width * height > MAX_PIXELS:
        raise ImageError(f"{label}: video frames of {width}x{height} pixels are too large")
    return (float(fps) if fps else None), (count if count > 0 else None)


def read_video(path: str, label: str, every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame) for every `every`-th frame, in order; ImageError when not even one
    frame decodes."""
    if every < 1:
        raise ValueError("every must be >= 1")
    cap = _capture(path, label)
    index = 0
    try:
        while True:
            if index % every:
                if not cap.grab():  # skipped: demux only, no colour conversion
                    break
            else:
                ok, bgr = cap.read()
                if not ok:
                    break
                yield index, np.ascontiguousarray(bgr[..., ::-1])
            index += 1
    finally:
        cap.release()
    if index == 0:
        raise ImageError(f"{label}: no frame could be decoded (empty or corrupt video)")


def read_video_frame(source: bytes | str, index: int, label: str) -> np.ndarray:
    """Frame `index` of a video file or its bytes, as RGB (decoded in order up to it: exact
    for every codec, unlike seeking)."""
    if isinstance(source, bytes):
        with memory_file(source, label) as path:
            return read_video_frame(path, index, label)
    for i, rgb in read_video(source, label):
        if i == index:
            return rgb
    raise ImageError(f"{label}: no frame {index} in this video")


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


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: float = 25.0,
                fourcc: str | None = None) -> Path:
    """Write uint8 grey or RGB frames (same even size) as MP4 (mp4v), or as MJPG AVI when this
    OpenCV has no MP4 encoder; returns the path written (its suffix tells which). `fourcc`
    picks a codec (e.g. "FFV1" in .avi or .mkv for lossless test clips).

    For benchmarks and tests that need a clip made from known frames.
    """
    cv2 = opencv()
    path = Path(path)
    height, width = frames[0].shape[:2]
    choices = ([(fourcc, path.suffix or ".avi")] if fourcc
               else [("mp4v", path.suffix or ".mp4"), ("MJPG", ".avi")])
    for code, suffix in choices:
        target = path.with_suffix(suffix)
        writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*code), fps,
                                 (width, height))
        if writer.isOpened():
            break
        writer.release()
    else:
        raise ImageError(f"{path}: OpenCV cannot write {' or '.join(c for c, _ in choices)} here")
    try:
        for frame in frames:
            rgb = frame if frame.ndim == 3 else np.repeat(frame[..., None], 3, axis=2)
            writer.write(np.ascontiguousarray(rgb[..., ::-1]))
    finally:
        writer.release()
    return target


# ------------------------------------------------------------------ live video
#: Network stream schemes `open_stream` accepts (what scanners and capture boxes send).
STREAM_SCHEMES = ("rtsp", "rtsps", "rtp", "srtp", "udp", "tcp", "srt", "http", "https")
#: What FFmpeg may open while reading a live stream: network protocols only, so a stream
#: (an HLS playlist over http, an SDP file) can never make it read a local file (file:,
#: concat:, subfile:, pipe: ... are not on the list; FFmpeg refuses them itself).
FFMPEG_PROTOCOLS = "rtsp,rtsps,rtp,srtp,udp,tcp,tls,srt,http,https,httpproxy,crypto"
_DEVICE = re.compile(r"^/dev/video[0-9]{1,3}$")
_OPEN_LOCK = threading.Lock()  # the FFmpeg options travel in the environment while opening


def stream_target(spec: str) -> tuple[str, int | str]:
    """('device', index or /dev/videoN) or ('url', URL) for a `--live` SOURCE; ImageError
    (one line) for anything else, a file included (scan a file without --live)."""
    text = spec.strip()
    if text.isdigit() and len(text) <= 3:
        return "device", int(text)
    if _DEVICE.match(text):
        if not os.path.exists(text):
            raise ImageError(f"{text}: no such capture device")
        return "device", text
    scheme, sep, _ = text.partition("://")
    if sep and scheme.lower() in STREAM_SCHEMES:
        return "url", text
    raise ImageError(
        f"{spec}: not a capture device (/dev/videoN or its index N) or a stream URL "
        f"({', '.join(s + '://' for s in STREAM_SCHEMES)}); to scan a file, leave out --live"
    )


def open_stream(spec: str, timeout_s: float = 10.0) -> tuple[Any, float | None]:
    """An opened cv2.VideoCapture of a capture device (V4L2) or a network stream (FFmpeg,
    network protocols only) and its declared fps; ImageError naming it when it does not
    open within `timeout_s` (a stream also ends when no frame comes for that long)."""
    kind, target = stream_target(spec)
    cv2 = opencv()
    ms = int(timeout_s * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
    if kind == "device":
        api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        cap = cv2.VideoCapture(target, api)
    else:
        with _OPEN_LOCK:
            key = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
            saved = os.environ.get(key)
            os.environ[key] = f"protocol_whitelist;{FFMPEG_PROTOCOLS}"
            try:
                cap = cv2.VideoCapture(str(target), cv2.CAP_FFMPEG, params)
            finally:
                if saved is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = saved
    if not cap.isOpened():
        cap.release()
        raise ImageError(f"{spec}: cannot open this {'device' if kind == 'device' else 'stream'}"
                         f" (nothing readable within {timeout_s:g} s)")
    width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
    height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    if width * height > MAX_PIXELS:
        cap.release()
        raise ImageError(f"{spec}: frames of {width}x{height} pixels are too large")
    fps = cap.get(cv2.CAP_PROP_FPS)
    return cap, (float(fps) if fps and 0 < fps <= 1000 else None)
