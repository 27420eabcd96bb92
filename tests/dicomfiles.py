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
