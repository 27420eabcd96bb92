"""De-identification of real-pixel ultrasound DICOM: no identifier survives in the output
bytes, UIDs are replaced consistently, burned-in areas are blanked, inputs are never touched.

Also: the PS3.15 Table E.1-1 copy in the package (row count, known rows, the generator
script), a file with every attribute of pydicom's data dictionary carrying a marker, dcmtk
and dciodvfy on the output, and one line per bad input on the command line."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomfiles import IDENTIFIERS, PATIENT_NAME, SONONET_REGION, real_frames, write_dicom
from dicomtools import need_tool
from pydicom.datadict import DicomDictionary, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from fetalplanes.cli.main import app
from fetalplanes.data.dicom import open_dicom
from fetalplanes.errors import FetalPlanesError
from fetalplanes.tools import deid, deid_profile
from fetalplanes.tools.deid import NothingToDeidentify, deidentify
from fetalplanes.tools.deid_profile import (
    BINARY_KEEP,
    RESOLVED,
    TEXT_EMPTY,
    TEXT_KEEP,
    load_table,
    uid_is_definition,
)

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

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
    assert (len(report.not_dicom), report.failed, report.skipped) == (2, [], [])
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


# ----------------------------------------------------------------- the PS3.15 table
#: What the tester found left in place (issue 22, round 3): every one has a table row.
TESTER_FOUND = {
    "PlateID": ("(0018,1004)", "X"),
    "GantryID": ("(0018,1008)", "X"),
    "DetectorID": ("(0018,700A)", "X/D"),
    "AcquisitionProtocolDescription": ("(0018,9424)", "X"),
    "RequestedContrastAgent": ("(0032,1070)", "X"),
    "CommentsOnThePerformedProcedureStep": ("(0040,0280)", "X"),
    "ConfidentialityConstraintOnPatientDataDescription": ("(0040,3001)", "X"),
}


def test_table_is_the_whole_of_e_1_1_for_its_edition() -> None:
    table = load_table()
    assert table.edition == "2026c"
    assert len(table.rows) == 656  # 652 single tags, 3 repeating-group rows, private
    by_keyword = {keyword: (tag, action) for tag, keyword, _, action in table.rows if keyword}
    known = {
        "PatientName": ("(0010,0010)", "Z"),
        "PatientID": ("(0010,0020)", "Z/D"),
        "StudyInstanceUID": ("(0020,000D)", "U"),
        "InstitutionName": ("(0008,0080)", "X/Z/D"),
        "ReferencedImageSequence": ("(0008,1140)", "X/Z/U*"),
        "ContentSequence": ("(0040,A730)", "D"),
        **TESTER_FOUND,
    }
    for keyword, row in known.items():
        assert by_keyword[keyword] == row, keyword
    assert {r[0]: r[3] for r in table.rows if "x" in r[0] or "g" in r[0]} == {
        "(50xx,xxxx)": "X", "(60xx,3000)": "X", "(60xx,4000)": "X", "(gggg,eeee)": "X",
    }  # fmt: skip
    assert {r[3] for r in table.rows} <= set(RESOLVED)
    assert table.action(0x60023000) == "X" and table.action(0x00080050) == "Z"
    for tag, keyword, _, _ in table.rows:  # keywords agree with pydicom where it knows the tag
        if keyword and "x" not in tag and (known := keyword_for_tag(int(tag[1:5] + tag[6:10], 16))):
            assert known == keyword, tag
    assert "tools/*.csv" in (ROOT / "pyproject.toml").read_text()  # shipped as package data


def test_generator_reads_docbook_and_tag_lists(tmp_path: Path) -> None:
    """scripts/ps3_15_table.py on a two-row DocBook table and a dicom-anonymizer style list."""
    xml = tmp_path / "part15.xml"
    heads = ("Attribute Name", "Tag", "Retd. (from PS3.6)", "Basic Prof.", "Rtn. UIDs Opt.")
    cells = "".join(f"<th><para>{h}</para></th>" for h in heads)
    row = "<tr>{}</tr>".format
    td = "".join
    xml.write_text(
        '<book xmlns="http://docbook.org/ns/docbook" xmlns:xml="http://www.w3.org/XML/1998/namespace">'
        "<subtitle>DICOM PS3.15 2031a - Security and System Management Profiles</subtitle>"
        '<table xml:id="table_E.1-1"><thead><tr>' + cells + "</tr></thead><tbody>"
        + row(td(f"<td><para>{c}</para></td>" for c in
                 ("Patient's Name", "(0010,0010)", "N", "Z", "")))
        + row(td(f"<td><para>{c}</para></td>" for c in
                 ("Overlay Data", "(60xx,3000)", "N", "X", "")))
        + row(td(f"<td><para>{c}</para></td>" for c in
                 ("Private Attributes", "(gggg,eeee) where gggg is odd", "N", "X", "")))
        + "</tbody></table></book>"
    )  # fmt: skip
    lists = tmp_path / "dicomfields_2031a.py"
    lists.write_text(
        "X_Z_TAGS = [\n    (0x0008, 0x0022),  # Acquisition Date\n]\n"
        "X_TAGS = [\n    (\n        0x0040,\n        0x4035,\n    ),"
        "  # Actual Human Performers Sequence\n"
        "    (0x5000, 0x0000, 0xFF00, 0x0000),  # Curve Data\n]\n"
        "ALL_TAGS = []\n"
    )
    expected = {
        xml: [
            ["(0010,0010)", "PatientName", "Patient's Name", "Z"],
            ["(60xx,3000)", "", "Overlay Data", "X"],
            ["(gggg,eeee)", "", "Private Attributes", "X"],
        ],
        lists: [
            ["(0008,0022)", "AcquisitionDate", "Acquisition Date", "X/Z"],
            ["(0040,4035)", "ActualHumanPerformersSequence", "Actual Human Performers Sequence",
             "X"],
            ["(50xx,xxxx)", "", "Curve Data", "X"],
            ["(gggg,eeee)", "", "Private Attributes (gggg odd)", "X"],  # added: lists lack it
        ],
    }  # fmt: skip
    script = ROOT / "scripts" / "ps3_15_table.py"
    for source, extra in ((xml, []), (lists, ["--edition", "2031a"])):
        out = tmp_path / f"{source.stem}.csv"
        subprocess.run([sys.executable, str(script), str(source), "-o", str(out), *extra],
                       check=True, capture_output=True)  # fmt: skip
        text = out.read_text()
        assert "# edition: 2031a" in text and f"# rows: {len(expected[source])}" in text
        rows = list(csv.reader(line for line in text.splitlines() if not line.startswith("#")))
        assert rows == [["tag", "keyword", "name", "action"], *expected[source]]


# ------------------------------------------------- every attribute carries a marker
MARKER = "PATIENTMARKER"
SMALL_REGION = (12, 15, 150, 100, 0.01, 0.01)  # inside frames shrunk 5 times
_TEXTS = {"LO", "LT", "ST", "UT", "UC"}
_BINARY = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_NUMBERS = {"SL", "SS", "SV", "UL", "US", "UV"}


def marker_value(vr: str, uids: list[str]) -> object:
    """A value valid for ``vr``; every string and binary value holds MARKER."""
    if vr in {"AE", "CS", "SH"}:
        return MARKER  # 13 characters, upper case: valid for all three
    if vr == "PN":
        return f"{MARKER}^JANE"
    if vr in _TEXTS:
        return f"{MARKER} free text"
    if vr == "UR":
        return f"http://example.org/{MARKER}"
    if vr in _BINARY:
        return (MARKER + "xyz").encode()  # 16 bytes: a whole number of any binary unit
    if vr == "UI":
        uids.append(generate_uid())
        return uids[-1]
    fixed = {"AS": "045Y", "AT": 0x00100010, "DA": "20240301", "DT": "20240301101530",
             "TM": "101530", "DS": "1", "IS": "1", "FL": 1.0, "FD": 1.0}  # fmt: skip
    return fixed.get(vr, 1 if vr in _NUMBERS else None)


def marker_item(uids: list[str]) -> Dataset:
    """A sequence item: free text (not in the table), a person name, an instance UID."""
    item = Dataset()
    item.TextValue = f"{MARKER} in an item"
    item.PersonName = f"{MARKER}^ITEM"
    item.ReferencedSOPInstanceUID = marker_value("UI", uids)
    return item


def every_attribute_file(path: Path) -> tuple[Path, list[str]]:
    """A real ultrasound frame whose header holds every public attribute of pydicom's data
    dictionary (not retired, ranged, pixel data, group length, command or file meta) with a
    marker value, plus overlays and private blocks; returns (file, instance UIDs written)."""
    base = write_dicom(path.with_suffix(".base.dcm"), real_frames("sononet", 1, scale=5),
                       transfer_syntax="explicit", regions=[SMALL_REGION])  # fmt: skip
    ds = pydicom.dcmread(base)
    uids: list[str] = [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                       ds.FrameOfReferenceUID]  # fmt: skip
    for tag, (vr, _, _, retired, _) in DicomDictionary.items():
        group, element = tag >> 16, tag & 0xFFFF
        if retired or element == 0 or group in (0x0000, 0x0002, 0x7FE0, 0xFFFE) or vr == "NONE":
            continue
        vr = vr.split(" or ")[0]
        if tag in ds and vr not in {"PN", "AE", "UR", "SH"} | _TEXTS:
            continue  # keep what the pixels and the file need (Rows, PhotometricInterpretation...)
        if vr == "SQ":
            ds.add_new(tag, vr, [marker_item(uids)])
        elif (value := marker_value(vr, uids)) is not None:
            ds.add_new(tag, vr, value)
    ds.add_new(0x60000010, "US", 16)  # an overlay plane with text
    ds.add_new(0x60000022, "LO", MARKER)
    ds.add_new(0x60003000, "OW", (MARKER + "xyz").encode())
    block = ds.private_block(0x0009, "MARKER VENDOR", create=True)
    block.add_new(0x01, "LO", MARKER)
    block.add_new(0x02, "OB", (MARKER + "xyz").encode())
    block.add_new(0x03, "SQ", [marker_item(uids)])
    ds.ReferencedImageSequence[0].add_new(0x00191001, "LO", MARKER)  # private in an item
    ds.save_as(path, enforce_file_format=True)
    return path, uids


def marker_hits(ds: Dataset) -> list[tuple[str, str]]:
    """(keyword or tag, VR) of every element, at any depth, whose value holds MARKER."""
    hits = []
    for elem in ds.iterall():
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        for value in values:
            if isinstance(value, bytes):
                found = MARKER.encode() in value
            else:
                found = value is not None and elem.VR != "SQ" and MARKER in str(value)
            if found:
                hits.append((elem.keyword or str(elem.tag), elem.VR))
    return hits


def allowed(keyword: str, vr: str) -> bool:
    """The documented keep-list: TEXT_KEEP, BINARY_KEEP, and coded strings (CS)."""
    return keyword in TEXT_KEEP or keyword in BINARY_KEEP or vr == "CS"


@pytest.fixture(scope="module")
def every(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("every")
    src, uids = every_attribute_file(root / "in" / "every.dcm")
    (root / "in" / "every.base.dcm").unlink()
    report = deidentify(root / "in", root / "out")
    assert report.failed == [] and len(report.written) == 1, report.failed
    return {"src": src, "out": report.written[0], "uids": uids}


def test_no_marker_survives_outside_the_keep_list(every: dict) -> None:
    before = pydicom.dcmread(every["src"])
    after = pydicom.dcmread(every["out"])
    assert len(before) > 3000  # the dictionary really went in
    hits_before = marker_hits(before)
    assert len(hits_before) > 1000
    for keyword in TESTER_FOUND:  # present with the marker before, gone after
        assert MARKER in str(before[keyword].value) and keyword not in after
    hits = marker_hits(after)
    assert [h for h in hits if not allowed(*h)] == []
    kept = {keyword for keyword, vr in hits if vr != "CS"}
    assert kept == set(TEXT_KEEP) | set(BINARY_KEEP) - {"LUTData"}  # LUTData ('US or OW'): a number
    data = every["out"].read_bytes()
    assert data.count(MARKER.encode()) == len(hits)  # nothing hides outside the parsed elements
    uid_bytes = [str(e.value).encode() for e in [*after.iterall(), *after.file_meta]
                 if e.VR == "UI" and e.value]  # fmt: skip
    no_uids = re.sub(b"|".join(map(re.escape, uid_bytes)), b"", data)  # new UIDs are digits
    assert b"20240301" not in no_uids and b"101530" not in no_uids  # no date or time survives
    leaked = [uid for uid in every["uids"] if uid.encode() in data]
    definitions = {str(e.value) for e in before.iterall()
                   if e.VR == "UI" and uid_is_definition(e.keyword)}  # fmt: skip
    assert [uid for uid in leaked if uid not in definitions] == []
    assert not any(e.tag.is_private or e.tag.group >> 8 == 0x60 for e in after.iterall())
    assert after.PositionReferenceIndicator == "" and set(TEXT_EMPTY) <= set(after.dir())
    assert after.PatientIdentityRemoved == "YES"
    assert "PS3.15 2026c" in after.DeidentificationMethod[0]
    assert after.pixel_array.shape == before.pixel_array.shape


def test_dcmdump_reads_the_output(every: dict) -> None:
    r = subprocess.run([need_tool("dcmdump"), str(every["out"])], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "E: " not in r.stdout + r.stderr and "PixelData" in r.stdout


def dciodvfy_errors(path: Path) -> set[str]:
    r = subprocess.run([need_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    lines = (r.stdout + r.stderr).splitlines()
    return {re.sub(r"\s+", " ", line) for line in lines if line.startswith("Error")}


def test_dciodvfy_finds_no_new_error_in_the_every_attribute_file(every: dict) -> None:
    """The input is full of values no IOD allows (a marker in every attribute), so dciodvfy
    reports many errors on it; what de-identification must not do is add one (a Type 1 or
    2 attribute removed, an empty Type 1, a bad dummy value)."""
    need_tool("dciodvfy")
    before, after = dciodvfy_errors(every["src"]), dciodvfy_errors(every["out"])
    assert before  # the check runs and sees the bad input
    assert after - before == set()


def conformant_us_image(path: Path, transfer_syntax: str) -> Path:
    """A real-frame US image with a patient identity that dciodvfy finds no error in."""
    written = write_dicom(path, real_frames("sononet", 2, scale=5), fps=25,
                          transfer_syntax=transfer_syntax,
                          regions=[SMALL_REGION])  # fmt: skip
    ds = pydicom.dcmread(written)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ds.Laterality = ""
    ds.PositionReferenceIndicator = "UTERUS OF DOE"
    ds.ManufacturerModelName, ds.SoftwareVersions = "Model 9", "v1.2 site DOE"
    ds.ProtocolName, ds.TransducerData = f"OB {PATIENT_NAME}", ["C5-1", "site 4"]
    del ds.OtherPatientIDs, ds.PatientAddress  # retired or outside the IOD: warnings only
    ds.save_as(written, enforce_file_format=True)
    return written


@pytest.mark.parametrize("syntax", ["explicit", "jpeg-baseline"])
def test_a_conformant_us_image_stays_conformant(tmp_path: Path, syntax: str) -> None:
    """A realistic US Multi-frame image that dciodvfy accepts without error is still accepted
    without error after de-identification (the X/Z, X/D, X/Z/D resolution and the safety
    net's removals keep every Type 1 and 2 attribute of the US IODs)."""
    need_tool("dciodvfy")
    src = conformant_us_image(tmp_path / "in" / "us.dcm", syntax)
    assert dciodvfy_errors(src) == set()
    (out,) = deidentify(tmp_path / "in", tmp_path / "out").written
    assert dciodvfy_errors(out) == set()
    data = out.read_bytes()
    assert [s for s in IDENTIFIERS if s.encode() in data] == []
    header = pydicom.dcmread(out, stop_before_pixels=True)
    assert [e.keyword for e in header.iterall() if "DOE" in str(e.value)] == []


def test_safe_private_list_keeps_only_listed_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = small_dicom(tmp_path / "in" / "p.dcm")
    ds = pydicom.dcmread(src)
    block = ds.private_block(0x0011, "ACME US 1.0", create=True)
    block.add_new(0x01, "US", 7)  # listed, numeric: kept
    block.add_new(0x02, "LO", MARKER)  # listed, but text: removed
    block.add_new(0x03, "US", 9)  # not listed: removed
    ds.save_as(src, enforce_file_format=True)
    monkeypatch.setattr(deid_profile, "SAFE_PRIVATE", {
        ("ACME US 1.0", 0x0011, 0x01): "a gain setting", ("ACME US 1.0", 0x0011, 0x02): "text",
    })  # fmt: skip
    (out,) = deidentify(src, tmp_path / "out").written
    after = pydicom.dcmread(out)
    private = {e.tag: e.value for e in after if e.tag.is_private}
    assert private == {Tag(0x00110010): "ACME US 1.0", Tag(0x00111001): 7}
    codes = [c.CodeValue for c in after.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113111"]


# ------------------------------------------------------------ bad inputs, one line each
def small_dicom(path: Path, **kw) -> Path:
    """A 160x108 real grey frame, uncompressed."""
    return write_dicom(path, real_frames("hc18", 1, scale=5), transfer_syntax="explicit", **kw)


def test_every_bad_input_is_named_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    good = small_dicom(src / "good.dcm", regions=[SMALL_REGION])
    (src / "garbage.dcm").write_bytes(os.urandom(3000))
    (src / "truncated.dcm").write_bytes(good.read_bytes()[:2000])
    os.mkfifo(src / "pipe.dcm")
    r = runner.invoke(app, ["deid", str(src), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == f"not DICOM, skipped: {src / 'garbage.dcm'}"
    assert lines[1].startswith(f"failed: {src / 'pipe.dcm'}: not a regular file but a FIFO")
    assert lines[2].startswith(f"failed: {src / 'truncated.dcm'}: ") and "truncated" in lines[2]
    assert r.stdout.startswith("1 written, 0 skipped (exist), 2 failed, 1 not DICOM")


def test_a_fifo_given_directly_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    r = runner.invoke(app, ["deid", str(tmp_path / "pipe"), str(tmp_path / "out")])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: {tmp_path / 'pipe'}: not a file or folder but a FIFO (named pipe); "
        "deid reads DICOM files and folders"
    ]
    assert not (tmp_path / "out").exists()


def test_a_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("nothing here")
    r = runner.invoke(app, ["deid", str(tmp_path / "src"), str(tmp_path / "out")])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: {tmp_path / 'src'}: no DICOM file in this folder (1 other file looked at)"
    ]
    with pytest.raises(NothingToDeidentify):
        deidentify(tmp_path / "src", tmp_path / "out")


def test_an_output_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    src = small_dicom(tmp_path / "in.dcm")
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["deid", str(src), str(tmp_path / "afile" / "out")])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: {tmp_path / 'afile' / 'out'}: cannot create the output folder: "
        f"{tmp_path / 'afile'} is a file"
    ]
    r = runner.invoke(app, ["deid", str(src), str(tmp_path / "out"),
                            "--uid-map", str(tmp_path / "afile" / "uids.csv")])  # fmt: skip
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and "Errno" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_a_read_only_output_is_one_line(tmp_path: Path) -> None:
    src = small_dicom(tmp_path / "in.dcm")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        r = runner.invoke(app, ["deid", str(src), str(locked / "out")])
    finally:
        locked.chmod(0o755)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: {locked / 'out'}: cannot write the output folder in {locked} (permission denied)"
    ]


def test_a_denied_output_is_one_line_even_for_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check as above where root would pass chmod: os.access says no."""
    src = small_dicom(tmp_path / "in.dcm")
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(deid.os, "access", lambda p, mode: Path(p).name != "locked"
                        and real_access(p, mode))  # fmt: skip
    r = runner.invoke(app, ["deid", str(src), str(tmp_path / "locked" / "out")])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: {tmp_path / 'locked' / 'out'}: cannot write the output folder in "
        f"{tmp_path / 'locked'} (permission denied)"
    ]
