"""Which formats fetalplanes decodes, decided from a file's first bytes, never its name.

Why an allow-list: Pillow's full plugin set includes EPS/PostScript (it runs Ghostscript,
an interpreter: a file named `scan.png` could print and write files inside the server),
and FFmpeg opens playlists and other files that point at more files. So every image and
video reaches a decoder only after its leading bytes have named one of the formats below;
Pillow is given that one format (`pillow_open`) and its other plugins are never loaded.
"""

from __future__ import annotations

import io
from typing import Any

#: Image formats decoded by Pillow/OpenCV (DICOM is recognised by `data.dicom`).
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")
#: Video containers handed to FFmpeg (through OpenCV).
VIDEO_FORMATS = ("MP4/MOV", "AVI", "Matroska/WebM", "MPEG-TS", "MPEG-PS", "Y4M")
#: What users read in messages.
ACCEPTED = "PNG, JPEG, TIFF, BMP, WebP, GIF, DICOM, or a video (MP4, MOV, AVI, MKV, WebM, MPEG)"
#: Bytes the head of a file needs for every test here.
HEAD_BYTES = 4096

#: Known formats that are refused, named in the message (what the file really is).
_REFUSED = (
    (b"%!PS", "a PostScript file"),
    (b"\xc5\xd0\xd3\xc6", "an EPS file"),
    (b"%PDF", "a PDF file"),
    (b"<svg", "an SVG file"),
    (b"<?xml", "an XML/SVG file"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"#EXTM3U", "a playlist (M3U/HLS)"),
    (b"ffconcat", "an FFmpeg concat list"),
    (b"\x00\x00\x01\x00", "an ICO file"),
    (b"8BPS", "a Photoshop file"),
    (b"\x7fELF", "an executable"),
)
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")


def image_format(head: bytes) -> str | None:
    """The image format named by the first bytes (one of IMAGE_FORMATS), else None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head.startswith(b"BM") and len(head) >= 18:
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def video_format(head: bytes) -> str | None:
    """The video container named by the first bytes (one of VIDEO_FORMATS), else None."""
    if len(head) >= 12 and head[4:8] in _ISO_BOXES:
        return "MP4/MOV"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "Matroska/WebM"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
        return "MPEG-TS"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "MPEG-PS"
    if head.startswith(b"YUV4MPEG2"):
        return "Y4M"
    return None


def refused_kind(head: bytes) -> str | None:
    """What a known but refused file is ("a PostScript file", "a PDF file" ...), else None."""
    stripped = head.lstrip()
    for magic, kind in _REFUSED:
        if head.startswith(magic) or stripped.startswith(magic):
            return kind
    return None


def not_accepted(head: bytes, what: str = "image") -> str:
    """The reason part of the one-line message for bytes that are no accepted format."""
    article = "an" if what[:1] in "aeiou" else "a"
    kind = refused_kind(head)
    found = f"but {kind}" if kind else "(unrecognised format)"
    return f"not {article} {what} {found}; fetalplanes reads {ACCEPTED}"


def _load_plugins() -> None:
    """Register exactly the allowed Pillow plugins, so Pillow never imports the rest."""
    from PIL import (  # noqa: F401  (imported for their registration)
        BmpImagePlugin,
        GifImagePlugin,
        JpegImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
        WebPImagePlugin,
    )


def pillow_open(data: bytes, fmt: str) -> Any:
    """`PIL.Image.open` of in-memory bytes restricted to the one format sniffed from them."""
    from PIL import Image

    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"format {fmt!r} is not on the allow-list")
    _load_plugins()
    return Image.open(io.BytesIO(data), formats=[fmt])


#: JPEG start-of-frame markers (all but DHT C4, JPG C8 and DAC CC), which carry the size.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: JPEG markers without a length field (TEM, RST0-7).
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


#: JPEG-LS start of frame (SOF55), which DICOM's JPEG-LS fragments carry.
JPEG_LS_SOF = 0xF7


def jpeg_header(data: bytes, jpeg_ls: bool = False) -> tuple[int, int, int, int] | None:
    """(precision, rows, columns, components) from a JPEG (or, with `jpeg_ls`, JPEG-LS)
    start-of-frame segment, walking the marker segments before it; None when there is none
    before the scan."""
    sof = _SOF | {JPEG_LS_SOF} if jpeg_ls else _SOF
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:  # every step moves forward, so this ends
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in sof:
            if length < 8 or i + 10 > n:
                return None
            rows = int.from_bytes(data[i + 5 : i + 7], "big")
            return data[i + 4], rows, int.from_bytes(data[i + 7 : i + 9], "big"), data[i + 9]
        i += 2 + max(length, 2)
    return None
