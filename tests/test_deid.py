"""De-identification of real-pixel ultrasound DICOM: no identifier survives in the output
bytes, UIDs are replaced consistently, burned-in areas are blanked, inputs are never touched."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomfiles import IDENTIFIERS, PATIENT_NAME, SONONET_REGION, real_frames, write_dicom
from pydicom.datadict import keyword_dict
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fetalplanes.data.dicom import open_dicom
from fetalplanes.errors import FetalPlanesError
from fetalplanes.tools import deid
from fetalplanes.tools.deid import ACTIONS, deidentify

BAND = 75  # the SonoNet captures print date and time in their top 75 rows
REGION = (*SONONET_REGION, 0.01, 0.01)


def make_study(root: Path) -> dict[str, Path]:
    """Two files of one study (a YBR JPEG cine and a grey RLE frame), plus files to skip."""
    study = generate_uid()
    files = {
        "cine": write_dicom(root / "DOE_JANE" / "cine.dcm", real_frames("sononet", 4),
                            fps=25, regions=[REGION], study_uid=study),
        "still": write_dicom(root / "DOE_JANE" / "still.dcm", real_frames("hc18", 1),
                             transfer_syntax="rle", regions=[(100, 60, 699, 499, 0.01, 0.01)],
                             study_uid=study),
    }  # fmt: skip
    (root / "notes.txt").write_text(f"scan of {PATIENT_NAME}\n")
    (root / "DOE_JANE" / "DICOMDIR.bak").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    return files


def fingerprint(folder: Path) -> dict[Path, tuple[str, int]]:
    """sha256 and mtime of every file under ``folder``."""
    return {
        p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def run(tmp_path: Path) -> tuple[dict[str, Path], Path, deid.DeidReport]:
    src, dst = tmp_path / "src", tmp_path / "out"
    files = make_study(src)
    before = fingerprint(src)
    report = deidentify(src, dst, top_band=BAND, uid_map=tmp_path / "uids.csv")
    assert fingerprint(src) == before, "the input folder was modified"
    return files, dst, report


def test_no_identifier_survives_in_the_output_bytes(run) -> None:
    files, dst, report = run
    assert sorted(p.relative_to(dst) for p in report.written) == [
        Path("DOE_JANE/cine.dcm"),
        Path("DOE_JANE/still.dcm"),
    ]
    assert (report.not_dicom, report.failed, report.skipped) == (2, [], [])
    for source, path in zip(files.values(), sorted(report.written), strict=True):
        data = path.read_bytes()
        assert PATIENT_NAME.encode() in source.read_bytes()
        leaked = [s for s in IDENTIFIERS if s.encode() in data]
        assert leaked == [], f"{path.name} still holds {leaked}"
        assert b"FETALPLANES TEST" not in data  # the private block is gone
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.PatientName == "" and ds.PatientID == "" and "InstitutionName" not in ds
        assert ds.BurnedInAnnotation == "YES"  # text inside the region cannot be ruled out
        assert not any(elem.tag.is_private for elem in ds.iterall())
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        frames = int(ds.get("NumberOfFrames", 1))
        assert ds.pixel_array.size == frames * ds.Rows * ds.Columns * ds.SamplesPerPixel


def test_uids_are_new_and_consistent_within_the_run(run, tmp_path: Path) -> None:
    files, _, report = run
    old = [pydicom.dcmread(p, stop_before_pixels=True) for p in files.values()]
    new = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(report.written)]
    assert new[0].StudyInstanceUID == new[1].StudyInstanceUID != old[0].StudyInstanceUID
    for before, after in zip(old, new, strict=True):
        for keyword in ("SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            assert after[keyword].value != before[keyword].value
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        assert after.SOPClassUID == before.SOPClassUID
    with (tmp_path / "uids.csv").open() as f:
        mapping = {row["old_uid"]: row["new_uid"] for row in csv.DictReader(f)}
    assert mapping[old[0].StudyInstanceUID] == new[0].StudyInstanceUID
    assert mapping[old[1].SOPInstanceUID] == new[1].SOPInstanceUID


def test_pixels_outside_regions_and_top_band_are_zero(run) -> None:
    files, _, report = run
    cine = open_dicom(sorted(report.written)[0])
    source = open_dicom(files["cine"])
    assert (cine.n_frames, cine.photometric) == (4, "RGB")  # YBR_FULL_422 JPEG -> RGB
    assert pydicom.dcmread(cine.name, stop_before_pixels=True).LossyImageCompression == "01"
    x0, y0, x1, y1 = SONONET_REGION
    inside = np.zeros((735, 975), bool)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    inside[:BAND] = False
    for (_, out), (_, src) in zip(cine.iter_frames(), source.iter_frames(), strict=True):
        assert out[~inside].max() == 0
        np.testing.assert_array_equal(out[inside], src[inside])  # decoded once, then kept
    still = open_dicom(sorted(report.written)[1]).frame(0)
    assert still[:60].max() == 0 and still[:, 700:].max() == 0 and still[60:500, 100:700].any()


def test_second_run_overwrites_nothing(run, tmp_path: Path) -> None:
    _, dst, _ = run
    before = fingerprint(dst)
    report = deidentify(tmp_path / "src", dst, top_band=BAND)
    assert report.written == [] and len(report.skipped) == 2
    assert all("exists, not overwritten" in note for note in report.skipped)
    assert fingerprint(dst) == before
    with pytest.raises(FetalPlanesError, match="already exists"):
        deidentify(tmp_path / "src", dst, uid_map=tmp_path / "uids.csv")
    assert not list(dst.rglob("*.part"))


def test_output_inside_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_study(src)
    for dst in (src, src / "deid", src / "DOE_JANE"):
        with pytest.raises(FetalPlanesError, match="inside the input"):
            deidentify(src, dst)
    with pytest.raises(FetalPlanesError, match="inside the input"):
        deidentify(src, tmp_path / "out", uid_map=src / "uids.csv")
    assert not (src / "deid").exists() and not (tmp_path / "out").exists()


def test_bad_file_is_reported_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = tmp_path / "src", tmp_path / "out"
    make_study(src)
    (src / "broken.dcm").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00")
    colour_frames = []

    def fail_on_second_frame(frame: np.ndarray, keep: np.ndarray | None) -> bytes:
        if frame.ndim == 3:  # only the cine is colour: fail it half-way through
            colour_frames.append(frame)
            if len(colour_frames) == 2:
                raise OSError("disk full")
        return frame.tobytes()

    monkeypatch.setattr(deid, "_masked_bytes", fail_on_second_frame)
    report = deidentify(src, dst)
    assert report.written == [dst / "DOE_JANE" / "still.dcm"]
    assert len(report.failed) == 2
    assert report.failed[0].startswith(f"{src / 'DOE_JANE' / 'cine.dcm'}: ")
    assert "disk full" in report.failed[0]
    assert report.failed[1].startswith(f"{src / 'broken.dcm'}: ")
    assert all("\n" not in m and PATIENT_NAME not in m for m in report.failed)
    assert sorted(p.name for p in dst.rglob("*")) == ["DOE_JANE", "still.dcm"]


def test_rename_names_files_by_new_sop_uid(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "out"
    make_study(src)
    report = deidentify(src, dst, rename=True)
    assert len(report.written) == 2
    for path in report.written:
        assert path.parent == dst
        assert path.name == f"{pydicom.dcmread(path).SOPInstanceUID}.dcm"
    with pytest.raises(FetalPlanesError, match="empty output folder"):
        deidentify(src, dst, rename=True)


def test_masking_off_and_files_without_regions(tmp_path: Path) -> None:
    frames = real_frames("hc18", 2)
    src = write_dicom(
        tmp_path / "in" / "m1.dcm",
        frames,
        transfer_syntax="explicit",
        photometric="MONOCHROME1",
        bits=16,
        regions=[(0, 0, 99, 99, 0.01, 0.01)],
    )
    plain = write_dicom(tmp_path / "in2" / "plain.dcm", frames, transfer_syntax="deflated")
    kept = deidentify(src, tmp_path / "kept", mask_outside_regions=False).written[0]
    np.testing.assert_array_equal(
        open_dicom(kept).frame(1, as_uint8=False), open_dicom(src).frame(1, as_uint8=False)
    )
    assert pydicom.dcmread(kept).PhotometricInterpretation == "MONOCHROME1"
    report = deidentify(plain, tmp_path / "band", top_band=0.1)
    out = open_dicom(report.written[0])
    assert report.unmasked == report.written  # no regions: only the band was blanked
    assert out.frame(0)[:54].max() == 0
    np.testing.assert_array_equal(out.frame(0)[54:], frames[0][54:])


def test_action_table_uses_real_keywords() -> None:
    assert set(ACTIONS) <= set(keyword_dict)
    assert set(ACTIONS.values()) <= {"D", "Z", "X", "U"}
