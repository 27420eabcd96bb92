"""SR and KOS results: structure read back with pydicom, and a second implementation
(dcmtk dsrdump, dicom3tools dciodvfy) reading and validating both documents."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("highdicom")
from dicomfiles import IDENTIFIERS, real_frames, write_dicom
from dicomtools import dciodvfy, dsrdump
from pydicom import dcmread

from fetalplanes.inference.results import Prediction, failed
from fetalplanes.workflows.dicom_results import (
    PRIVATE_SCHEME,
    FrameResult,
    SourceInstance,
    StudyIdentity,
    best_frame_results,
    best_frames,
    build_kos,
    build_sr,
    encode_sr,
    plane_code,
)

MODEL = {"name": "sononet16", "version": "0.2.0",
         "summary": "SonoNet-16 (zero-shot, folded to seed4), temperature 1.0"}


def pred(label: str, conf: float, frame: int | None = None, **kw) -> Prediction:
    return Prediction(f"x#frame={frame}", label=label, confidence=conf, probs={label: conf},
                      frame=frame, **kw)


def test_best_frames_skips_flagged_and_failed_and_keeps_the_highest():
    preds = [
        pred("Fetal brain", 0.7, 0),
        pred("Fetal brain", 0.9, 1),
        pred("Fetal brain", 0.99, 2, uncertain=True),
        pred("not_target", 0.99, 3, not_target=True),
        pred("Fetal femur", 0.6, 4),
        pred("Fetal femur", 0.95, 5, not_target=True),
        failed("y.dcm", "broken"),
    ]
    best = best_frames(preds)
    assert set(best) == {"Fetal brain", "Fetal femur"}
    assert best["Fetal brain"] is preds[1] and best["Fetal femur"] is preds[4]
    assert best_frames([]) == {}


def test_plane_codes_snomed_where_known_else_private():
    assert (plane_code("Fetal brain").value, plane_code("Fetal brain").scheme_designator) == (
        "12738006", "SCT")
    assert plane_code("Fetal femur").value == "71341001"
    other = plane_code("Trans-thalamic")
    assert other.scheme_designator == PRIVATE_SCHEME and other.value == "TRANS_THALAMIC"
    long = plane_code("A very long custom plane name")
    assert long.scheme_designator == PRIVATE_SCHEME and len(long.value) <= 16
    assert plane_code("A very long custom plane name") == long  # stable


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A study of one single-frame and one 3-frame ultrasound image from real frames."""
    folder = tmp_path_factory.mktemp("study")
    frames = real_frames("sononet", 3, scale=4)
    one = write_dicom(folder / "one.dcm", frames[:1])
    uid = dcmread(one).StudyInstanceUID
    cine = write_dicom(folder / "cine.dcm", frames, study_uid=uid, transfer_syntax="rle")
    return folder, [one, cine]


def results_for(paths: list[Path]) -> tuple[StudyIdentity, list[FrameResult]]:
    ds1, ds2 = (dcmread(p, stop_before_pixels=True) for p in paths)
    single, cine = SourceInstance.from_dataset(ds1), SourceInstance.from_dataset(ds2)
    results = [
        FrameResult(single, pred("Fetal brain", 0.91)),
        FrameResult(cine, pred("Fetal femur", 0.62, 0)),
        FrameResult(cine, pred("Fetal femur", 0.83, 1)),
        FrameResult(cine, pred("not_target", 0.7, 2, not_target=True)),
        FrameResult(cine, failed("cine.dcm#frame=9", "cannot decode")),
    ]
    return StudyIdentity.from_dataset(ds1), results


def test_sr_and_kos_reference_the_study_and_frames(study, tmp_path: Path):
    _, paths = study
    identity, results = results_for(paths)
    source = [dcmread(p, stop_before_pixels=True) for p in paths]
    sr = build_sr(identity, results, MODEL)
    kos = build_kos(identity, best_frame_results(results), MODEL)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    kos.save_as(tmp_path / "kos.dcm", enforce_file_format=True)
    sr, kos = dcmread(tmp_path / "sr.dcm"), dcmread(tmp_path / "kos.dcm")
    assert sr.Modality == "SR" and kos.Modality == "KO"
    for doc in (sr, kos):  # same study and patient, new series
        assert doc.StudyInstanceUID == source[0].StudyInstanceUID
        assert doc.PatientID == source[0].PatientID
        assert doc.SeriesInstanceUID not in {s.SeriesInstanceUID for s in source}
    assert sr.SeriesInstanceUID != kos.SeriesInstanceUID
    evidence = {
        item.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {s.SOPInstanceUID for s in source}
    groups = sr.ContentSequence[-1].ContentSequence  # Imaging Measurements container
    assert len(groups) == 4  # the failed frame has no plane: not reported
    refs = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    got = {(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
            r.ReferencedSOPSequence[0].get("ReferencedFrameNumber")) for r in refs}
    assert got == {(source[0].SOPInstanceUID, None), (source[1].SOPInstanceUID, 2)}


def test_same_results_same_uids_new_results_new_uid(study):
    _, paths = study
    identity, results = results_for(paths)
    a, b = build_sr(identity, results, MODEL), build_sr(identity, results, MODEL)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    c = build_sr(identity, results[:2], MODEL)
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID == a.SeriesInstanceUID


def test_dcmtk_and_dicom3tools_read_and_validate_both(study, tmp_path: Path):
    _, paths = study
    identity, results = results_for(paths)
    sr_path, kos_path = tmp_path / "sr.dcm", tmp_path / "kos.dcm"
    build_sr(identity, results, MODEL).save_as(sr_path, enforce_file_format=True)
    build_kos(identity, best_frame_results(results), MODEL).save_as(
        kos_path, enforce_file_format=True)
    text = dsrdump(sr_path)
    assert text.startswith("Comprehensive SR Document")
    assert '(12738006,SCT,"Brain")' in text and '(71341001,SCT,"Femur")' in text
    assert f"(NOT_TARGET,{PRIVATE_SCHEME}," in text
    assert '"Plane confidence")="0.83"' in text
    assert '"Algorithm Name")="sononet16"' in text
    assert "(USm image,,2)" in text  # frame 2 of the multi-frame image
    kos_text = dsrdump(kos_path)
    assert kos_text.startswith("Key Object Selection Document")
    assert '"Best In Set"' in kos_text and "(USm image,,2)" in kos_text
    assert dciodvfy(sr_path) == []
    assert dciodvfy(kos_path) == []


def test_results_need_something_to_report(study):
    _, paths = study
    identity, results = results_for(paths)
    with pytest.raises(ValueError):
        build_sr(identity, [results[-1]], MODEL)
    with pytest.raises(ValueError):
        build_kos(identity, {}, MODEL)
    assert PRIVATE_SCHEME in repr(plane_code("Other"))
    assert all(name not in repr(identity) for name in IDENTIFIERS[:2])


def test_fast_encoding_reads_the_same_as_a_plain_write(study, tmp_path: Path):
    """`encode_sr` (groups spliced in as bytes) gives the document `build_sr` gives."""
    _, paths = study
    identity, results = results_for(paths)
    cache: dict = {}
    uid, data = encode_sr(identity, results, MODEL, cache=cache)
    fast, plain = tmp_path / "fast.dcm", tmp_path / "plain.dcm"
    fast.write_bytes(data)
    sr = build_sr(identity, results, MODEL)
    sr.save_as(plain, enforce_file_format=True)
    assert uid == sr.SOPInstanceUID and len(cache) == 4
    assert dsrdump(fast).split("Content Date/Time")[1].split("\n", 1)[1] == \
        dsrdump(plain).split("Content Date/Time")[1].split("\n", 1)[1]
    assert dciodvfy(fast) == []
    assert dcmread(fast).ContentSequence[-1].ContentSequence[3].ContentSequence[-1] \
        .ReferencedSOPSequence[0].ReferencedFrameNumber == 3


# ------------------------------------------------------------------ the exam checklist
from fetalplanes.data.datasets import VIEWS13  # noqa: E402
from fetalplanes.workflows.checklist import load_checklist  # noqa: E402
from fetalplanes.workflows.dicom_results import (  # noqa: E402
    checklist_result,
    item_code,
)

ISUOG = load_checklist("isuog-mid-trimester")


def checklist_section(sr) -> list:
    """The "Exam checklist" container of an SR read back with pydicom."""
    (section,) = [i for i in sr.ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue == "CHECKLIST"]
    return list(section.ContentSequence)


def checklist_rows(sr) -> dict[str, dict]:
    """item name -> what the SR says of it: view code, status, best frame, confidence."""
    rows = {}
    for item in checklist_section(sr):
        if item.ValueType != "CONTAINER":
            continue
        got: dict = {}
        for c in item.ContentSequence:
            name = c.ConceptNameCodeSequence[0].CodeValue
            if c.ValueType == "CODE":
                got[name] = (c.ConceptCodeSequence[0].CodeValue,
                             c.ConceptCodeSequence[0].CodingSchemeDesignator)
            elif c.ValueType == "TEXT":
                got[name] = c.TextValue
            elif c.ValueType == "NUM":
                got[name] = float(c.MeasuredValueSequence[0].NumericValue)
            elif c.ValueType == "IMAGE":
                ref = c.ReferencedSOPSequence[0]
                frames = ref.get("ReferencedFrameNumber")
                got[name] = (ref.ReferencedSOPInstanceUID,
                             None if frames is None else int(frames))
        rows[got["ITEM_NAME"]] = got
    return rows


def checklist_frames(paths: list[Path]) -> list[FrameResult]:
    """Views13 predictions for the `study` fixture: a still and a 3-frame cine."""
    ds1, ds2 = (dcmread(p, stop_before_pixels=True) for p in paths)
    single, cine = SourceInstance.from_dataset(ds1), SourceInstance.from_dataset(ds2)
    return [
        FrameResult(single, pred("Four-chamber view", 0.91)),
        FrameResult(cine, pred("Kidneys", 0.62, 0)),
        FrameResult(cine, pred("Kidneys", 0.83, 1)),
        FrameResult(cine, pred("Femur length plane", 0.97, 2, uncertain=True)),
        FrameResult(cine, failed("cine.dcm#frame=9", "cannot decode")),
    ]


def test_views_and_checklist_items_have_distinct_codes():
    """Within a preset (and a checklist) no two views share a code, so a coded view in
    the SR names one view; SNOMED CT where the anatomy is the view's own."""
    assert len({plane_code(v) for v in VIEWS13}) == len(VIEWS13)
    assert plane_code("Kidneys").value == "64033007"
    assert plane_code("Femur length plane") == plane_code("Fetal femur")  # same anatomy
    assert plane_code("Four-chamber view").scheme_designator == PRIVATE_SCHEME
    for name in ("isuog-mid-trimester", "seed4-planes"):
        c = load_checklist(name)
        codes = [item_code(c.name, i) for i in c.items]
        assert len({(k.value, k.scheme_designator) for k in codes}) == len(c.items)
        assert all(len(k.value) <= 16 and k.meaning for k in codes)
    isuog = {i.id: item_code(ISUOG.name, i) for i in ISUOG.items}
    assert isuog["heart-lvot"] == plane_code("Left ventricular outflow tract")
    assert (isuog["placenta"].value, isuog["placenta"].scheme_designator) == ("78067005", "SCT")
    assert isuog["cardiac-activity"].scheme_designator == PRIVATE_SCHEME


def test_checklist_goes_into_the_sr_and_kos(study, tmp_path: Path):
    _, paths = study
    identity, _ = results_for(paths)
    results = checklist_frames(paths)
    check = checklist_result(ISUOG, results, VIEWS13)
    assert check.present == ["Four-chamber view (situs, axis, size)", "Kidneys"]
    sr = build_sr(identity, results, MODEL, checklist=check)
    kos = build_kos(identity, best_frame_results(results), MODEL, checklist=check,
                    results=results)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    kos.save_as(tmp_path / "kos.dcm", enforce_file_format=True)
    sr, kos = dcmread(tmp_path / "sr.dcm"), dcmread(tmp_path / "kos.dcm")
    rows = checklist_rows(sr)
    assert list(rows) == [i.name for i in ISUOG.items if i.required]
    single, cine = (dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths)
    four, kidneys = rows["Four-chamber view (situs, axis, size)"], rows["Kidneys"]
    assert four["VIEW_STATUS"] == ("PRESENT", PRIVATE_SCHEME)
    assert four["BEST_FRAME"] == (single, None) and four["CONFIDENCE"] == 0.91
    assert kidneys["CHECKLIST_VIEW"] == ("64033007", "SCT")
    assert kidneys["BEST_FRAME"] == (cine, 2) and kidneys["CONFIDENCE"] == 0.83
    assert kidneys["VIEW_FRAMES"] == 2
    femur = rows["Femur (FL)"]  # only an uncertain frame: missing, no frame referenced
    assert femur["VIEW_STATUS"] == ("MISSING", PRIVATE_SCHEME) and "BEST_FRAME" not in femur
    orbits = rows["Both orbits"]
    assert orbits["VIEW_STATUS"] == ("NOT_ASSESSED", PRIVATE_SCHEME)
    texts = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue
             for i in checklist_section(sr) if i.ValueType == "TEXT"}
    assert texts["MISSING_VIEWS"] == "; ".join(check.missing)
    assert texts["CHECKLIST_NAME"].startswith("isuog-mid-trimester: ISUOG")
    # the KOS: the best frame of each present checklist view, missing views in its text
    refs = [(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
             r.ReferencedSOPSequence[0].get("ReferencedFrameNumber"))
            for r in kos.ContentSequence if r.ValueType == "IMAGE"]
    assert refs == [(single, None), (cine, 2)]
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113013"  # still "Best In Set"
    (text,) = [i.TextValue for i in kos.ContentSequence if i.ValueType == "TEXT"
               and i.ConceptNameCodeSequence[0].CodeValue == "113012"]  # Key Object Descr.
    assert text.startswith("Best frame of each view of checklist isuog-mid-trimester by "
                           "sononet16: Four-chamber view (situs, axis, size); Kidneys.")
    assert f"Missing: {'; '.join(check.missing)}." in text
    assert "Femur (FL)" in text.split("Missing:")[1]
    assert "Not assessed by this model: 13 item(s)." in text
    # another checklist result, another document; without one, the SR has no section
    assert build_sr(identity, results, MODEL).SOPInstanceUID != sr.SOPInstanceUID
    assert not [i for i in build_sr(identity, results, MODEL).ContentSequence
                if i.ConceptNameCodeSequence[0].CodeValue == "CHECKLIST"]


def test_checklist_sr_and_kos_read_and_validated_by_dcmtk_and_dicom3tools(study,
                                                                         tmp_path: Path):
    _, paths = study
    identity, _ = results_for(paths)
    results = checklist_frames(paths)
    check = checklist_result(ISUOG, results, VIEWS13)
    uid, data = encode_sr(identity, results, MODEL, checklist=check)
    fast, plain, kos_path = tmp_path / "fast.dcm", tmp_path / "sr.dcm", tmp_path / "kos.dcm"
    fast.write_bytes(data)
    sr = build_sr(identity, results, MODEL, checklist=check)
    assert sr.SOPInstanceUID == uid
    sr.save_as(plain, enforce_file_format=True)
    build_kos(identity, best_frame_results(results), MODEL, checklist=check,
              results=results).save_as(kos_path, enforce_file_format=True)
    text = dsrdump(plain)
    assert dsrdump(fast).split("Content Date/Time")[1].split("\n", 1)[1] == \
        text.split("Content Date/Time")[1].split("\n", 1)[1]
    section = text.split('CONTAINER:(,,"Exam checklist")')[1]
    assert section.count('"Checklist item")') == len(ISUOG.items)
    assert '(64033007,SCT,"Kidney")' in section and "(USm image,,2)" in section
    assert f'(NOT_ASSESSED,{PRIVATE_SCHEME},"Not assessed by this model")' in section
    assert f'(MISSING,{PRIVATE_SCHEME},"Missing from the study")' in section
    assert f'(PRESENT,{PRIVATE_SCHEME},"Present in the study")' in section
    kos_text = dsrdump(kos_path)
    assert '"Best In Set"' in kos_text and "(USm image,,2)" in kos_text
    assert dciodvfy(plain) == [] and dciodvfy(fast) == [] and dciodvfy(kos_path) == []
