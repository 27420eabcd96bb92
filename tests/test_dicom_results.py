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
