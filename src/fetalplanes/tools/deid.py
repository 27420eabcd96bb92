"""De-identify ultrasound DICOM files before they leave the hospital (a file or a folder tree).

What it does, and why:

- Header: the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile, as the
  action table ``ACTIONS`` below (D = replace with a dummy, Z = empty, X = remove, U = new UID)
  plus rules that cover what a table cannot list: every private tag, curve (50xx) and overlay
  (60xx) group and unknown public tag is removed (overlays can hold burned text); every other
  person name, date, time and date-time is removed; every instance UID (any UI value outside
  the DICOM root 1.2.840.10008 that is not a SOP class) gets a new UID. The same old UID gets
  the same new UID in every file of one run, so studies and series stay together and
  references stay valid. The old -> new map is written only when asked (``uid_map``): it
  re-identifies the data and must be kept like patient data.
- Pixels: scanners burn names, IDs and dates into the screen around the image. Everything
  outside the declared ultrasound regions (the union of their boxes) is zeroed, and
  ``top_band`` zeroes a band at the top where many scanners print the patient name, on every
  frame. Text burned inside a region box (measurements, annotations, sometimes a name) cannot
  be found this way, so BurnedInAnnotation stays "YES" unless the scanner itself declared "NO".
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
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fetalplanes.data.dicom import DicomFile, is_dicom, open_dicom, read_header
from fetalplanes.errors import FetalPlanesError

__all__ = ["ACTIONS", "DeidReport", "deidentify"]

_X = "X"  # remove
_Z = "Z"  # keep the attribute, empty its value
_D = "D"  # replace with a dummy value
_U = "U"  # replace the UID, consistently within one run

# PS3.15 Table E.1-1, Basic Profile column, for the attributes ultrasound files carry. Where
# the profile allows a choice (X/Z/D), the strictest value the IOD still accepts is used.
# fmt: off
_ZERO = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime", "ContentDate", "ContentTime",
    "ContentCreatorName", "VerifyingObserverIdentificationCodeSequence",
)
_DUMMIED = (
    "VerifyingObserverName", "PersonName",
)
_REMOVED = (
    "IssuerOfPatientID", "PatientBirthTime", "PatientInsurancePlanCodeSequence", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientBirthName", "PatientAge", "PatientSize",
    "PatientWeight", "PatientAddress", "PatientMotherBirthName", "MilitaryRank", "BranchOfService",
    "MedicalRecordLocator", "MedicalAlerts", "Allergies", "CountryOfResidence", "RegionOfResidence",
    "PatientTelephoneNumbers", "PatientTelecomInformation", "EthnicGroup", "Occupation",
    "SmokingStatus", "AdditionalPatientHistory", "PregnancyStatus", "LastMenstrualDate",
    "PatientReligiousPreference", "PatientComments", "PatientState", "SpecialNeeds",
    "PreMedication", "PatientTransportArrangements", "ReferencedPatientSequence",
    "ReferencedPatientPhotoSequence", "ReferencedPatientAliasSequence",
    "PatientPrimaryLanguageCodeSequence", "ResponsiblePerson", "ResponsibleOrganization",
    "AdmissionID", "IssuerOfAdmissionIDSequence", "CurrentPatientLocation",
    "PatientInstitutionResidence", "VisitComments", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "ReasonForStudy",
    "RequestingPhysician", "RequestingPhysicianIdentificationSequence", "RequestingService",
    "RequestedProcedureDescription", "RequestedProcedureID", "RequestedProcedureComments",
    "RequestedProcedureLocation", "ReasonForTheRequestedProcedure", "RequestAttributesSequence",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "ImagingServiceRequestComments", "OrderEnteredBy", "OrderEntererLocation",
    "OrderCallbackPhoneNumber", "NamesOfIntendedRecipientsOfResults",
    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID", "ScheduledStationName", "ScheduledProcedureStepLocation",
    "PerformedStationAETitle", "PerformedStationName", "PerformedLocation",
    "PerformedProcedureStepID", "PerformedProcedureStepDescription", "ReferencedStudySequence",
    "ReferencedPerformedProcedureStepSequence", "StudyComments", "InstitutionName",
    "InstitutionAddress", "InstitutionCodeSequence", "InstitutionalDepartmentName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "OperatorsName",
    "OperatorIdentificationSequence", "HumanPerformerName", "VerifyingOrganization",
    "ParticipantSequence", "CustodialOrganizationSequence", "AuthorObserverSequence",
    "ContentCreatorIdentificationCodeSequence", "StationName", "DeviceSerialNumber", "ProtocolName",
    "StudyDescription", "SeriesDescription", "IdentifyingComments", "ImageComments",
    "FrameComments", "AcquisitionComments", "TextComments", "DerivationDescription",
    "AcquisitionDeviceProcessingDescription", "ContributionDescription", "TimezoneOffsetFromUTC",
    "ContentSequence", "GraphicAnnotationSequence", "IconImageSequence",
    "OriginalAttributesSequence", "ModifiedAttributesSequence", "DigitalSignaturesSequence",
    "MACParametersSequence", "EncryptedAttributesSequence",
)
# fmt: on
ACTIONS: dict[str, str] = {
    **dict.fromkeys(_ZERO, _Z),
    **dict.fromkeys(_DUMMIED, _D),
    **dict.fromkeys(_REMOVED, _X),
}
"""Keyword -> action; attributes not listed follow the rules in the module docstring."""
_DUMMY = {"PN": "ANONYMIZED", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "CS": "ANONYMIZED"}
_TEMPORAL_VRS = ("DA", "DT", "TM")
_DICOM_ROOT = "1.2.840.10008."
_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
_ENCAPSULATION_KEYWORDS = ("ExtendedOffsetTable", "ExtendedOffsetTableLengths")
_LOSSLESS = {  # compressed syntaxes that keep every value
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.5",
}


@dataclass
class DeidReport:
    """What one run did; every message is one line naming its file."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unmasked: list[Path] = field(default_factory=list)
    not_dicom: int = 0

    def summary(self) -> str:
        """One line for the command line."""
        return (
            f"{len(self.written)} written, {len(self.skipped)} skipped (exist), "
            f"{len(self.failed)} failed, {self.not_dicom} not DICOM; "
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
    ``rename``, when ``dst`` is not empty. Bad files are reported and the run goes on.
    """
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    map_path = Path(uid_map).resolve() if uid_map is not None else None
    _check_paths(src_path, dst_path, map_path, rename)
    report, uids = DeidReport(), _UidMap()
    for path, rel in _inputs(src_path, report):
        out = None if rename else dst_path / rel
        if out is not None and out.exists():
            report.skipped.append(f"{out}: exists, not overwritten")
            continue
        try:
            written, masked = _deidentify_file(
                path, out, dst_path, uids, mask_outside_regions, top_band
            )
        except FetalPlanesError as exc:
            report.failed.append(str(exc))
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
    if map_path is not None:
        uids.write_csv(map_path)
    return report


def _check_paths(src: Path, dst: Path, uid_map: Path | None, rename: bool) -> None:
    if not src.exists():
        raise FetalPlanesError(f"{src}: no such file or folder")
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


def _inputs(src: Path, report: DeidReport) -> Iterator[tuple[Path, Path]]:
    """(file, path relative to the output folder) for every DICOM file under ``src``."""
    if src.is_file():
        yield src, Path(src.name)
        return
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        try:
            with path.open("rb") as f:
                head = f.read(4096)
        except OSError as exc:
            report.failed.append(f"{path}: cannot read ({exc.strerror or exc})")
            continue
        if is_dicom(head, path.name):
            yield path, path.relative_to(src)
        else:
            report.not_dicom += 1


def _deidentify_file(
    path: Path, out: Path | None, dst: Path, uids: _UidMap, mask_regions: bool, top_band: float
) -> tuple[Path | None, bool]:
    """Write one de-identified file; return (its path or None if it exists, region-masked)."""
    dcm = open_dicom(path)
    ds = read_header(path)
    lossy = _is_lossy(ds)
    _apply_profile(ds, uids)
    out = out or dst / f"{ds.SOPInstanceUID}.dcm"
    if out.exists():
        return None, False
    keep = _keep_mask(dcm, mask_regions, top_band)
    masked = mask_regions and bool(dcm.regions)
    _set_pixel_module(ds, dcm, lossy)
    _mark_deidentified(ds, masked, top_band)
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


def _apply_profile(ds: Dataset, uids: _UidMap) -> None:
    """Apply the Basic Profile actions to ``ds`` and every nested sequence item."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        action = _action(elem.tag, elem.keyword, elem.VR)
        if action == _X:
            del ds[tag]
        elif action == _Z:
            elem.value = [] if elem.VR == "SQ" else ""
        elif action == _D:
            elem.value = _DUMMY.get(elem.VR, "")
        elif action == _U and elem.value:
            values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            new = [v if str(v).startswith(_DICOM_ROOT) else uids(str(v)) for v in values]
            elem.value = new if len(new) > 1 else new[0]
        if tag in ds and ds[tag].VR == "SQ":
            for item in ds[tag].value:
                _apply_profile(item, uids)


def _action(tag: int, keyword: str, vr: str) -> str | None:
    """The profile action for one attribute; None keeps it."""
    group = tag >> 16
    if group % 2 or group >> 8 in (0x50, 0x60) or not keyword:
        return _X  # private, curve, overlay or unknown public attribute
    if keyword in ACTIONS:
        return ACTIONS[keyword]
    if vr == "PN" or vr in _TEMPORAL_VRS:
        return _X
    if vr == "UI" and not keyword.endswith("ClassUID") and keyword != "TransferSyntaxUID":
        return _U
    return None


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


def _mark_deidentified(ds: Dataset, masked: bool, top_band: float) -> None:
    """Record what was done, as PS3.15 E.1.1 asks."""
    ds.PatientIdentityRemoved = "YES"
    method = ["Basic Application Confidentiality Profile", "fetalplanes deidentify"]
    if masked:
        method.append("pixels outside ultrasound regions zeroed")
    if top_band:
        method.append(f"top band {top_band:g} zeroed")
    ds.DeidentificationMethod = method
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = [code]
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
