"""Read ultrasound DICOM files frame by frame, safely.

Scanners and PACS export fetal ultrasound as DICOM: single frames or long cine loops, stored
uncompressed (Explicit/Implicit VR Little Endian, Deflated) or compressed (JPEG Baseline and
Extended, JPEG Lossless, JPEG-LS, RLE; JPEG 2000 where a plugin is installed), in MONOCHROME1,
MONOCHROME2, RGB, YBR_FULL or YBR_FULL_422, 8 or 16 bits. Every frame comes out as uint8,
(H, W) grey or (H, W, 3) RGB, so the rest of fetalplanes treats it like any other image:
16-bit frames are min-max scaled per frame and MONOCHROME1 is inverted.

Why it is careful:

- The header is checked before any pixel is decoded: a few hundred KB of deflated or
  compressed data can claim gigabytes of pixels (a decompression bomb), so frames over
  ``MAX_PIXELS`` pixels or ``MAX_FRAME_BYTES`` decoded bytes are refused up front. Deflated
  files are inflated on demand (pydicom would inflate the whole file just to read the header).
- Frames are decoded one at a time, so a long cine loop needs the memory of one frame.
- A missing decoder is reported with the exact ``pip install`` line, not a traceback.
- ``DicomFile`` keeps only what imaging needs (pixel format, frame timing, ultrasound regions):
  no patient identity is stored in it or printed in its messages.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import get_decoder, iter_pixels, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from fetalplanes.data.items import frame_name, parse_frame_name
from fetalplanes.errors import ImageError

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_PIXELS",
    "DicomFile",
    "UltrasoundRegion",
    "frame_name",
    "is_dicom",
    "open_dicom",
    "parse_frame_name",
    "read_header",
]

MAX_PIXELS = 64_000_000
"""Largest Rows x Columns accepted for one frame (a 8K screen is 33 Mpx)."""
MAX_FRAME_BYTES = 256 * 2**20
"""Largest decoded size of one frame in bytes."""
MAX_ELEMENT_BYTES = 64 * 2**20
"""Largest header element read (a deflated header could otherwise inflate without bound)."""

PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422")
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = {_PIXEL_DATA, 0x7FE00008, 0x7FE00009}  # (Float/Double Float) Pixel Data
_UNDEFINED = 0xFFFFFFFF
_CM = 3  # PhysicalUnits code for centimetres (PS3.3 C.8.5.5.1.15)
_BOX_KEYWORDS = (
    "RegionLocationMinX0",
    "RegionLocationMinY0",
    "RegionLocationMaxX1",
    "RegionLocationMaxY1",
)
Frames = Iterator[tuple[int, np.ndarray]]

_PYLIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg"
_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg"
_INSTALL = {
    "1.2.840.10008.1.2.4.50": _PYLIBJPEG,  # JPEG Baseline (Pillow also decodes it)
    "1.2.840.10008.1.2.4.51": _PYLIBJPEG,  # JPEG Extended
    "1.2.840.10008.1.2.4.57": _PYLIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _PYLIBJPEG,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _PYLIBJPEG,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _PYLIBJPEG,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _OPENJPEG,
    "1.2.840.10008.1.2.4.91": _OPENJPEG,
    "1.2.840.10008.1.2.4.201": _OPENJPEG,
    "1.2.840.10008.1.2.4.202": _OPENJPEG,
    "1.2.840.10008.1.2.4.203": _OPENJPEG,
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",
}

# Image Pixel module attributes a frame decoder needs; nothing else is kept from the header.
_PIXEL_KEYWORDS = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of the Sequence of Ultrasound Regions (PS3.3 C.8.5.5).

    The box is inclusive, as in the standard. Units are DICOM codes (3 = cm, 4 = s);
    deltas are the physical size of one pixel in those units.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    spatial_format: int
    data_type: int
    units_x: int | None
    units_y: int | None
    delta_x: float | None
    delta_y: float | None

    @property
    def area(self) -> int:
        """Pixels inside the box (used to pick the main B-mode region)."""
        return (self.x1 - self.x0 + 1) * (self.y1 - self.y0 + 1)


def is_dicom(head: bytes, name: str | None = None) -> bool:
    """Whether ``head`` (the first few KB of a file) starts a DICOM file.

    Files without the 128-byte preamble are accepted only when ``name`` ends in ``.dcm``,
    since the check for them is a guess that a PNG or text file must not pass.
    """
    if head[128:132] == b"DICM":
        return True
    return bool(name and name.lower().endswith(".dcm")) and _starts_like_dataset(head)


def _starts_like_dataset(head: bytes) -> bool:
    """Whether pydicom can parse the first elements of ``head`` as a bare data set."""
    if len(head) < 8 or struct.unpack("<H", head[:2])[0] not in (0x0002, 0x0008):
        return False
    try:
        stream = io.BytesIO(head[:512])
        tags = list(read_dataset(stream, not _explicit_vr(head), True, stop_when=_never).keys())
    except Exception:  # a garbled element: not a data set we can read
        return False
    return bool(tags) and all(tag.is_private or dictionary_has_tag(tag) for tag in tags)


def _explicit_vr(data: bytes) -> bool:
    """Whether the element at the start of ``data`` carries a VR (two capital letters)."""
    return len(data) >= 6 and data[4:6].isalpha() and data[4:6].isupper()


def _never(tag: BaseTag, vr: str | None, length: int) -> bool:
    return False


class _InflatedReader:
    """Seekable read-only view of a deflated data set that inflates on demand.

    pydicom inflates a whole Deflated file before parsing it, and 150 KB can inflate to
    gigabytes. This window keeps at most ``_KEEP`` bytes behind the read position (pydicom
    rewinds a few bytes at a time); seeking further back restarts the inflation.
    """

    _CHUNK = 1 << 16
    _STEP = 1 << 18
    _KEEP = 1 << 16

    def __init__(self, raw: BinaryIO, start: int) -> None:
        self._raw, self._start = raw, start
        self.name = getattr(raw, "name", None)
        self._restart()

    def _restart(self) -> None:
        self._raw.seek(self._start)
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._base = 0
        self._pos = 0

    def _fill(self, end: int) -> None:
        while self._base + len(self._buf) < end and not self._inflate.eof:
            data = self._inflate.unconsumed_tail or self._raw.read(self._CHUNK)
            if not data:
                self._buf += self._inflate.flush()
                return
            self._buf += self._inflate.decompress(data, self._STEP)
            drop = self._pos - self._KEEP - self._base
            if drop > 0:
                del self._buf[:drop]
                self._base += drop

    def read(self, size: int = -1) -> bytes:
        end = self._pos + size if size >= 0 else 2**62
        self._fill(end)
        data = bytes(self._buf[self._pos - self._base : end - self._base])
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR):
            raise io.UnsupportedOperation("seek from end of a deflated stream")
        pos = offset + (self._pos if whence == io.SEEK_CUR else 0)
        if pos < self._base:
            self._restart()
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos


@dataclass(frozen=True)
class _Header:
    """A parsed header, where its pixel data starts, and how to read it."""

    ds: Dataset
    syntax: UID
    pixel_offset: int | None  # stream offset of the pixel data value; None: no pixel data
    pixel_length: int  # declared, or what the file really holds when that is less


def _open(source: bytes | str | Path) -> BinaryIO:
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def _display_name(source: bytes | str | Path, name: str | None) -> str:
    if name is not None:
        return name
    return "DICOM data" if isinstance(source, bytes) else str(source)


def _guard(tag: BaseTag, vr: str | None, length: int) -> bool:
    """Stop at pixel data; refuse any other element too large to be a sane header value."""
    if tag in _PIXEL_TAGS:
        return True
    if length != _UNDEFINED and length > MAX_ELEMENT_BYTES:
        raise ImageError(f"header element {tag} is {length:,} bytes (over {MAX_ELEMENT_BYTES:,})")
    return False


def _read_header(f: BinaryIO, name: str) -> tuple[_Header, BinaryIO]:
    """Parse everything before the pixel data; return it and the stream positioned there."""
    head = f.read(4096)
    if not (head[128:132] == b"DICM" or _starts_like_dataset(head)):
        raise ImageError(f"{name}: not a DICOM file (no 'DICM' marker and no readable header)")
    f.seek(0)
    read_preamble(f, True)
    meta = _read_meta(f)
    syntax = UID(meta.get("TransferSyntaxUID", "") or "")
    stream: BinaryIO = f
    if syntax == DeflatedExplicitVRLittleEndian:
        stream = _InflatedReader(f, f.tell())  # type: ignore[assignment]
    if syntax:
        implicit = syntax == ImplicitVRLittleEndian
    else:  # no file meta: look at the first element
        start = f.tell()
        implicit = not _explicit_vr(f.read(6))
        f.seek(start)
    little = syntax != ExplicitVRBigEndian
    try:
        ds = read_dataset(stream, implicit, little, stop_when=_guard)
    except ImageError as exc:
        raise ImageError(f"{name}: {exc}") from None
    except Exception as exc:
        raise ImageError(f"{name}: unreadable DICOM header ({_first_line(exc)})") from None
    implicit = bool(ds.original_encoding[0])  # what pydicom found, if the meta was wrong
    if not syntax:
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.file_meta.TransferSyntaxUID = syntax
    offset, length = _pixel_element(stream, implicit, little)
    if offset is not None and stream is f and length != _UNDEFINED:
        length = min(length, f.seek(0, io.SEEK_END) - offset)  # bytes really in the file
        f.seek(offset)
    return _Header(ds, syntax, offset, length), stream


def _read_meta(f: BinaryIO) -> FileMetaDataset:
    """Read group 0002 (always Explicit VR Little Endian) if the file has it."""
    start = f.tell()
    group = f.read(2)
    f.seek(start)
    if group != b"\x02\x00":
        return FileMetaDataset()
    meta = read_dataset(f, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    return FileMetaDataset(meta)


def _pixel_element(stream: BinaryIO, implicit: bool, little: bool) -> tuple[int | None, int]:
    """Offset and length of the Pixel Data value at the current position, if it is there."""
    endian = "<" if little else ">"
    tag_bytes = stream.read(4)
    if len(tag_bytes) < 4:
        return None, 0
    group, element = struct.unpack(f"{endian}HH", tag_bytes)
    if (group << 16 | element) != _PIXEL_DATA:
        return None, 0
    if implicit:
        (length,) = struct.unpack(f"{endian}I", stream.read(4))
    else:
        stream.read(4)  # VR and two reserved bytes
        (length,) = struct.unpack(f"{endian}I", stream.read(4))
    return stream.tell(), length


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def read_header(source: bytes | str | Path, name: str | None = None) -> Dataset:
    """The full header (everything before the pixel data), with the same guards as
    ``open_dicom``. It holds patient identity: meant for de-identification tools only."""
    label = _display_name(source, name)
    with _open(source) as f:
        header, _ = _read_header(f, label)
    return header.ds


def open_dicom(source: bytes | str | Path, name: str | None = None) -> DicomFile:
    """Parse and validate a DICOM file (path or bytes) without decoding any pixels.

    Raises ImageError (one line naming the file) for files with no pixel data, frames too
    large to decode safely, unsupported transfer syntaxes or photometric interpretations,
    and missing decoder plugins (with the ``pip install`` line that fixes it).
    """
    label = _display_name(source, name)
    try:
        with _open(source) as f:
            header, _ = _read_header(f, label)
    except OSError as exc:
        raise ImageError(f"{label}: cannot read file ({exc.strerror or exc})") from None
    except ImageError:
        raise
    except Exception as exc:  # pydicom on a damaged header: NotImplementedError, struct...
        raise ImageError(f"{label}: damaged DICOM header ({_first_line(exc)})") from None
    try:
        _validate(header, label)
        return DicomFile(source, label, header)
    except ImageError:
        raise
    except Exception as exc:  # e.g. a text where a number belongs, an unknown VR
        raise ImageError(f"{label}: malformed DICOM attributes ({_first_line(exc)})") from None


def _validate(header: _Header, name: str) -> None:
    ds = header.ds
    if header.pixel_offset is None:
        raise ImageError(f"{name}: DICOM file has no pixel data")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:
        raise ImageError(f"{name}: DICOM pixel data has no {', '.join(missing)}")
    rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    if rows * cols > MAX_PIXELS:
        raise ImageError(
            f"{name}: frame of {cols}x{rows} = {rows * cols:,} pixels is over the "
            f"{MAX_PIXELS:,} limit; refusing to decode it"
        )
    frame_bytes = rows * cols * spp * ((bits + 7) // 8)
    if frame_bytes > MAX_FRAME_BYTES:
        raise ImageError(
            f"{name}: one decoded frame would take {frame_bytes:,} bytes, over the "
            f"{MAX_FRAME_BYTES:,} limit; refusing to decode it"
        )
    if bits not in (8, 16):
        raise ImageError(f"{name}: BitsAllocated {bits} is not supported (only 8 and 16)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in PHOTOMETRICS:
        raise ImageError(
            f"{name}: photometric interpretation '{photometric}' is not supported "
            f"(supported: {', '.join(PHOTOMETRICS)})"
        )
    _check_decoder(header.syntax, name)
    if not header.syntax.is_encapsulated:
        _check_native_length(header, name)


def _check_decoder(syntax: UID, name: str) -> None:
    known = syntax.name != str(syntax)
    label = f"transfer syntax '{syntax.name}' ({syntax})" if known else f"transfer syntax {syntax}"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageError(
            f"{name}: {label} is not supported (no decoder exists for it); export the images "
            "from the scanner or PACS as uncompressed, JPEG or RLE DICOM"
        ) from None
    if not decoder.is_available:
        install = _INSTALL.get(str(syntax), "pip install pylibjpeg pylibjpeg-libjpeg")
        raise ImageError(f"{name}: {label} needs a decoder plugin: {install}")


def _check_native_length(header: _Header, name: str) -> None:
    if header.pixel_length == _UNDEFINED:
        raise ImageError(f"{name}: uncompressed pixel data has an undefined length (corrupt file)")
    expected = get_expected_length(_pixel_dataset(header.ds), "bytes")
    if header.pixel_length < expected:
        raise ImageError(
            f"{name}: pixel data is truncated ({header.pixel_length:,} bytes, "
            f"expected {expected:,})"
        )


def _pixel_dataset(ds: Dataset) -> Dataset:
    """Only the Image Pixel attributes of ``ds``: what decoding needs, and no identity."""
    out = Dataset()
    for keyword in _PIXEL_KEYWORDS:
        value = ds.get(keyword)
        if value not in (None, ""):
            setattr(out, keyword, value)
    out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    return out


def _parse_regions(ds: Dataset) -> list[UltrasoundRegion]:
    regions = []
    for item in ds.get("SequenceOfUltrasoundRegions", []):
        box = [item.get(k) for k in _BOX_KEYWORDS]
        if any(v is None or v == "" for v in box):
            continue
        regions.append(
            UltrasoundRegion(
                *(int(v) for v in box),
                spatial_format=int(item.get("RegionSpatialFormat", 0) or 0),
                data_type=int(item.get("RegionDataType", 0) or 0),
                units_x=_int_or_none(item.get("PhysicalUnitsXDirection")),
                units_y=_int_or_none(item.get("PhysicalUnitsYDirection")),
                delta_x=_float_or_none(item.get("PhysicalDeltaX")),
                delta_y=_float_or_none(item.get("PhysicalDeltaY")),
            )
        )
    return regions


def _int_or_none(value: object) -> int | None:
    return None if value in (None, "") else int(value)  # type: ignore[call-overload]


def _float_or_none(value: object) -> float | None:
    return None if value in (None, "") else float(value)  # type: ignore[arg-type]


def _frame_rate(ds: Dataset) -> float | None:
    """Frames per second: FrameTime (ms) first, then CineRate, then the display rate."""
    frame_time = _float_or_none(ds.get("FrameTime"))
    if frame_time:
        return 1000.0 / frame_time
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _float_or_none(ds.get(keyword))
        if rate:
            return rate
    return None


def _to_uint8(arr: np.ndarray, photometric: str) -> np.ndarray:
    """8-bit as is; anything else min-max scaled per frame; MONOCHROME1 inverted."""
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        if hi > lo:
            arr = ((arr.astype(np.float32) - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
        else:
            arr = np.zeros(arr.shape, np.uint8)
    if photometric == "MONOCHROME1":
        arr = 255 - arr
    return arr


class DicomFile:
    """A validated DICOM file whose frames are decoded one at a time on request.

    Holds the source (path or bytes), the pixel format, frame timing and ultrasound regions;
    never the patient identity.
    """

    def __init__(self, source: bytes | str | Path, name: str, header: _Header) -> None:
        ds = header.ds
        self._source = source
        self._syntax = header.syntax
        self._pixels = _pixel_dataset(ds)
        self.name = name
        self.rows = int(ds.Rows)
        self.columns = int(ds.Columns)
        self.samples = int(ds.get("SamplesPerPixel", 1) or 1)
        self.bits_allocated = int(ds.BitsAllocated)
        self.photometric = str(ds.PhotometricInterpretation).strip()
        self.n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        self.fps = _frame_rate(ds)
        self.regions = _parse_regions(ds)

    @property
    def transfer_syntax(self) -> str:
        """Name of the transfer syntax, e.g. 'JPEG Baseline (Process 1)'."""
        return self._syntax.name

    def bmode_region(self) -> UltrasoundRegion | None:
        """The largest 2D tissue region (spatial format 1, data type 1), if declared."""
        tissue = [r for r in self.regions if r.spatial_format == 1 and r.data_type == 1]
        return max(tissue, key=lambda r: r.area, default=None)

    def spacing_mm(self) -> tuple[float, float] | None:
        """(dy, dx) in mm per pixel from the B-mode region, when it is calibrated in cm."""
        region = self.bmode_region()
        if region is None or region.delta_x is None or region.delta_y is None:
            return None
        if region.units_x != _CM or region.units_y != _CM:
            return None
        return abs(region.delta_y) * 10.0, abs(region.delta_x) * 10.0

    def frame(self, index: int, as_uint8: bool = True) -> np.ndarray:
        """Decode one frame: uint8 (H, W) or (H, W, 3) RGB.

        ``as_uint8=False`` returns the stored values (original dtype, MONOCHROME1 not
        inverted, colour still converted to RGB), for tools that rewrite the file.
        """
        if not 0 <= index < self.n_frames:
            raise ImageError(f"{self.name}: no frame {index} (it has {self.n_frames} frames)")
        with closing(self._decode([index], as_uint8)) as frames:
            return next(frames)[1]

    def iter_frames(self, every: int = 1, as_uint8: bool = True) -> Frames:
        """Yield (index, frame) for every ``every``-th frame, decoding one frame at a time."""
        if every < 1:
            raise ValueError("every must be >= 1")
        return self._decode(range(0, self.n_frames, every), as_uint8)

    def _decode(self, indices: list[int] | range, as_uint8: bool) -> Frames:
        done = 0
        try:
            arrays = self._deflated(indices) if self._is_deflated else self._pydicom(indices)
            for index, arr in zip(indices, arrays, strict=True):
                yield index, self._finish(arr, as_uint8)
                done += 1
        except ImageError:
            raise
        except Exception as exc:
            failed = indices[min(done, len(indices) - 1)]
            raise ImageError(
                f"{self.name}: cannot decode frame {failed} ({self.transfer_syntax}): "
                f"{_first_line(exc)}"
            ) from None

    @property
    def _is_deflated(self) -> bool:
        return self._syntax == DeflatedExplicitVRLittleEndian

    def _pydicom(self, indices: list[int] | range) -> Iterator[np.ndarray]:
        """Frames decoded by pydicom straight from the file, one at a time."""
        with _open(self._source) as f:
            yield from iter_pixels(f, indices=indices, transfer_syntax_uid=self._syntax)

    def _deflated(self, indices: list[int] | range) -> Iterator[np.ndarray]:
        """Frames of a Deflated file, inflated one at a time (pydicom would inflate all)."""
        single = _pixel_dataset(self._pixels)
        single.NumberOfFrames = 1
        single.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        frame_bytes = get_expected_length(single, "bytes")
        with _open(self._source) as f:
            header, stream = _read_header(f, self.name)
            for index in indices:
                stream.seek(header.pixel_offset + index * frame_bytes)  # type: ignore[operator]
                single.PixelData = stream.read(frame_bytes)
                yield pixel_array(single)

    def _finish(self, arr: np.ndarray, as_uint8: bool) -> np.ndarray:
        expected = (self.rows, self.columns) + ((3,) if self.samples == 3 else ())
        if arr.shape != expected:
            raise ImageError(
                f"{self.name}: decoded frame has shape {arr.shape}, expected {expected}"
            )
        return _to_uint8(arr, self.photometric) if as_uint8 else arr

    def __repr__(self) -> str:
        return (
            f"DicomFile({self.name!r}, {self.n_frames} frames of {self.columns}x{self.rows} "
            f"{self.photometric}, {self.bits_allocated}-bit, {self.transfer_syntax})"
        )
