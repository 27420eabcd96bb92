"""Builders of ultrasound DICOM files from real frames, shared by the DICOM, scan, video and
server tests.

Frames are given as a viewer should show them (uint8 grey or RGB); ``write_dicom`` stores them
in the requested transfer syntax, photometric interpretation and bit depth, so a correct reader
gives back (close to) the same frames. Every file carries a fake patient identity, listed in
``IDENTIFIERS``, so de-identification tests can search the output bytes for it.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

PATIENT_NAME = "DOE^JANE^MARIE"
PATIENT_ID = "PID-7731-0042"
IDENTITY = {
    "PatientBirthDate": "19850214",
    "InstitutionName": "Saint Example Maternity Hospital",
    "InstitutionAddress": "12 Harbour Street, Exampletown",
    "ReferringPhysicianName": "REFERRER^ROBERTA",
    "OperatorsName": "SONOGRAPHER^SAM",
    "PerformingPhysicianName": "OBSTETRICIAN^OLGA",
    "AccessionNumber": "ACC-20240301-889",
    "StudyID": "STUDY-5512",
    "StudyDescription": "Anomaly scan Doe 20 weeks",
    "SeriesDescription": "Fetal survey Jane",
    "StationName": "USROOM3-EXMPL",
    "DeviceSerialNumber": "SN-99887766",
    "OtherPatientIDs": "MRN-4455667",
    "PatientAddress": "7 Quiet Lane, Exampletown",
    "StudyDate": "20240301",
    "StudyTime": "101530",
}
IDENTIFIERS = (PATIENT_NAME, PATIENT_ID, *IDENTITY.values())
"""Every identifying string written into each file (the private tag repeats the name)."""

SYNTAXES = {
    "jpeg-baseline": JPEGBaseline8Bit,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
}
Region = tuple[int, int, int, int, float, float]  # x0, y0, x1, y1 (inclusive), dx cm, dy cm

SHARED = Path(
    os.environ.get("FETALPLANES_SHARED", Path(__file__).resolve().parents[1].parent / "shared")
)
SONONET_REGION = (60, 75, 880, 734)
"""Where the B-mode image lies in the 975x735 SonoNet screen captures (UI and text around it)."""


def real_frames(kind: str, n: int, scale: int = 1) -> list[np.ndarray]:
    """``n`` real frames: "sononet" (975x735 RGB screen captures) or "hc18" (800x540 grey).

    All come out at that common size (a few HC18 scans are a few pixels off), divided by
    ``scale`` (for faster tests). Skips the test when shared/ is missing.
    """
    folder = SHARED / ("sononet/example_images" if kind == "sononet" else "hc18-sample")
    paths = sorted(folder.glob("*.png"))[:n]
    if len(paths) < n:
        pytest.skip(f"real frames not found in {folder}: set FETALPLANES_SHARED to shared/")
    mode, (width, height) = ("RGB", (975, 735)) if kind == "sononet" else ("L", (800, 540))
    size = (width // scale, height // scale)
    frames = []
    for path in paths:
        with Image.open(path) as im:
            frames.append(np.asarray(im.convert(mode).resize(size)))
    return frames


def write_dicom(
    path: str | Path,
    frames: np.ndarray | Sequence[np.ndarray],
    *,
    transfer_syntax: str = "jpeg-baseline",
    photometric: str | None = None,
    bits: int = 8,
    regions: Sequence[Region] = (),
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
    fps: float | None = None,
    study_uid: str | None = None,
    multiframe: bool | None = None,
) -> Path:
    """Write ``frames`` ((N, H, W) or (N, H, W, 3) uint8) as an ultrasound DICOM file.

    ``photometric`` defaults to YBR_FULL_422 for colour JPEG, RGB for other colour files and
    MONOCHROME2 for grey. 16-bit files store each value times 257 (MONOCHROME1: inverted).
    ``multiframe`` (default: more than one frame) picks the multi-frame SOP class.
    """
    arr = np.stack([np.asarray(f, np.uint8) for f in frames])
    colour = arr.ndim == 4
    if photometric is None:
        photometric = (
            ("YBR_FULL_422" if transfer_syntax == "jpeg-baseline" else "RGB")
            if colour
            else "MONOCHROME2"
        )
    ds = _header(arr, photometric, bits, patient_name, patient_id, study_uid)
    _add_timing(ds, len(arr), fps, multiframe)
    _add_regions(ds, regions)
    syntax = SYNTAXES[transfer_syntax]
    stored = _stored_values(arr, photometric, bits)
    if transfer_syntax == "jpeg-baseline":
        _set_jpeg(ds, arr, photometric, bits)
    elif transfer_syntax in ("rle", "jpeg-ls"):
        ds.PixelData = stored.tobytes()
        ds.compress(syntax, stored if len(stored) > 1 else stored[0], generate_instance_uid=False)
    else:
        ds.PixelData = stored.tobytes()
    ds.file_meta = _file_meta(ds, syntax)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _header(
    arr: np.ndarray,
    photometric: str,
    bits: int,
    patient_name: str,
    patient_id: str,
    study_uid: str | None,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = "US"
    ds.Manufacturer = "FetalPlanes Test Scanner"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientSex = "F"
    for keyword, value in IDENTITY.items():
        setattr(ds, keyword, value)
    ds.ContentDate, ds.ContentTime = IDENTITY["StudyDate"], IDENTITY["StudyTime"]
    block = ds.private_block(0x0029, "FETALPLANES TEST", create=True)
    block.add_new(0x01, "LO", patient_name)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BurnedInAnnotation = "YES"
    ds.Rows, ds.Columns = arr.shape[1:3]
    ds.SamplesPerPixel = 3 if arr.ndim == 4 else 1
    if arr.ndim == 4:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


def _add_timing(ds: Dataset, n: int, fps: float | None, multiframe: bool | None) -> None:
    multi = n > 1 if multiframe is None else multiframe
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    if multi:
        ds.NumberOfFrames = n
        ds.FrameIncrementPointer = 0x00181063
    if fps:
        ds.FrameTime = f"{1000.0 / fps:.4f}"
        ds.CineRate = round(fps)


def _add_regions(ds: Dataset, regions: Sequence[Region]) -> None:
    if not regions:
        return
    items = []
    for x0, y0, x1, y1, dx, dy in regions:
        item = Dataset()
        item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = 1, 1, 0
        item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
        item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
        item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3
        item.PhysicalDeltaX, item.PhysicalDeltaY = dx, dy
        items.append(item)
    ds.SequenceOfUltrasoundRegions = items


def _stored_values(arr: np.ndarray, photometric: str, bits: int) -> np.ndarray:
    """What the file stores for frames a viewer should show as ``arr``."""
    if photometric == "YBR_FULL":
        arr = convert_color_space(arr, "RGB", "YBR_FULL", per_frame=True)
    if bits == 16:
        arr = arr.astype(np.uint16) * np.uint16(257)
    if photometric == "MONOCHROME1":
        arr = np.iinfo(arr.dtype).max - arr
    return np.ascontiguousarray(arr)


def _set_jpeg(ds: Dataset, arr: np.ndarray, photometric: str, bits: int) -> None:
    """Encode each frame with Pillow (4:2:2 chroma for colour) into encapsulated JPEG."""
    if bits != 8 or photometric not in ("YBR_FULL_422", "MONOCHROME2"):
        raise ValueError("JPEG Baseline test files are 8-bit YBR_FULL_422 or MONOCHROME2")
    encoded = []
    for frame in arr:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "JPEG", quality=95, subsampling=1)
        encoded.append(buf.getvalue())
    ds.PixelData = encapsulate(encoded, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"


def _file_meta(ds: Dataset, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    return meta


def bomb_dicom(path: str | Path, size: int = 9000) -> Path:
    """A ~160 KB Deflated file claiming one ``size`` x ``size`` 16-bit frame (162 MB inflated).

    The zeros are compressed in chunks, so building it never holds the frame in memory.
    """
    ds = Dataset()
    ds.Modality = "US"
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n_bytes = size * size * 2
    body.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n_bytes))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 22)
    path = Path(path)
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        meta = DicomBytesIO()
        write_file_meta_info(meta, _file_meta(ds, DeflatedExplicitVRLittleEndian))
        f.write(meta.getvalue())
        f.write(deflate.compress(body.getvalue()))
        for start in range(0, n_bytes, len(chunk)):
            f.write(deflate.compress(chunk[: min(len(chunk), n_bytes - start)]))
        f.write(deflate.flush())
    return path


# ------------------------------------------------------------------ hostile files
def _patch_sof(data: bytes, width: int, height: int) -> bytes:
    """A JPEG or JPEG-LS frame whose start-of-frame segment claims `width` x `height`."""
    out = bytearray(data)
    i = 2
    while out[i + 1] not in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
        i += 2 + int.from_bytes(out[i + 2 : i + 4], "big")
    out[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def _rle_runs(n_bytes: int) -> bytes:
    """One RLE segment of replicate runs (2 bytes for 128 zeros) decoding to `n_bytes`."""
    return b"\x81\x00" * (n_bytes // 128)


HOSTILE = (
    "jpeg-sof-12000", "jpeg-ls-sof-12000", "rle-segments", "rle-overflow", "frames-3m",
    "frames-50", "bot-short", "native-frames-3m", "deflated-frames", "region-inverted",
    "frames-fraction", "odd-values",
)
"""Kinds `hostile_dicom` writes: each has a header that the data cannot back."""


def hostile_dicom(path: str | Path, kind: str, frame: np.ndarray) -> Path:
    """A small DICOM file of kind `kind` (see ``HOSTILE``) made from a real grey `frame`.

    Each starts as a valid file from ``write_dicom`` and is then given a header that its
    data contradicts: a JPEG fragment claiming 12000 x 12000 pixels in a 64 x 64 file,
    NumberOfFrames 3,000,000 over 1 KB, an inverted ultrasound region box...
    """
    with warnings.catch_warnings():
        return _hostile(Path(path), kind, frame)


def _hostile(path: Path, kind: str, frame: np.ndarray) -> Path:
    import pydicom
    from pydicom.dataelem import DataElement
    from pydicom.encaps import generate_frames

    small = np.ascontiguousarray(frame[:64, :64])
    syntax = {"jpeg-ls-sof-12000": "jpeg-ls", "rle-segments": "rle", "rle-overflow": "rle",
              "native-frames-3m": "explicit", "deflated-frames": "deflated",
              "region-inverted": "explicit"}.get(kind, "jpeg-baseline")
    regions = [(50, 40, 5, 4, 0.01, 0.01)] if kind == "region-inverted" else ()
    write_dicom(path, [small], transfer_syntax=syntax, regions=regions)
    if kind == "region-inverted":
        return path
    ds = pydicom.dcmread(path)
    warnings.simplefilter("ignore")  # (inside catch_warnings below) the odd values are the point
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        (encoded,) = list(generate_frames(ds.PixelData, number_of_frames=1))
    if kind in ("jpeg-sof-12000", "jpeg-ls-sof-12000"):
        ds.PixelData = encapsulate([_patch_sof(encoded, 12000, 12000)], has_bot=True)
    elif kind == "rle-segments":  # a 3-segment (RGB) table in a grey file
        ds.PixelData = encapsulate([struct.pack("<I", 3) + encoded[4:]], has_bot=True)
    elif kind == "rle-overflow":  # 1 segment of 4 MB of runs: 256 MB decoded in a 64x64 file
        segment = _rle_runs(256 * 2**20)
        header = struct.pack("<16I", 1, 64, *([0] * 14))
        ds.PixelData = encapsulate([header + segment], has_bot=True)
    elif kind in ("frames-3m", "frames-50"):
        ds.NumberOfFrames = 3_000_000 if kind == "frames-3m" else 50
        ds.PixelData = encapsulate([encoded], has_bot=False)
    elif kind == "bot-short":  # a Basic Offset Table of 1 entry for 50 frames
        ds.NumberOfFrames = 50
        ds.PixelData = encapsulate([encoded], has_bot=True)
    elif kind in ("native-frames-3m", "deflated-frames"):
        ds.NumberOfFrames = 3_000_000
    elif kind == "frames-fraction":  # not a whole number: pydicom warns "Invalid value for VR IS"
        ds["NumberOfFrames"] = DataElement(0x00280008, "IS", b"2.5 ")
    elif kind == "odd-values":  # harmless odd values pydicom warns about; the file is fine
        ds["InstanceNumber"] = DataElement(0x00200013, "IS", b"1.5 ")
        ds.FrameTime = "12.3456"  # made "fast" below (pydicom cannot write that)
    else:
        raise ValueError(f"unknown hostile kind {kind!r}")
    ds.save_as(path)
    if kind == "odd-values":
        path.write_bytes(path.read_bytes().replace(b"12.3456 ", b"fast    "))
    return path
