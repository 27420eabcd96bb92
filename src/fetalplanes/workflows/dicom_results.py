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
- **Exam checklist** (optional, `checklist_result`: the same engine as `fetalplanes
  audit`, each frame one observation): the SR gains a CONTAINER "Exam checklist" (per
  required item its coded view, status present / missing / not assessed by this model,
  best frame as an IMAGE reference and its confidence) and the KOS selects the best frame
  of each present checklist view, its description naming the missing ones.

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
from fetalplanes.workflows.checklist import (
    MISSING,
    NOT_ASSESSED,
    NOT_ASSESSED_TEXT,
    PRESENT,
    Checklist,
    ChecklistItem,
    ChecklistResult,
    ItemResult,
    evaluate_checklist,
    frame_observation,
)

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
    "checklist_best",
    "checklist_result",
    "encode_sr",
    "item_code",
    "plane_code",
    "result_uids",
    "warm_up",
]

PRIVATE_SCHEME = "99FETALPLANES"
"""Designator of the private coding scheme for what SNOMED CT has no concept for."""
MANUFACTURER = "fetalplanes"
SR_SERIES_NUMBER = 9001
KOS_SERIES_NUMBER = 9002
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; deterministic suffixes below

#: Plane or view -> SNOMED CT concept of the anatomy it shows, where that anatomy is its own
#: (no other class of its preset has it as its subject); codes and meanings as in DICOM
#: PS3.16 (CID 4 and related groups, pydicom's concept dictionary).
SNOMED_PLANES: dict[str, tuple[str, str]] = {
    "Fetal abdomen": ("818981001", "Abdomen"),
    "Fetal brain": ("12738006", "Brain"),
    "Fetal femur": ("71341001", "Femur"),
    "Fetal thorax": ("816094009", "Thorax"),
    "Maternal cervix": ("71252005", "Cervix"),
    # views13 (the 13 standard views of SonoNet-16)
    "Lips (coronal)": ("48477009", "Lip"),
    "Left ventricular outflow tract": ("13418002", "Left ventricle outflow tract"),
    "Right ventricular outflow tract": ("44627009", "Right ventricle outflow tract"),
    "Abdominal circumference plane": ("818981001", "Abdomen"),
    "Kidneys": ("64033007", "Kidney"),
    "Femur length plane": ("71341001", "Femur"),
}
#: Plane or view -> private code value where SNOMED CT has no concept for it (a view
#: whose anatomy other views of its preset share is a view, not an organ).
PRIVATE_PLANES: dict[str, str] = {
    "Other": "OTHER",
    NOT_TARGET: "NOT_TARGET",
    "Trans-thalamic": "TRANS_THALAMIC",
    "Trans-cerebellum": "TRANS_CEREB",
    "Trans-ventricular": "TRANS_VENTR",
    # views13
    "Trans-ventricular plane": "TRANS_VENTR",
    "Trans-cerebellar plane": "TRANS_CEREB",
    "Facial profile (mid-sagittal)": "FACIAL_PROFILE",
    "Spine (sagittal)": "SPINE_SAGITTAL",
    "Spine (coronal)": "SPINE_CORONAL",
    "Four-chamber view": "FOUR_CHAMBER",
    "Three-vessel view": "THREE_VESSEL",
}
#: Checklist items that name no model view (none can show them), by (checklist, item id):
#: SNOMED CT (code, meaning) of their anatomy, or a private code value (a 1-tuple).
#: Items naming one view take that view's code; other items a private code from their id.
CHECKLIST_ITEM_CODES: dict[tuple[str, str], tuple[str, ...]] = {
    ("isuog-mid-trimester", "head-transthalamic"): ("TRANS_THALAMIC",),
    ("isuog-mid-trimester", "face-orbits"): ("363654007", "Orbit"),
    ("isuog-mid-trimester", "neck"): ("45048000", "Neck"),
    ("isuog-mid-trimester", "chest-lungs"): ("816094009", "Thorax"),
    ("isuog-mid-trimester", "abdomen-bladder"): ("89837001", "Bladder"),
    ("isuog-mid-trimester", "abdomen-cord-insertion"): ("CORD_INSERTION",),
    ("isuog-mid-trimester", "cord-vessels"): ("29870000", "Umbilical cord"),
    ("isuog-mid-trimester", "spine-transverse"): ("SPINE_TRANSVERSE",),
    ("isuog-mid-trimester", "limbs-arms"): ("53120007", "Upper limb"),
    ("isuog-mid-trimester", "limbs-legs"): ("61685007", "Lower limb"),
    ("isuog-mid-trimester", "placenta"): ("78067005", "Placenta"),
    ("isuog-mid-trimester", "amniotic-fluid"): ("77012006", "Amniotic fluid"),
    ("isuog-mid-trimester", "cardiac-activity"): ("CARDIAC_ACTIVITY",),
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
# The exam checklist section of the SR (private scheme; docs/pacs.md lists them).
EXAM_CHECKLIST = Code("CHECKLIST", PRIVATE_SCHEME, "Exam checklist")
CHECKLIST_NAME = Code("CHECKLIST_NAME", PRIVATE_SCHEME, "Checklist")
MISSING_VIEWS = Code("MISSING_VIEWS", PRIVATE_SCHEME, "Missing views")
UNASSESSED_ITEMS = Code("UNASSESSED_ITEMS", PRIVATE_SCHEME, "Not assessed by this model")
CHECKLIST_ITEM = Code("CHECKLIST_ITEM", PRIVATE_SCHEME, "Checklist item")
CHECKLIST_VIEW = Code("CHECKLIST_VIEW", PRIVATE_SCHEME, "Checklist view")
ITEM_NAME = Code("ITEM_NAME", PRIVATE_SCHEME, "Checklist item name")
VIEW_STATUS = Code("VIEW_STATUS", PRIVATE_SCHEME, "View status")
BEST_FRAME = Code("BEST_FRAME", PRIVATE_SCHEME, "Best frame")
VIEW_FRAMES = Code("VIEW_FRAMES", PRIVATE_SCHEME, "Frames showing the view")
FRAMES_UNIT = Code("{frames}", "UCUM", "frames")
#: checklist status -> its code (private: SNOMED CT's Present/Absent would read as a
#: finding about the fetus, "kidney absent", where only the image is missing).
STATUS_CODES: dict[str, Code] = {
    PRESENT: Code("PRESENT", PRIVATE_SCHEME, "Present in the study"),
    MISSING: Code("MISSING", PRIVATE_SCHEME, "Missing from the study"),
    NOT_ASSESSED: Code("NOT_ASSESSED", PRIVATE_SCHEME, NOT_ASSESSED_TEXT.capitalize()),
}

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
    value = PRIVATE_PLANES.get(plane) or _private(plane)
    return Code(value, PRIVATE_SCHEME, plane[:64] or "unnamed")


def _private(text: str) -> str:
    """A private code value from a name: capitals, non-alphanumerics as `_`, or `P_` + a
    hash when over 16 characters (Code Value is SH)."""
    value = re.sub(r"[^A-Z0-9_]", "_", text.upper())
    if len(value) > 16:
        value = "P_" + hashlib.blake2b(text.encode(), digest_size=7).hexdigest()
    return value


def item_code(checklist: str, item: ChecklistItem) -> Code:
    """The coded concept of a checklist item: its view's code when it names one view
    (the same code the frames' planes get), the table's code for the shipped items that
    name none, else a private code from its id (meaning: its name)."""
    if len(item.views) == 1:
        return plane_code(item.views[0])
    known = CHECKLIST_ITEM_CODES.get((checklist, item.id))
    if known is not None and len(known) == 2:
        return Code(known[0], "SCT", known[1])
    value = known[0] if known else _private(item.id)
    return Code(value, PRIVATE_SCHEME, item.name[:64])


def checklist_result(checklist: Checklist, results: Sequence[FrameResult],
                     model_views: Sequence[str]) -> ChecklistResult:
    """The checklist filled from a study's classified frames: each frame one observation
    (`checklist.frame_observation`: as `fetalplanes audit` takes a still image; no
    smoothing), its source the SOP Instance UID, in (instance, frame) order so the
    result does not depend on the order instances arrived in."""
    ordered = sorted(results, key=lambda r: (r.instance.sop_instance_uid,
                                             r.prediction.frame or 0))
    observations = (frame_observation(r.instance.sop_instance_uid, r.prediction)
                    for r in ordered)
    return evaluate_checklist(checklist, (o for o in observations if o is not None),
                              model_views)


def checklist_best(result: ChecklistResult, results: Sequence[FrameResult]
                   ) -> dict[str, FrameResult]:
    """item id -> the frame result of its best frame (present items whose best frame is
    one of `results`), in checklist order."""
    by_key = {(r.instance.sop_instance_uid, r.prediction.frame): r for r in results}
    out: dict[str, FrameResult] = {}
    for r in result.items:
        if r.best is not None and (r.best.source, r.best.frame) in by_key:
            out[r.item.id] = by_key[(r.best.source, r.best.frame)]
    return out


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
    checklist: ChecklistResult | None = None,
) -> Dataset:
    """The Comprehensive SR listing every classified frame of ``results`` (failed
    predictions are left out: they have no plane). ``model``: name, version, summary.
    ``cache`` (a dict kept between calls) saves rebuilding frames already reported.
    ``checklist`` (`checklist_result` of the same results) adds the "Exam checklist"."""
    sr, groups = _sr_parts(study, results, model, instance_number, cache, checklist)
    _measurements(sr)[CONTENT_SEQUENCE] = DataElement(
        CONTENT_SEQUENCE, "SQ", DicomSequence([_decode(g) for g in groups]))
    return sr


def encode_sr(
    study: StudyIdentity,
    results: Sequence[FrameResult],
    model: Mapping[str, Any],
    instance_number: int = 1,
    cache: dict[Any, bytes] | None = None,
    checklist: ChecklistResult | None = None,
) -> tuple[str, bytes]:
    """(SOP Instance UID, DICOM file bytes) of `build_sr`'s document, written fast.

    pydicom re-encodes every element of thousands of groups (a 2,000-frame study: 13 s);
    here the document is written with its first group only, with undefined lengths around
    the Imaging Measurements items, and the other groups' bytes (encoded once, cached) are
    put in after it: the same bytes a full write gives, in a fraction of the time.
    """
    sr, groups = _sr_parts(study, results, model, instance_number, cache, checklist)
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
                                                             instance_number, cache, checklist))
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
              instance_number: int, cache: dict[Any, bytes] | None,
              checklist: ChecklistResult | None = None) -> tuple[Dataset, list[bytes]]:
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
    keys = _content_keys(done) + _checklist_keys(checklist)
    series, sop = result_uids(study.study_uid, model, "SR", keys)
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
    if checklist is not None:  # after Imaging Measurements, a section of its own
        sr.ContentSequence.append(_checklist_container(checklist, done))
    return sr, groups


def _checklist_keys(checklist: ChecklistResult | None) -> list[str]:
    """What of a checklist changes the SR's content (its UID)."""
    if checklist is None:
        return []
    return [f"checklist:{checklist.checklist.name}"] + [
        f"{r.item.id}={r.status}" for r in checklist.items if r.item.required]


def _checklist_container(checklist: ChecklistResult, results: Sequence[FrameResult]) -> Any:
    """CONTAINER "Exam checklist": the checklist's name, the missing and not-assessed
    views as text, and per required item a CONTAINER with its coded view, its name, its
    status and, when present, its best frame (IMAGE, with the frame number of a
    multi-frame image), that frame's confidence and how many frames showed it."""
    from highdicom.sr import ContainerContentItem, ContentSequence, TextContentItem

    c = checklist.checklist
    container = ContainerContentItem(EXAM_CHECKLIST, relationship_type="CONTAINS")
    items: list[Any] = [
        TextContentItem(CHECKLIST_NAME, f"{c.name}: {c.title}"[:1024], "CONTAINS"),
        TextContentItem(MISSING_VIEWS, "; ".join(checklist.missing) or "none", "CONTAINS"),
        TextContentItem(UNASSESSED_ITEMS, "; ".join(checklist.not_assessed) or "none",
                        "CONTAINS"),
    ]
    best = checklist_best(checklist, results)
    items += [_checklist_item(c.name, r, best.get(r.item.id))
              for r in checklist.items if r.item.required]
    container.ContentSequence = ContentSequence(items, is_root=False)
    return container


def _checklist_item(checklist: str, r: ItemResult, best: FrameResult | None) -> Any:
    from highdicom.sr import (
        CodeContentItem,
        ContainerContentItem,
        ContentSequence,
        ImageContentItem,
        NumContentItem,
        TextContentItem,
    )

    item = ContainerContentItem(CHECKLIST_ITEM, relationship_type="CONTAINS")
    content: list[Any] = [
        CodeContentItem(CHECKLIST_VIEW, item_code(checklist, r.item), "CONTAINS"),
        TextContentItem(ITEM_NAME, r.item.name[:1024], "CONTAINS"),
        CodeContentItem(VIEW_STATUS, STATUS_CODES[r.status], "CONTAINS"),
    ]
    if r.status == PRESENT and r.best is not None and best is not None:
        inst = best.instance
        content += [
            ImageContentItem(BEST_FRAME, inst.sop_class_uid, inst.sop_instance_uid,
                             referenced_frame_numbers=best.frame_numbers,
                             relationship_type="CONTAINS"),
            NumContentItem(CONFIDENCE, round(float(r.best.confidence), 6), NO_UNITS,
                           relationship_type="CONTAINS"),
            NumContentItem(VIEW_FRAMES, r.frames, FRAMES_UNIT, relationship_type="CONTAINS"),
        ]
    item.ContentSequence = ContentSequence(content, is_root=False)
    return item


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


def warm_up(model: Mapping[str, Any]) -> None:
    """Build (and drop) an SR and a KOS of one made-up frame: highdicom's first document
    loads its IOD tables (~0.5 s of a core); a node does that before it listens, not
    while it owes a sonographer the first study's results."""
    from pydicom.uid import UltrasoundImageStorage

    frame = FrameResult(
        SourceInstance(generate_uid(), UltrasoundImageStorage, generate_uid(), 1, 1, 1),
        Prediction("warm-up", label="warm-up", confidence=1.0, probs={"warm-up": 1.0}))
    study = StudyIdentity(generate_uid())
    encode_sr(study, [frame], model)
    build_kos(study, best_frame_results([frame]), model)


def _decode(data: bytes) -> Dataset:
    from pydicom.filereader import read_dataset

    return read_dataset(io.BytesIO(data), is_implicit_VR=False, is_little_endian=True)


def build_kos(
    study: StudyIdentity,
    best: Mapping[str, FrameResult],
    model: Mapping[str, Any],
    instance_number: int = 1,
    checklist: ChecklistResult | None = None,
    results: Sequence[FrameResult] = (),
) -> Dataset:
    """Key Object Selection ("Best In Set") of the best frame of each plane, one image
    reference per plane, with its frame number for multi-frame images.

    With ``checklist`` (`checklist_result` of the study's frame ``results``) it selects
    the best frame of each present checklist view instead (`best` is then used only when
    none is present) and its description names the missing views."""
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument

    chosen, names, of_checklist = _kos_selection(best, checklist, results)
    if not chosen:
        raise ValueError("no best frame to select")
    refs = _evidence(study, [r.instance for r in chosen])
    by_uid = {ds.SOPInstanceUID: ds for ds in refs}
    description = _kos_description(model, names, checklist if of_checklist else None)
    if checklist is not None and not of_checklist:
        description = f"No view of checklist {checklist.checklist.name} present. " + \
            description + f". Missing: {'; '.join(checklist.missing) or 'none'}."
    content = KeyObjectSelection(
        document_title=BEST_IN_SET,
        referenced_objects=[by_uid[r.instance.sop_instance_uid] for r in chosen],
        observer_device_context=_device(model),
        description=_clip(description, 1024),
    )
    images = [i for i in content[0].ContentSequence if i.ValueType == "IMAGE"]
    for item, result in zip(images, chosen, strict=True):
        if result.frame_numbers:
            item.ReferencedSOPSequence[0].ReferencedFrameNumber = result.frame_numbers
    keys = [f"{p}={r.instance.sop_instance_uid}#{r.prediction.frame}"
            for p, r in zip(names, chosen, strict=True)]
    series, sop = result_uids(study.study_uid, model, "KO",
                              sorted(keys) + _checklist_keys(checklist))
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


def _kos_selection(best: Mapping[str, FrameResult], checklist: ChecklistResult | None,
                   results: Sequence[FrameResult]
                   ) -> tuple[list[FrameResult], list[str], bool]:
    """The frames a KOS references, what each shows and whether they are the checklist's:
    the best frame of each present checklist view (checklist order; a frame that is the
    best of several views is referenced once, naming them all), else of each plane."""
    picked: dict[tuple[str, int | None], tuple[FrameResult, list[str]]] = {}
    if checklist is not None:
        by_item = checklist_best(checklist, list(results) or list(best.values()))
        names = {r.item.id: r.item.name for r in checklist.items}
        for item_id, fr in by_item.items():
            key = (fr.instance.sop_instance_uid, fr.prediction.frame)
            frame, shown = picked.get(key, (fr, []))
            picked[key] = (frame, [*shown, names[item_id]])
    of_checklist = bool(picked)
    if not picked:
        for plane in sorted(best):
            fr = best[plane]
            picked.setdefault((fr.instance.sop_instance_uid, fr.prediction.frame),
                              (fr, []))[1].append(plane)
    return ([fr for fr, _ in picked.values()], [" / ".join(n) for _, n in picked.values()],
            of_checklist)


def _kos_description(model: Mapping[str, Any], names: Sequence[str],
                     checklist: ChecklistResult | None) -> str:
    """The Key Object Description: what the references show, in reference order, and with
    a checklist which required views are missing and how many it cannot assess."""
    by = model.get("name", "model")
    if checklist is None:
        return f"Best frame of each plane by {by}: " + "; ".join(names)
    c = checklist
    text = (f"Best frame of each view of checklist {c.checklist.name} by {by}: "
            + "; ".join(names) + f". Missing: {'; '.join(c.missing) or 'none'}.")
    if c.not_assessed:
        text += f" Not assessed by this model: {len(c.not_assessed)} item(s)."
    return text


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
