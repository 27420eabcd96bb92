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
- The header is also checked against the data itself, since only the data decides what a
  decoder allocates: NumberOfFrames must fit in the fragments (or the basic/extended offset
  table, or the bytes a deflated stream can inflate to), and each compressed frame's own
  header (JPEG and JPEG-LS start of frame, JPEG 2000 SIZ, RLE segment table) must agree
  with Rows, Columns, SamplesPerPixel and BitsAllocated before its decoder runs. A 1 KB
  fragment whose JPEG claims 12000 x 12000 pixels is refused in one line, not decoded.
- Frames are decoded one at a time, so a long cine loop needs the memory of one frame.
- pydicom's warnings (an IS value that is not a number...) never reach stderr: they are
  kept in ``DicomFile.warnings`` (one line each) for a caller to show, as are notes such as
  an ultrasound region with an inverted box (then ``bmode_region()`` is None).
- A missing decoder is reported with the exact ``pip install`` line, not a traceback.
- ``DicomFile`` keeps only what imaging needs (pixel format, frame timing, ultrasound regions):
  no patient identity is stored in it or printed in its messages.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import math
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames, get_frame
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
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

from fetalplanes.data.formats import jpeg_header
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
    "open_dicom_and_header",
    "parse_frame_name",
    "read_header",
]

MAX_PIXELS = 64_000_000
"""Largest Rows x Columns accepted for one frame (a 8K screen is 33 Mpx)."""
MAX_FRAME_BYTES = 256 * 2**20
"""Largest decoded size of one frame in bytes."""
MAX_ELEMENT_BYTES = 64 * 2**20
"""Largest header element read (a deflated header could otherwise inflate without bound)."""
MAX_NOTES = 8
"""Most warnings kept per file (a damaged header can repeat the same one for every value)."""
_DEFLATE_RATIO = 1032
"""Most bytes one deflated byte can inflate to (zlib's limit): bounds a Deflated file's data."""

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

_RLE = "1.2.840.10008.1.2.5"
_JPEG_LS = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_JPEG = frozenset(
    {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
     "1.2.840.10008.1.2.4.70"}
) | _JPEG_LS
_J2K = frozenset(
    {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
     "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
)
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD

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
    file_size: int = 0  # bytes of the file (of the deflated stream for Deflated files)


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
    file_size = f.seek(0, io.SEEK_END)
    f.seek(0)
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
    return _Header(ds, syntax, offset, length, file_size), stream


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on odd values: never raw on stderr
        with _open(source) as f:
            header, _ = _read_header(f, label)
    return header.ds


def open_dicom(source: bytes | str | Path, name: str | None = None) -> DicomFile:
    """Parse and validate a DICOM file (path or bytes) without decoding any pixels.

    Raises ImageError (one line naming the file) for files with no pixel data, frames too
    large to decode safely, unsupported transfer syntaxes or photometric interpretations,
    and missing decoder plugins (with the ``pip install`` line that fixes it).
    """
    return open_dicom_and_header(source, name)[0]


def open_dicom_and_header(source: bytes | str | Path,
                          name: str | None = None) -> tuple[DicomFile, Dataset]:
    """``open_dicom`` and ``read_header`` from one parse (the DICOM node checks and files
    every instance it receives: parsing twice was a tenth of its work)."""
    label = _display_name(source, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # kept as notes, never printed raw
        try:
            with _open(source) as f:
                header, _ = _read_header(f, label)
                extended = _validate(header, label)
                if header.syntax.is_encapsulated:
                    _check_fragments(f, header, extended, label)
            dcm = DicomFile(source, label, header)
        except OSError as exc:
            raise ImageError(f"{label}: cannot read file ({exc.strerror or exc})") from None
        except ImageError as exc:
            raise ImageError(_with_note(str(exc), caught)) from None
        except Exception as exc:  # e.g. a text where a number belongs, an unknown VR
            why = f"{label}: malformed DICOM attributes ({_first_line(exc)})"
            raise ImageError(_with_note(why, caught)) from None
    dcm.warnings[:0] = _notes(caught)
    del dcm.warnings[MAX_NOTES:]
    return dcm, header.ds


def _notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """Recorded warnings as distinct one-line notes, first seen first."""
    notes: list[str] = []
    for w in caught:
        text = _first_line(w.message) if isinstance(w.message, Exception) else str(w.message)
        text = " ".join(text.split()).split(" Please see ")[0][:200]  # no link to the standard
        if text and text not in notes:
            notes.append(text)
    return notes


def _with_note(message: str, caught: list[warnings.WarningMessage]) -> str:
    """`message` with pydicom's first warning folded in, when there was one: it often says
    which value was wrong ("Invalid value for VR IS: '2.5x'")."""
    notes = _notes(caught)
    if not notes or notes[0] in message:
        return message
    return f"{message} (pydicom: {notes[0]})"


def _validate(header: _Header, name: str) -> tuple[list[int], list[int]] | None:
    """Header checks before any pixel is read; the Extended Offset Table, if the file has one."""
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
    n_frames = number_of_frames(ds, name)
    if not header.syntax.is_encapsulated:
        _check_native_length(header, name, n_frames)
        return None
    return _extended_offsets(ds, name)


def number_of_frames(ds: Dataset, name: str) -> int:
    """NumberOfFrames as a whole number >= 1 (1 when absent); ImageError for anything else."""
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number == int(number) and number >= 1):
        raise ImageError(f"{name}: NumberOfFrames '{value}' is not a whole number >= 1")
    return int(number)


def _extended_offsets(ds: Dataset, name: str) -> tuple[list[int], list[int]] | None:
    """(offsets, lengths) of the Extended Offset Table (7FE0,0001/0002), when present."""
    offsets, lengths = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
    if not offsets:
        return None
    if not lengths or len(offsets) != len(lengths) or len(offsets) % 8:
        raise ImageError(f"{name}: malformed Extended Offset Table (offsets and lengths differ)")
    count = len(offsets) // 8
    return list(struct.unpack(f"<{count}Q", offsets)), list(struct.unpack(f"<{count}Q", lengths))


def _check_fragments(
    f: BinaryIO, header: _Header, extended: tuple[list[int], list[int]] | None, name: str
) -> None:
    """NumberOfFrames must fit in what the encapsulated data can hold: the offset table's
    entries, or (without one) its fragments, since every frame takes at least one. Counting
    reads only the 8-byte item headers and stops at NumberOfFrames, so a file claiming
    3,000,000 frames over 1 KB is refused at once, not expanded into 3,000,000 items."""
    n_frames = number_of_frames(header.ds, name)
    start = header.pixel_offset or 0
    size = header.file_size - start
    f.seek(start)
    try:
        basic = _basic_offsets(f, size)
    except (ValueError, struct.error) as exc:
        raise ImageError(
            f"{name}: malformed encapsulated pixel data ({_first_line(exc)})"
        ) from None
    if extended is not None:
        offsets, lengths = extended
        if any(o + n > size for o, n in zip(offsets, lengths, strict=True)):
            raise ImageError(f"{name}: Extended Offset Table points past the end of the file")
        capacity, what = len(offsets), "Extended Offset Table offsets"
    elif basic:
        if any(b <= a for a, b in itertools.pairwise(basic)) or basic[-1] >= size:
            raise ImageError(
                f"{name}: malformed Basic Offset Table (offsets out of order or past the end "
                "of the file)"
            )
        capacity, what = len(basic), "Basic Offset Table offsets"
    else:
        capacity, what = _count_fragments(f, n_frames, header.file_size, name), "fragments"
    if n_frames > capacity:
        raise ImageError(
            f"{name}: NumberOfFrames is {n_frames:,} but the pixel data holds only "
            f"{capacity:,} {what if capacity != 1 else what[:-1]}; refusing to read it"
        )


def _basic_offsets(f: BinaryIO, size: int) -> list[int]:
    """The Basic Offset Table's offsets (empty: none); its length is checked against `size`
    before it is read."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError("no Basic Offset Table item")
    group, element, length = struct.unpack("<HHI", head)
    if (group << 16 | element) != _ITEM:
        raise ValueError(f"found tag ({group:04X},{element:04X}) where the offset table belongs")
    if length % 4 or length > size:
        raise ValueError(f"Basic Offset Table of {length:,} bytes")
    return list(struct.unpack(f"<{length // 4}I", f.read(length))) if length else []


def _count_fragments(f: BinaryIO, limit: int, end: int, name: str) -> int:
    """Fragments after the offset table, counted up to `limit` from their item headers."""
    count = 0
    while count < limit:
        head = f.read(8)
        if len(head) < 8:
            break
        group, element, length = struct.unpack("<HHI", head)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            break
        if tag != _ITEM or length == _UNDEFINED:
            raise ImageError(
                f"{name}: malformed encapsulated pixel data (fragment {count + 1} has tag "
                f"({group:04X},{element:04X}) or an undefined length)"
            )
        count += 1
        if f.seek(length, io.SEEK_CUR) >= end:
            break
    return count


#: Decoder plugins preferred where they are installed: Pillow (libjpeg-turbo) decodes an
#: 800x540 8-bit JPEG in 1.6 ms, pylibjpeg-libjpeg (pydicom's first choice) in 7.6 ms,
#: with at most one grey level between them; JPEG decoding was 15 % of classifying a
#: DICOM ultrasound frame with the int8 model. 12-bit JPEG stays with pylibjpeg.
_FAST_PLUGINS = {str(JPEGBaseline8Bit): "pillow", str(JPEGExtended12Bit): "pillow"}


def _fast_plugin(syntax: UID, bits_allocated: int) -> str | None:
    """The faster decoder plugin for 8-bit frames of `syntax`, when it is installed."""
    return _installed_fast_plugin(str(syntax)) if bits_allocated == 8 else None


@functools.cache
def _installed_fast_plugin(syntax: str) -> str | None:
    plugin = _FAST_PLUGINS.get(syntax)
    if plugin is None:
        return None
    try:
        return plugin if plugin in get_decoder(UID(syntax)).available_plugins else None
    except NotImplementedError:
        return None


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


def _check_native_length(header: _Header, name: str, n_frames: int) -> None:
    """The frames the header declares must be in the file: its PixelData value as written
    (capped at the bytes really there), or what a Deflated file can inflate to."""
    if header.pixel_length == _UNDEFINED:
        raise ImageError(f"{name}: uncompressed pixel data has an undefined length (corrupt file)")
    expected = get_expected_length(_pixel_dataset(header.ds), "bytes")
    frames = f" for {n_frames:,} frames" if n_frames > 1 else ""
    if header.pixel_length < expected:
        raise ImageError(
            f"{name}: pixel data is truncated ({header.pixel_length:,} bytes, "
            f"expected {expected:,}{frames})"
        )
    if header.syntax == DeflatedExplicitVRLittleEndian:
        most = header.file_size * _DEFLATE_RATIO
        if expected > most:
            raise ImageError(
                f"{name}: pixel data is truncated ({header.file_size:,} deflated bytes cannot "
                f"hold the {expected:,} bytes declared{frames})"
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


def _parse_regions(ds: Dataset, notes: list[str]) -> list[UltrasoundRegion]:
    """The declared regions; an item with unreadable values is left out with a note."""
    regions = []
    for number, item in enumerate(ds.get("SequenceOfUltrasoundRegions", None) or [], 1):
        box = [item.get(k) for k in _BOX_KEYWORDS]
        if any(v is None or v == "" for v in box):
            continue
        try:
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
        except (TypeError, ValueError, OverflowError) as exc:
            notes.append(f"ultrasound region {number} is unreadable ({_first_line(exc)}); ignored")
    return regions


def _clipped(region: UltrasoundRegion, width: int, height: int) -> UltrasoundRegion | None:
    """`region` with its (inclusive) box clipped to the frame; None when the box is inverted
    or empty, or nothing of it is inside the frame."""
    if not (region.x0 < region.x1 and region.y0 < region.y1):
        return None
    x0, y0 = max(region.x0, 0), max(region.y0, 0)
    x1, y1 = min(region.x1, width - 1), min(region.y1, height - 1)
    if not (x0 < x1 and y0 < y1):
        return None
    return dataclasses.replace(region, x0=x0, y0=y0, x1=x1, y1=y1)


def _bmode(
    regions: list[UltrasoundRegion], width: int, height: int, notes: list[str]
) -> UltrasoundRegion | None:
    """The largest valid 2D tissue region (spatial format 1, data type 1), clipped to the
    frame; a tissue region with a bad box gets a note and is passed over."""
    valid = []
    for number, region in enumerate(regions, 1):
        if region.spatial_format != 1 or region.data_type != 1:
            continue
        clipped = _clipped(region, width, height)
        if clipped is None:
            box = f"({region.x0},{region.y0})-({region.x1},{region.y1})"
            notes.append(
                f"ultrasound region {number}: box {box} is inverted, empty or outside the "
                f"{width}x{height} frame; ignored (the image is cropped by the usual guess)"
            )
        else:
            valid.append(clipped)
    return max(valid, key=lambda r: r.area, default=None)


def _int_or_none(value: object) -> int | None:
    return None if value in (None, "") else int(value)  # type: ignore[call-overload]


def _float_or_none(value: object) -> float | None:
    return None if value in (None, "") else float(value)  # type: ignore[arg-type]


def _frame_rate(ds: Dataset, notes: list[str]) -> float | None:
    """Frames per second: FrameTime (ms) first, then CineRate, then the display rate.
    A value that is not a positive finite number is passed over with a note."""
    for keyword in ("FrameTime", "CineRate", "RecommendedDisplayFrameRate"):
        try:
            value = _float_or_none(ds.get(keyword))
        except (TypeError, ValueError):
            notes.append(f"{keyword} '{ds.get(keyword)}' is not a number; ignored")
            continue
        if value is not None and math.isfinite(value) and value > 0:
            return 1000.0 / value if keyword == "FrameTime" else value
    return None


def _j2k_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(precision, rows, columns, components) from a JPEG 2000 codestream's SIZ segment
    (a bare codestream, or one inside JP2 boxes near the start)."""
    at = data.find(b"\xff\x4f\xff\x51", 0, 4096)
    siz = data[at + 4 : at + 43] if at >= 0 else b""
    if len(siz) < 39:
        return None
    _, _, xsiz, ysiz, x0, y0, _, _, _, _, comps = struct.unpack(">HHIIIIIIIIH", siz[:38])
    return (siz[38] & 0x7F) + 1, ysiz - y0, xsiz - x0, comps


def _rle_overflows(data: bytes, start: int, end: int, limit: int) -> bool:
    """Whether the RLE segment data[start:end] decodes to more than `limit` bytes, counted
    from its run headers without decoding (a 2-byte run can stand for 128 bytes)."""
    if (end - start + 1) // 2 * 128 <= limit:
        return False
    total, pos = 0, start
    while pos < end:
        n = data[pos]
        if n > 128:  # the next byte, 257 - n times
            total, pos = total + 257 - n, pos + 2
        elif n < 128:  # the next n + 1 bytes as they are
            total, pos = total + n + 1, pos + n + 2
        else:
            pos += 1
        if total > limit:
            return True
    return False


def _rle_problem(data: bytes, rows: int, columns: int, samples: int, bits: int) -> str | None:
    """Why an RLE frame's header (PS3.5 G.5: segment count, 15 offsets) disagrees with the
    DICOM header, or None. Each segment holds one byte of every pixel of one sample."""
    if len(data) < 64:
        return f"its RLE header is cut short ({len(data)} bytes of 64)"
    header = struct.unpack("<16I", data[:64])
    count, want = header[0], samples * max(bits // 8, 1)
    if count != want:
        return (
            f"its RLE header lists {count} segments, but the DICOM header needs {want} "
            f"(SamplesPerPixel {samples} x BitsAllocated {bits} / 8)"
        )
    offsets = list(header[1 : 1 + count])
    ends = [*offsets[1:], len(data)]
    if offsets[0] < 64 or any(b <= a for a, b in zip(offsets, ends, strict=True)):
        return "its RLE segment offsets are out of order or past the end of the frame"
    limit = rows * columns + 128  # a pad run beyond Rows x Columns is tolerated
    for number, (a, b) in enumerate(zip(offsets, ends, strict=True), 1):
        if _rle_overflows(data, a, b, limit):
            return (
                f"RLE segment {number} decodes to more than the {rows * columns:,} bytes "
                f"of the DICOM header's {columns}x{rows} (Columns x Rows)"
            )
    return None


def frame_problem(
    syntax: str, data: bytes, rows: int, columns: int, samples: int, bits: int
) -> str | None:
    """Why one compressed frame must not be decoded, from its own header, or None.

    The decoder allocates what the frame's header says, not what the DICOM header says, so
    they must agree (Columns x Rows, SamplesPerPixel, BitsAllocated): then a frame can never
    be over the ``MAX_PIXELS`` / ``MAX_FRAME_BYTES`` limits the DICOM header was checked
    against. Checks JPEG and JPEG-LS (SOF), JPEG 2000 (SIZ) and RLE (segment table).
    """
    if syntax == _RLE:
        return _rle_problem(data, rows, columns, samples, bits)
    if syntax in _JPEG:
        kind, head = ("JPEG-LS" if syntax in _JPEG_LS else "JPEG"), jpeg_header(data, True)
    elif syntax in _J2K:
        kind, head = "JPEG 2000", _j2k_header(data)
    else:
        return None
    if head is None:
        return f"no {kind} frame header (start of frame) before its image data"
    precision, height, width, comps = head
    if (width, height, comps) != (columns, rows, samples) or not 0 < precision <= bits:
        return (
            f"its {kind} header says {width}x{height} pixels, {comps} component(s) of "
            f"{precision} bits, but the DICOM header says {columns}x{rows}, {samples} of "
            f"{bits} (Columns x Rows, SamplesPerPixel, BitsAllocated)"
        )
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
    never the patient identity. ``warnings`` holds one-line notes for the user (pydicom's
    warnings on odd values, a region box that was ignored), never printed here.
    """

    def __init__(self, source: bytes | str | Path, name: str, header: _Header) -> None:
        ds = header.ds
        self._source = source
        self._syntax = header.syntax
        self._pixels = _pixel_dataset(ds)
        self._pixel_offset = header.pixel_offset or 0
        self._extended = _extended_offsets(ds, name) if header.syntax.is_encapsulated else None
        self.name = name
        self.warnings: list[str] = []
        self.rows = int(ds.Rows)
        self.columns = int(ds.Columns)
        self.samples = int(ds.get("SamplesPerPixel", 1) or 1)
        self.bits_allocated = int(ds.BitsAllocated)
        self.photometric = str(ds.PhotometricInterpretation).strip()
        self.n_frames = number_of_frames(ds, name)
        self.fps = _frame_rate(ds, self.warnings)
        self.regions = _parse_regions(ds, self.warnings)
        self._bmode = _bmode(self.regions, self.columns, self.rows, self.warnings)

    @property
    def transfer_syntax(self) -> str:
        """Name of the transfer syntax, e.g. 'JPEG Baseline (Process 1)'."""
        return self._syntax.name

    def bmode_region(self) -> UltrasoundRegion | None:
        """The largest 2D tissue region (spatial format 1, data type 1), clipped to the frame.

        None when none is declared, or when each declared one has an inverted, empty or
        off-frame box (a note in ``warnings`` says so): the caller then guesses the crop.
        """
        return self._bmode

    def spacing_mm(self) -> tuple[float, float] | None:
        """(dy, dx) in mm per pixel from the B-mode region, when it is calibrated in cm."""
        region = self.bmode_region()
        if region is None or region.delta_x is None or region.delta_y is None:
            return None
        if region.units_x != _CM or region.units_y != _CM:
            return None
        if not (math.isfinite(region.delta_x) and math.isfinite(region.delta_y)):
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
        """Frames at ascending `indices`; each decoded with pydicom's warnings kept as notes,
        any failure one ImageError naming the file and the frame."""
        if self._is_deflated:
            arrays = self._deflated(indices)
        elif self._syntax.is_encapsulated:
            arrays = self._encapsulated(indices)
        else:
            arrays = self._pydicom(indices)
        try:
            for index in indices:
                arr = self._decode_one(index, arrays)
                yield index, self._finish(arr, as_uint8)
        finally:
            arrays.close()

    def _decode_one(self, index: int, arrays: Iterator[np.ndarray]) -> np.ndarray:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return next(arrays)
            except ImageError:
                raise
            except StopIteration:
                missing = f"{self.name}: frame {index} is missing from the pixel data"
                raise ImageError(missing) from None
            except Exception as exc:
                raise ImageError(
                    f"{self.name}: cannot decode frame {index} ({self.transfer_syntax}): "
                    f"{_first_line(exc)}"
                ) from None
            finally:
                self._note(caught)

    def _note(self, caught: list[warnings.WarningMessage]) -> None:
        for note in _notes(caught):
            if note not in self.warnings and len(self.warnings) < MAX_NOTES:
                self.warnings.append(note)

    @property
    def _is_deflated(self) -> bool:
        return self._syntax == DeflatedExplicitVRLittleEndian

    def _pydicom(self, indices: list[int] | range) -> Iterator[np.ndarray]:
        """Uncompressed frames, read by pydicom straight from the file, one at a time."""
        with _open(self._source) as f:
            yield from iter_pixels(f, indices=indices, transfer_syntax_uid=self._syntax)

    def _encapsulated(self, indices: list[int] | range) -> Iterator[np.ndarray]:
        """Compressed frames, one at a time: each frame's own header is checked against the
        DICOM header (``frame_problem``) before its decoder may allocate anything."""
        single = self._single_frame(self._syntax)
        wanted = list(indices)
        with _open(self._source) as f:
            f.seek(self._pixel_offset)
            if len(wanted) == 1:
                data = get_frame(
                    f, wanted[0], number_of_frames=self.n_frames,
                    extended_offsets=self._extended,
                )
                yield self._decode_compressed(single, wanted[0], data)
                return
            frames = generate_frames(
                f, number_of_frames=self.n_frames, extended_offsets=self._extended
            )
            todo = iter(wanted)
            want = next(todo, None)
            for index, data in enumerate(frames):
                if want is None:
                    return
                if index == want:
                    yield self._decode_compressed(single, index, data)
                    want = next(todo, None)

    def _decode_compressed(self, single: Dataset, index: int, data: bytes) -> np.ndarray:
        problem = frame_problem(
            str(self._syntax), data, self.rows, self.columns, self.samples, self.bits_allocated
        )
        if problem:
            raise ImageError(f"{self.name}: frame {index}: {problem}; refusing to decode it")
        single.PixelData = encapsulate([data])
        plugin = _fast_plugin(self._syntax, self.bits_allocated)
        if plugin:
            try:
                return pixel_array(single, decoding_plugin=plugin)
            except Exception:  # a frame the fast plugin cannot read: the default one may
                pass
        return pixel_array(single)

    def _single_frame(self, syntax: UID) -> Dataset:
        """The pixel attributes of one frame in `syntax`, to decode frames one at a time."""
        single = _pixel_dataset(self._pixels)
        single.NumberOfFrames = 1
        single.file_meta.TransferSyntaxUID = syntax
        return single

    def _deflated(self, indices: list[int] | range) -> Iterator[np.ndarray]:
        """Frames of a Deflated file, inflated one at a time (pydicom would inflate all)."""
        single = self._single_frame(ExplicitVRLittleEndian)
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
