"""Results as DICOM: a Comprehensive SR of every classified frame and a Key Object Selection
of the best frame of each plane, for one study (highdicom).

A PACS or DICOM viewer cannot show CSV files; it shows these two documents next to the
images they describe. Both go into the same study as the images (same Study Instance UID),
each in a new series of its own, and reference the images by SOP Class/Instance UID and,
for multi-frame images, frame number.

- **SR** (Comprehensive SR, TID 1500 Measurement Report): one TID 1501 measurement group per
  classified frame with the source image reference, the plane as a coded qualitative
  evaluation, the confidence as a numeric measurement (UCUM "1"), the not-target and
  uncertain flags as Yes/No codes, and the model (TID 4019 Algorithm Identification: name,
  version, card summary) in every group; the model is also the device observer.
- **KOS** (Key Object Selection, TID 2010, title "Best In Set"): the best frame of each
  plane (`best_frames`), with a description naming the planes in reference order.

Planes are coded with SNOMED CT where a concept exists (the anatomy the plane images, as
used in DICOM PS3.16 and pydicom's concept dictionary), else with the private coding scheme
`99FETALPLANES`, declared in the documents' Coding Scheme Identification Sequence and
listed in docs/pacs.md. UIDs of the result series and documents are derived from the study,
the model and the classified content, so writing the same results twice gives the same
files (and a PACS sees one document, not two).

The writers take plain inputs (study identity, source instances, predictions, model info)
and compute nothing about the exam themselves, so other callers (an exam checklist) can
feed them.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from fetalplanes._version import __version__
from fetalplanes.inference.results import NOT_TARGET, Prediction

__all__ = [
    "PRIVATE_SCHEME",
    "SNOMED_PLANES",
    "FrameResult",
    "SourceInstance",
    "StudyIdentity",
    "best_frame_results",
    "best_frames",
    "build_kos",
    "build_sr",
    "encode_sr",
    "plane_code",
    "result_uids",
]

PRIVATE_SCHEME = "99FETALPLANES"
"""Designator of the private coding scheme for what SNOMED CT has no concept for."""
MANUFACTURER = "fetalplanes"
SR_SERIES_NUMBER = 9001
KOS_SERIES_NUMBER = 9002
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; deterministic suffixes below

#: Plane -> SNOMED CT concept of the anatomy it shows (codes as in DICOM PS3.16 CID 4).
SNOMED_PLANES: dict[str, tuple[str, str]] = {
    "Fetal abdomen": ("818981001", "Abdomen"),
    "Fetal brain": ("12738006", "Brain"),
    "Fetal femur": ("71341001", "Femur"),
    "Fetal thorax": ("816094009", "Thorax"),
    "Maternal cervix": ("71252005", "Cervix"),
}
#: Plane -> private code value where SNOMED CT has no concept.
PRIVATE_PLANES: dict[str, str] = {
    "Other": "OTHER",
    NOT_TARGET: "NOT_TARGET",
    "Trans-thalamic": "TRANS_THALAMIC",
    "Trans-cerebellum": "TRANS_CEREB",
    "Trans-ventricular": "TRANS_VENTR",
}

# Concept names of the private scheme (docs/pacs.md lists them).
PLANE = Code("PLANE", PRIVATE_SCHEME, "Fetal standard plane")
CONFIDENCE = Code("CONFIDENCE", PRIVATE_SCHEME, "Plane confidence")
IS_NOT_TARGET = Code("NOT_TARGET_FLAG", PRIVATE_SCHEME, "Not a target plane")
IS_UNCERTAIN = Code("UNCERTAIN_FLAG", PRIVATE_SCHEME, "Uncertain classification")
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
NO_UNITS = Code("1", "UCUM", "no units")
OBSTETRIC_US = Code("268445003", "SCT", "Obstetric US scan")
BEST_IN_SET = Code("113013", "DCM", "Best In Set")
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")

#: Patient and study attributes copied from the images into the results (type 2: may be
#: empty). They are kept in memory and in the DICOM files only, never logged.
STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class StudyIdentity:
    """The study the results belong to: its UID and the patient/study module values that
    DICOM requires a result document to repeat (identity: never print it)."""

    study_uid: str
    attributes: Mapping[str, str] = field(default_factory=dict, repr=False)
    character_set: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> StudyIdentity:
        attrs = {k: str(ds.get(k, "") or "") for k in STUDY_KEYWORDS}
        charset = ds.get("SpecificCharacterSet")
        if charset is not None and not isinstance(charset, str):
            charset = "\\".join(charset)
        return cls(str(ds.StudyInstanceUID), attrs, charset or None)


@dataclass(frozen=True)
class SourceInstance:
    """One received image: what a reference to it needs."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    rows: int = 0
    columns: int = 0
    n_frames: int = 1

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SourceInstance:
        return cls(
            str(ds.SOPInstanceUID),
            str(ds.SOPClassUID),
            str(ds.SeriesInstanceUID),
            int(ds.get("Rows", 0) or 0),
            int(ds.get("Columns", 0) or 0),
            int(ds.get("NumberOfFrames", 1) or 1),
        )


@dataclass(frozen=True)
class FrameResult:
    """A prediction for one frame (`prediction.frame`, 0-based; None for a single-frame
    image) of one source instance."""

    instance: SourceInstance
    prediction: Prediction

    @property
    def frame_numbers(self) -> list[int] | None:
        """DICOM's 1-based Referenced Frame Number, only for multi-frame images."""
        frame = self.prediction.frame
        if self.instance.n_frames <= 1 and not frame:
            return None
        return [(frame or 0) + 1]


def best_frames(predictions: Iterable[Prediction]) -> dict[str, Prediction]:
    """Best frame of each plane: the highest confidence among predictions that are
    neither not-target nor uncertain nor failed (ties: the first one)."""
    best: dict[str, Prediction] = {}
    for p in predictions:
        if not p.ok or p.not_target or p.uncertain or p.label == NOT_TARGET:
            continue
        if p.label not in best or p.confidence > best[p.label].confidence:
            best[p.label] = p
    return best


def best_frame_results(results: Sequence[FrameResult]) -> dict[str, FrameResult]:
    """`best_frames` over frame results, keeping each winner's source instance."""
    by_id = {id(r.prediction): r for r in results}
    return {plane: by_id[id(p)] for plane, p in best_frames(r.prediction for r in results).items()}


def plane_code(plane: str) -> Code:
    """The coded concept of a plane: SNOMED CT where one exists, else the private scheme
    (names not listed get a stable private code from their text)."""
    if plane in SNOMED_PLANES:
        value, meaning = SNOMED_PLANES[plane]
        return Code(value, "SCT", meaning)
    value = PRIVATE_PLANES.get(plane)
    if value is None:
        value = re.sub(r"[^A-Z0-9_]", "_", plane.upper())
        if len(value) > 16:  # Code Value is SH: 16 characters at most
            value = "P_" + hashlib.blake2b(plane.encode(), digest_size=7).hexdigest()
    return Code(value, PRIVATE_SCHEME, plane[:64] or "unnamed")


def result_uids(study_uid: str, model: Mapping[str, Any], kind: str,
                content: Iterable[str] = ()) -> tuple[str, str]:
    """(series UID, SOP instance UID) of a result document: the series depends on the
    study, the model and the kind (SR or KO); the instance also on the content, so the
    same results give the same UID and new results a new one."""
    base = [study_uid, str(model.get("name", "")), str(model.get("version", "")), kind]
    series = generate_uid(_UID_ROOT, entropy_srcs=[*base, "series"])
    instance = generate_uid(_UID_ROOT, entropy_srcs=[*base, *content])
    return series, instance


def _coding_schemes() -> list[Any]:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name="fetalplanes plane classification",
            responsible_organization="fetalplanes project (docs/pacs.md)",
        )
    ]


def _evidence(study: StudyIdentity, instances: Iterable[SourceInstance]) -> list[Dataset]:
    """Minimal data sets highdicom takes patient/study data and references from."""
    out: dict[str, Dataset] = {}
    for inst in instances:
        if inst.sop_instance_uid in out:
            continue
        ds = Dataset()
        for keyword in STUDY_KEYWORDS:
            setattr(ds, keyword, study.attributes.get(keyword, "") or None)
        if study.character_set:
            ds.SpecificCharacterSet = study.character_set
        ds.StudyInstanceUID = study.study_uid
        ds.SeriesInstanceUID = inst.series_uid
        ds.SOPInstanceUID = inst.sop_instance_uid
        ds.SOPClassUID = inst.sop_class_uid
        ds.Rows, ds.Columns = inst.rows or 1, inst.columns or 1
        out[inst.sop_instance_uid] = ds
    return list(out.values())


def _device(model: Mapping[str, Any]) -> Any:
    from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext

    name = str(model.get("name", "model"))
    uid = generate_uid(_UID_ROOT, entropy_srcs=["fetalplanes device", name])
    return ObserverContext(
        observer_type=Code("121007", "DCM", "Device"),
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=uid, name=f"fetalplanes {__version__}"[:64], manufacturer_name=MANUFACTURER,
            model_name=name[:64],
        ),
    )


def _algorithm(model: Mapping[str, Any]) -> Any:
    from highdicom.sr import AlgorithmIdentification

    summary = str(model.get("summary", "") or "")
    return AlgorithmIdentification(
        name=str(model.get("name", "model"))[:64],
        version=str(model.get("version", "") or __version__)[:64],
        parameters=[summary] if summary else None,
        manufacturer=MANUFACTURER,
    )


def _yes_no(flag: bool) -> Code:
    return YES if flag else NO


def _group(result: FrameResult, algorithm: Any) -> Any:
    """TID 1501: one frame's plane, confidence and flags, with its source image."""
    from highdicom.sr import (
        Measurement,
        MeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )

    p, inst = result.prediction, result.instance
    frame = "" if p.frame is None else f" frame {p.frame + 1}"
    tracking = TrackingIdentifier(
        uid=generate_uid(_UID_ROOT, entropy_srcs=[inst.sop_instance_uid, str(p.frame)]),
        identifier=f"plane of instance{frame}".strip(),
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        measurements=[
            Measurement(name=CONFIDENCE, value=round(float(p.confidence), 6), unit=NO_UNITS)
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(PLANE, plane_code(p.label)),
            QualitativeEvaluation(IS_NOT_TARGET, _yes_no(p.not_target)),
            QualitativeEvaluation(IS_UNCERTAIN, _yes_no(p.uncertain)),
        ],
        source_images=[
            SourceImageForMeasurementGroup(
                inst.sop_class_uid, inst.sop_instance_uid, result.frame_numbers
            )
        ],
    )


def _content_keys(results: Iterable[FrameResult]) -> list[str]:
    return sorted(
        f"{r.instance.sop_instance_uid}#{r.prediction.frame}:{r.prediction.label}:"
        f"{r.prediction.confidence:.6f}"
        for r in results
    )


def build_sr(
    study: StudyIdentity,
    results: Sequence[FrameResult],
    model: Mapping[str, Any],
    instance_number: int = 1,
    cache: dict[Any, bytes] | None = None,
) -> Dataset:
    """The Comprehensive SR listing every classified frame of ``results`` (failed
    predictions are left out: they have no plane). ``model``: name, version, summary.
    ``cache`` (a dict kept between calls) saves rebuilding frames already reported."""
    sr, groups = _sr_parts(study, results, model, instance_number, cache)
    _measurements(sr)[CONTENT_SEQUENCE] = DataElement(
        CONTENT_SEQUENCE, "SQ", DicomSequence([_decode(g) for g in groups]))
    return sr


def encode_sr(
    study: StudyIdentity,
    results: Sequence[FrameResult],
    model: Mapping[str, Any],
    instance_number: int = 1,
    cache: dict[Any, bytes] | None = None,
) -> tuple[str, bytes]:
    """(SOP Instance UID, DICOM file bytes) of `build_sr`'s document, written fast.

    pydicom re-encodes every element of thousands of groups (a 2,000-frame study: 13 s);
    here the document is written with its first group only, with undefined lengths around
    the Imaging Measurements items, and the other groups' bytes (encoded once, cached) are
    put in after it: the same bytes a full write gives, in a fraction of the time.
    """
    sr, groups = _sr_parts(study, results, model, instance_number, cache)
    root = sr[CONTENT_SEQUENCE]
    container = _measurements(sr)
    marker = _decode(groups[0])
    container[CONTENT_SEQUENCE] = DataElement(CONTENT_SEQUENCE, "SQ", DicomSequence([marker]))
    root.is_undefined_length = True
    container.is_undefined_length_sequence_item = True
    container[CONTENT_SEQUENCE].is_undefined_length = True
    marker.is_undefined_length_sequence_item = True
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    data, one = buf.getvalue(), _item(groups[0])
    if data.count(one) != 1:  # not where expected: write it the slow, plain way
        return str(sr.SOPInstanceUID), _file_bytes(build_sr(study, results, model,
                                                             instance_number, cache))
    return str(sr.SOPInstanceUID), data.replace(one, b"".join(_item(g) for g in groups))


_ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # (FFFE,E000) Item, undefined length
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"  # (FFFE,E00D) Item Delimitation


def _item(group: bytes) -> bytes:
    return _ITEM + group + _ITEM_END


def _file_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _measurements(sr: Dataset) -> Dataset:
    """The "Imaging Measurements" container of a TID 1500 document."""
    return next(item for item in sr.ContentSequence
                if item.ConceptNameCodeSequence[0].CodeValue == IMAGING_MEASUREMENTS)


def _sr_parts(study: StudyIdentity, results: Sequence[FrameResult], model: Mapping[str, Any],
              instance_number: int, cache: dict[Any, bytes] | None
              ) -> tuple[Dataset, list[bytes]]:
    """The document built by highdicom around the first frame's group, and every frame's
    group encoded (built by highdicom too, once per frame when ``cache`` is kept).

    highdicom's checks walk the whole content tree of a document (seconds for a few
    hundred frames) and a growing study gets a new SR whenever new instances are
    classified, so the groups are added to the Imaging Measurements container afterwards,
    as `MeasurementReport` itself adds them.
    """
    from highdicom.sr import ComprehensiveSR, MeasurementReport, ObservationContext

    done = [r for r in results if r.prediction.ok]
    if not done:
        raise ValueError("no classified frame to report")
    algorithm = _algorithm(model)
    groups = [_cached_group(r, algorithm, model, cache) for r in done]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=_device(model)),
        procedure_reported=OBSTETRIC_US,
        imaging_measurements=[_group(done[0], algorithm)],
        title=IMAGING_MEASUREMENT_REPORT,
    )
    series, sop = result_uids(study.study_uid, model, "SR", _content_keys(done))
    sr = ComprehensiveSR(
        evidence=_evidence(study, [r.instance for r in done]),
        content=report[0],
        series_instance_uid=series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        series_description=f"fetalplanes planes ({model.get('name', 'model')})"[:64],
        coding_schemes=_coding_schemes(),
        software_versions=f"fetalplanes {__version__}",
    )
    return sr, groups


IMAGING_MEASUREMENTS = "126010"  # DCM code of TID 1500's "Imaging Measurements" container
CONTENT_SEQUENCE = 0x0040A730


def _cached_group(result: FrameResult, algorithm: Any, model: Mapping[str, Any],
                  cache: dict[Any, bytes] | None) -> bytes:
    """One frame's measurement group (its CONTAINER item) encoded; from the cache when
    there (~2 KB a frame, against ~37 KB as highdicom objects)."""
    p = result.prediction
    key = (result.instance.sop_instance_uid, p.frame, p.label, round(p.confidence, 6),
           p.not_target, p.uncertain, model.get("name"), model.get("version"))
    data = None if cache is None else cache.get(key)
    if data is None:
        (item,) = _group(result, algorithm)
        data = _encode(item)
        if cache is not None:
            cache[key] = data
    return data


def _encode(item: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, item)
    return buf.getvalue()


def _decode(data: bytes) -> Dataset:
    from pydicom.filereader import read_dataset

    return read_dataset(io.BytesIO(data), is_implicit_VR=False, is_little_endian=True)


def build_kos(
    study: StudyIdentity,
    best: Mapping[str, FrameResult],
    model: Mapping[str, Any],
    instance_number: int = 1,
) -> Dataset:
    """Key Object Selection ("Best In Set") of the best frame of each plane, one image
    reference per plane, with its frame number for multi-frame images."""
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument

    if not best:
        raise ValueError("no best frame to select")
    planes = sorted(best)
    chosen = [best[plane] for plane in planes]
    refs = _evidence(study, [r.instance for r in chosen])
    by_uid = {ds.SOPInstanceUID: ds for ds in refs}
    description = (
        f"Best frame of each plane by {model.get('name', 'model')}: " + "; ".join(planes)
    )
    content = KeyObjectSelection(
        document_title=BEST_IN_SET,
        referenced_objects=[by_uid[r.instance.sop_instance_uid] for r in chosen],
        observer_device_context=_device(model),
        description=description[:1024],
    )
    images = [i for i in content[0].ContentSequence if i.ValueType == "IMAGE"]
    for item, result in zip(images, chosen, strict=True):
        if result.frame_numbers:
            item.ReferencedSOPSequence[0].ReferencedFrameNumber = result.frame_numbers
    keys = [f"{p}={r.instance.sop_instance_uid}#{r.prediction.frame}" for p, r in best.items()]
    series, sop = result_uids(study.study_uid, model, "KO", sorted(keys))
    return KeyObjectSelectionDocument(
        evidence=refs,
        content=content,
        series_instance_uid=series,
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=sop,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        series_description=f"fetalplanes best frames ({model.get('name', 'model')})"[:64],
    )
