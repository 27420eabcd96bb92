"""De-identify ultrasound DICOM files before they leave the hospital (a file or a folder tree).

What it does, and why:

- Header: DICOM PS3.15 Annex E, Table E.1-1, Basic Application Level Confidentiality
  Profile: every row of the table (loaded at run time from ``ps3_15_e1_1.csv``, whose
  header names the edition), then a safety net for what no table lists: see
  ``deid_profile``. Every instance UID gets a new UID; the same old UID gets the same new
  UID in every file of one run, so studies and series stay together and references stay
  valid. The old -> new map is written only when asked (``uid_map``): it re-identifies the
  data and must be kept like patient data.
- Pixels: scanners burn names, IDs and dates into the screen around the image. Everything
  outside the declared ultrasound regions (the union of their boxes) is zeroed, and
  ``top_band`` zeroes a band at the top where many scanners print the patient name, on every
  frame. Text burned inside a region box (measurements, annotations, sometimes a name) cannot
  be found this way, so BurnedInAnnotation stays "YES" unless the scanner itself declared "NO".
- Inputs: every file under a folder is looked at; non-DICOM files, unreadable or
  damaged ones and special files (FIFOs, devices) are each named in the report, and the
  run goes on. A FIFO or device given as the input, or a folder without any DICOM file, is
  refused (``NothingToDeidentify``); an output folder that cannot be created or written
  into is refused before any work (one line naming it and why).
- Output: pixels are written uncompressed (Explicit VR Little Endian; YBR colour as RGB), since
  masking needs decoded pixels and re-encoding lossy JPEG would degrade the image a second
  time. Outputs are written atomically (temporary file + rename) and existing outputs are
  never overwritten: they are skipped with a note, so an interrupted run can be resumed.
- File names keep their relative path, unless ``rename=True`` names each file
  ``<new SOP Instance UID>.dcm`` in ``dst`` (scanner and folder names often carry identities).
"""

from __future__ import annotations

import csv
import os
import secrets
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fetalplanes.data.dicom import DicomFile, is_dicom, open_dicom, read_header
from fetalplanes.data.images import os_error_text
from fetalplanes.errors import FetalPlanesError
from fetalplanes.tools.deid_profile import ProfileRun, apply_profile, load_table

__all__ = ["DeidReport", "NothingToDeidentify", "deidentify"]

_PROFILE_CODES = {
    "113100": "Basic Application Confidentiality Profile",
    "113111": "Retain Safe Private Option",
}
_ENCAPSULATION_KEYWORDS = ("ExtendedOffsetTable", "ExtendedOffsetTableLengths")
_LOSSLESS = {  # compressed syntaxes that keep every value
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.5",
}
_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket",
}  # fmt: skip


class NothingToDeidentify(FetalPlanesError):
    """The input holds no DICOM file to work on (a FIFO, a device, a folder without DICOM)."""


@dataclass
class DeidReport:
    """What one run did; every message is one line naming its file."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unmasked: list[Path] = field(default_factory=list)
    not_dicom: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the command line."""
        return (
            f"{len(self.written)} written, {len(self.skipped)} skipped (exist), "
            f"{len(self.failed)} failed, {len(self.not_dicom)} not DICOM; "
            f"{len(self.unmasked)} written without region masking (no regions declared)"
        )


class _UidMap:
    """Old UID -> new UID, the same for every file of one run."""

    def __init__(self) -> None:
        self.mapping: dict[str, str] = {}

    def __call__(self, old: str) -> str:
        if old not in self.mapping:
            self.mapping[old] = generate_uid()
        return self.mapping[old]

    def write_csv(self, path: Path) -> None:
        def write(f: str) -> None:
            with open(f, "x", newline="", encoding="ascii") as out:
                writer = csv.writer(out)
                writer.writerow(["old_uid", "new_uid"])
                writer.writerows(sorted(self.mapping.items()))

        _atomic(path, write)


def deidentify(
    src: str | Path,
    dst: str | Path,
    *,
    mask_outside_regions: bool = True,
    top_band: float = 0,
    uid_map: str | Path | None = None,
    rename: bool = False,
) -> DeidReport:
    """De-identify ``src`` (a DICOM file or a folder, recursively) into the folder ``dst``.

    ``top_band`` zeroes that many rows at the top of every frame (a fraction of the height if
    below 1). ``uid_map`` names a CSV to write the old -> new UIDs to. Refuses (one-line
    FetalPlanesError) when ``dst`` is ``src`` or inside it, when ``uid_map`` exists, and, with
    ``rename``, when ``dst`` is not empty or cannot be created; raises NothingToDeidentify
    for a FIFO or device, or a folder without DICOM. Bad files are reported, one line
    each, and the run goes on.
    """
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    map_path = Path(uid_map).resolve() if uid_map is not None else None
    _check_paths(src_path, dst_path, map_path, rename)
    report, uids = DeidReport(), _UidMap()
    run = ProfileRun(uids)
    found = False
    for path, rel in _inputs(src_path, report):
        found = True
        out = None if rename else dst_path / rel
        if out is not None and out.exists():
            report.skipped.append(f"{out}: exists, not overwritten")
            continue
        try:
            written, masked = _deidentify_file(
                path, out, dst_path, run, mask_outside_regions, top_band
            )
        except FetalPlanesError as exc:
            report.failed.append(str(exc))
            continue
        except OSError as exc:  # reading the input or writing the output
            report.failed.append(f"{path}: {_os_error_line(exc)}")
            continue
        except Exception as exc:  # a malformed file must not stop the run
            report.failed.append(f"{path}: cannot de-identify ({_first_line(exc)})")
            continue
        if written is None:
            report.skipped.append(f"{path}: output exists, not overwritten")
            continue
        report.written.append(written)
        if mask_outside_regions and not masked:
            report.unmasked.append(written)
    if not found and not report.failed:
        n = len(report.not_dicom)
        looked = f" ({n} other file{'s' * (n != 1)} looked at)" if n else ""
        raise NothingToDeidentify(f"{src_path}: no DICOM file in this folder{looked}")
    if map_path is not None:
        uids.write_csv(map_path)
    return report


def _check_paths(src: Path, dst: Path, uid_map: Path | None, rename: bool) -> None:
    try:
        mode = src.stat().st_mode
    except OSError as exc:
        raise FetalPlanesError(f"{src}: {os_error_text(exc)}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise NothingToDeidentify(
            f"{src}: not a file or folder but {_kind(mode)}; deid reads DICOM files and folders"
        )
    if dst.exists() and not dst.is_dir():
        raise FetalPlanesError(f"{dst}: output must be a folder, and this is a file")
    for target, what in ((dst, "output folder"), (uid_map, "UID map")):
        if target is not None and (target == src or src in target.parents):
            raise FetalPlanesError(
                f"{target}: the {what} is inside the input {src}; choose another"
            )
    if uid_map is not None and uid_map.exists():
        raise FetalPlanesError(f"{uid_map}: UID map already exists, not overwritten")
    if rename and dst.exists() and any(dst.iterdir()):
        raise FetalPlanesError(
            f"{dst}: rename=True needs an empty output folder (new names differ on every run)"
        )
    _check_writable(dst, dst, "output folder")
    if uid_map is not None:
        _check_writable(uid_map, uid_map.parent, "UID map")


def _check_writable(target: Path, folder: Path, what: str) -> None:
    """Refuse, before any work, an output whose folder cannot be created or written into."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FetalPlanesError(f"{target}: cannot create the {what}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(existing) else "permission denied"
        raise FetalPlanesError(f"{target}: cannot write the {what} in {existing} ({why})")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "a special file")


def _os_error_line(exc: OSError) -> str:
    """'cannot de-identify (OUT/x.dcm: no space left on device)': path and reason, no repr."""
    where = f"{os.fsdecode(exc.filename)}: " if exc.filename is not None else ""
    return f"cannot de-identify ({where}{os_error_text(exc)})"


def _inputs(src: Path, report: DeidReport) -> Iterator[tuple[Path, Path]]:
    """(file, path relative to the output folder) for every DICOM file under ``src``."""
    if src.is_file():
        yield src, Path(src.name)
        return
    for path in sorted(src.rglob("*")):
        try:
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                report.failed.append(f"{path}: not a regular file but {_kind(mode)}, skipped")
                continue
            with path.open("rb") as f:
                head = f.read(4096)
        except OSError as exc:
            report.failed.append(f"{path}: cannot read ({os_error_text(exc)})")
            continue
        if is_dicom(head, path.name):
            yield path, path.relative_to(src)
        else:
            report.not_dicom.append(path)


def _deidentify_file(
    path: Path,
    out: Path | None,
    dst: Path,
    run: ProfileRun,
    mask_regions: bool,
    top_band: float,
) -> tuple[Path | None, bool]:
    """Write one de-identified file; return (its path or None if it exists, region-masked)."""
    dcm = open_dicom(path)
    ds = read_header(path)
    lossy = _is_lossy(ds)
    run.kept_private = False
    apply_profile(ds, run)
    out = out or dst / f"{ds.SOPInstanceUID}.dcm"
    if out.exists():
        return None, False
    keep = _keep_mask(dcm, mask_regions, top_band)
    masked = mask_regions and bool(dcm.regions)
    _set_pixel_module(ds, dcm, lossy)
    _mark_deidentified(ds, masked, top_band, run.kept_private)
    frame_bytes = dcm.rows * dcm.columns * dcm.samples * (dcm.bits_allocated // 8)

    def write(f: str) -> None:
        with open(f, "xb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            total = frame_bytes * dcm.n_frames
            vr = b"OB" if dcm.bits_allocated == 8 else b"OW"
            fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, total + total % 2))
            for index, frame in dcm.iter_frames(as_uint8=False):
                data = _masked_bytes(frame, keep)
                if len(data) != frame_bytes:
                    raise FetalPlanesError(
                        f"{path}: frame {index} decoded to {len(data)} bytes, not {frame_bytes}"
                    )
                fh.write(data)
            if total % 2:
                fh.write(b"\0")

    _atomic(out, write)
    return out, masked


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _is_lossy(ds: Dataset) -> bool:
    """Whether the stored pixels were lossy compressed (now or before)."""
    syntax = ds.file_meta.TransferSyntaxUID
    lossy_syntax = syntax.is_compressed and not syntax.is_deflated and syntax not in _LOSSLESS
    return lossy_syntax or str(ds.get("LossyImageCompression", "")) == "01"


def _band_rows(top_band: float, rows: int) -> int:
    if top_band < 0:
        raise FetalPlanesError(f"top_band must be >= 0, got {top_band}")
    return min(rows, round(top_band * rows) if top_band < 1 else int(top_band))


def _keep_mask(dcm: DicomFile, mask_regions: bool, top_band: float) -> np.ndarray | None:
    """Pixels to keep (True): inside the regions' boxes and below the top band."""
    keep = np.ones((dcm.rows, dcm.columns), bool)
    if mask_regions and dcm.regions:
        keep[:] = False
        for r in dcm.regions:
            keep[max(r.y0, 0) : r.y1 + 1, max(r.x0, 0) : r.x1 + 1] = True
    keep[: _band_rows(top_band, dcm.rows)] = False
    return None if keep.all() else keep


def _masked_bytes(frame: np.ndarray, keep: np.ndarray | None) -> bytes:
    """The frame with everything outside ``keep`` zeroed, as little-endian bytes."""
    if keep is not None:
        frame = frame.copy()
        frame[~keep] = 0
    return np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<")).tobytes()


def _set_pixel_module(ds: Dataset, dcm: DicomFile, lossy: bool) -> None:
    """Describe the uncompressed pixels that will follow the header."""
    for keyword in _ENCAPSULATION_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    if dcm.samples == 3:
        ds.PhotometricInterpretation = "RGB"  # YBR is converted to RGB when decoded
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns, ds.SamplesPerPixel = dcm.rows, dcm.columns, dcm.samples
    ds.BitsAllocated = dcm.bits_allocated
    if dcm.n_frames > 1 or "NumberOfFrames" in ds:
        ds.NumberOfFrames = dcm.n_frames
    if lossy:
        ds.LossyImageCompression = "01"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _mark_deidentified(ds: Dataset, masked: bool, top_band: float, kept_private: bool) -> None:
    """Record what was done, as PS3.15 E.1.1 asks."""
    ds.PatientIdentityRemoved = "YES"
    method = [
        f"Basic Application Confidentiality Profile (PS3.15 {load_table().edition})",
        "fetalplanes deidentify",
    ]
    if masked:
        method.append("pixels outside ultrasound regions zeroed")
    if top_band:
        method.append(f"top band {top_band:g} zeroed")
    ds.DeidentificationMethod = method
    codes = []
    for value in ("113100", "113111") if kept_private else ("113100",):
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = value, "DCM"
        code.CodeMeaning = _PROFILE_CODES[value]
        codes.append(code)
    ds.DeidentificationMethodCodeSequence = codes
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    if str(ds.get("BurnedInAnnotation", "")).upper() != "NO":
        ds.BurnedInAnnotation = "YES"


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """Let ``write`` create a temp file beside ``path``, then rename it; no temp is left.

    ``write`` must create the file with mode "x" (so the umask applies and nothing is clobbered).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.part"
    try:
        write(str(tmp))
        if path.exists():
            raise FetalPlanesError(f"{path}: appeared while writing, not overwritten")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
