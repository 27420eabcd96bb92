"""A real PACS in the tests: Debian's Orthanc with its DICOMweb plugin (tests/orthanc.py).

`listen --forward` -> Orthanc holds the originals plus the SR and KOS; `pacs push / pull /
classify` round trip over DICOMweb (the SR is found in the study over QIDO-RS)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("dicomweb_client")
from dicomfiles import IDENTIFIERS, real_frames, write_dicom
from dicomtools import dciodvfy, dsrdump, need_tool
from orthanc import PASSWORD, USER, orthanc
from pydicom import dcmread
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.workflows.dicom_listen import (
    COMPREHENSIVE_SR,
    KEY_OBJECT_SELECTION,
    Listener,
    Peer,
    model_info,
)

runner = CliRunner()
pytestmark = pytest.mark.slow  # a PACS server process: CI lane (scripts/test.sh runs it)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):
    with orthanc(tmp_path_factory.mktemp("orthanc"),
                 modalities={"fetalplanes": ["FETALPLANES", "127.0.0.1", 11112]}) as node:
        yield node


@pytest.fixture(scope="module")
def predictor():
    from fetalplanes.inference.predictor import Predictor

    return Predictor.load("sononet16")


def make_study(folder: Path, n: int = 3) -> list[Path]:
    """A new study: a 2-frame JPEG cine loop and single RLE frames, from real scans."""
    frames = real_frames("sononet", n + 1, scale=4)
    uid = generate_uid()
    files = [write_dicom(folder / "cine.dcm", frames[:2], study_uid=uid)]
    files += [write_dicom(folder / f"f{i}.dcm", [frames[i + 1]], transfer_syntax="rle",
                          study_uid=uid) for i in range(n - 1)]
    return files


def study_instances(pacs, study_uid: str) -> list[dict]:
    return [i for i in pacs.instances() if i["StudyInstanceUID"] == study_uid]


def wait_for(fn, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def referenced(pacs, orthanc_id: str) -> set[str]:
    """SOP instance UIDs an SR or KOS stored in Orthanc references as evidence."""
    import io

    import requests

    r = requests.get(f"{pacs.url}/instances/{orthanc_id}/file", auth=(USER, PASSWORD),
                     timeout=30)
    r.raise_for_status()
    ds = dcmread(io.BytesIO(r.content))
    return {item.ReferencedSOPInstanceUID
            for st in ds.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence for item in se.ReferencedSOPSequence}


def test_listen_forward_puts_originals_sr_and_kos_into_orthanc(pacs, predictor, tmp_path):
    need_tool("storescu")
    files = make_study(tmp_path / "send")
    originals = {dcmread(f).SOPInstanceUID for f in files}
    study_uid = dcmread(files[0]).StudyInstanceUID
    node = Listener(predictor, tmp_path / "out", model_info(predictor, "sononet16", "auto"),
                    port=0, forward=Peer.parse(pacs.peer), settle=0.5)

    def final_sr() -> bool:  # an SR in Orthanc's copy of the study covering every original
        return any(i["SOPClassUID"] == COMPREHENSIVE_SR and referenced(pacs, i["id"])
                   == originals for i in study_instances(pacs, study_uid))

    with node:
        for f, flag in zip(files, ["-xy"] + ["-xr"] * (len(files) - 1), strict=True):
            proc = subprocess.run([need_tool("storescu"), "-aec", "FETALPLANES", flag,
                                   "127.0.0.1", str(node.port), str(f)],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
        assert node.wait_idle(60)
        assert wait_for(final_sr), (study_instances(pacs, study_uid), node.stats.as_dict())
    got = study_instances(pacs, study_uid)
    assert originals <= {i["SOPInstanceUID"] for i in got}
    classes = [i["SOPClassUID"] for i in got]
    # each settled version of the results is sent once (the study settled between sends)
    assert 1 <= classes.count(COMPREHENSIVE_SR) <= len(files)
    assert 1 <= classes.count(KEY_OBJECT_SELECTION) <= len(files)
    assert node.stats.forward_failed == 0
    assert node.stats.forwarded == len(got)
    journal = (tmp_path / "out" / "forwarded.log").read_text().split()
    assert {i["SOPInstanceUID"] for i in got} == set(journal)


def cli(*args: object, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


ENV = {"FETALPLANES_PACS_USER": USER, "FETALPLANES_PACS_PASSWORD": PASSWORD}


def test_push_pull_classify_round_trip(pacs, tmp_path: Path):
    files = make_study(tmp_path / "send")
    study_uid = dcmread(files[0]).StudyInstanceUID
    pushed = cli("pacs", "push", pacs.dicomweb, tmp_path / "send", "-q", env=ENV)
    assert pushed.exit_code == 0, pushed.output
    assert f"pushed {len(files)} instance(s), 0 already" in pushed.output
    again = cli("pacs", "push", pacs.dicomweb, *files, "-q", env=ENV)
    assert f"pushed 0 instance(s), {len(files)} already" in again.output  # resumable

    out = tmp_path / "pulled"
    pulled = cli("pacs", "pull", pacs.dicomweb, "--study", study_uid, "--modality", "US",
                 "--out", out, "-q", env=ENV)
    assert pulled.exit_code == 0, pulled.output
    got = sorted(out.glob(f"{study_uid}/*/*.dcm"))
    assert len(got) == len(files)
    sent = {dcmread(f).SOPInstanceUID: f for f in files}
    for path in got:  # the same instance, pixels unchanged (original transfer syntax)
        ds = dcmread(path)
        src = dcmread(sent[ds.SOPInstanceUID])
        assert ds.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert ds.PixelData == src.PixelData
    resumed = cli("pacs", "pull", pacs.dicomweb, "--study", study_uid, "--out", out, "-q",
                  env=ENV)
    assert f"pulled 0 instance(s), {len(files)} already" in resumed.output
    since = cli("pacs", "pull", pacs.dicomweb, "--since", "2024-03-01", "--modality", "US",
                "--out", tmp_path / "since", "-q", env=ENV)
    assert since.exit_code == 0 and len(list((tmp_path / "since").glob(
        f"{study_uid}/*/*.dcm"))) == len(files), since.output

    work = tmp_path / "work"
    done = cli("pacs", "classify", pacs.dicomweb, "--study", study_uid, "--out", work, "-q",
               env=ENV)
    assert done.exit_code == 0, done.output
    assert f"classified {len(files) + 1} frame(s) of {len(files)} instance(s)" in done.output
    assert "pushed 2 result document(s)" in done.output
    # the SR is found in the study over QIDO-RS, and reads as a valid SR
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    client = DICOMwebClient(pacs.dicomweb, session=create_session_from_user_pass(USER, PASSWORD))
    found = client.search_for_instances(study_uid, search_filters={"Modality": "SR"})
    assert len(found) == 1
    sr_uid = found[0]["00080018"]["Value"][0]
    series_uid = found[0]["0020000E"]["Value"][0]
    sr = client.retrieve_instance(study_uid, series_uid, sr_uid)
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.StudyInstanceUID == study_uid
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert "Fetal standard plane" in dsrdump(tmp_path / "sr.dcm")
    assert dciodvfy(tmp_path / "sr.dcm") == []
    rerun = cli("pacs", "classify", pacs.dicomweb, "--study", study_uid, "--out", work, "-q",
                env=ENV)
    assert "pushed 0 result document(s) (SR, KOS) to the study, 2 already" in rerun.output
    for r in (pushed, pulled, done):
        assert PASSWORD not in r.output and all(s not in r.output for s in IDENTIFIERS[:2])


def test_http_failures_are_one_line_without_the_password(pacs, tmp_path: Path):
    bad = cli("pacs", "pull", pacs.dicomweb, "--study", generate_uid(), "--out", tmp_path,
              env={"FETALPLANES_PACS_USER": USER, "FETALPLANES_PACS_PASSWORD": "wrong-pw"})
    assert bad.exit_code == 2
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and "HTTP 401" in lines[0] and "wrong-pw" not in bad.output
    url = pacs.dicomweb.replace("http://", f"http://{USER}:wrong-pw@")
    also = cli("pacs", "push", url, write_dicom(tmp_path / "x.dcm",
                                                 [np.zeros((16, 16), np.uint8)],
                                                 transfer_syntax="explicit"))
    assert also.exit_code == 2 and "wrong-pw" not in also.output and "401" in also.output
    down = cli("pacs", "pull", "http://127.0.0.1:9/dicom-web", "--study", generate_uid(),
               "--out", tmp_path)
    assert down.exit_code == 2 and "cannot connect" in down.output


def test_pacs_classify_with_checklist_puts_it_into_the_studys_sr_and_kos(pacs, tmp_path):
    """`pacs classify --checklist`: the SR found in the study over QIDO-RS holds the
    "Exam checklist" container, the KOS names the missing views; both valid."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass
    from test_dicom_results import checklist_rows

    from fetalplanes.workflows.checklist import load_checklist

    files = make_study(tmp_path / "send")
    study_uid = dcmread(files[0]).StudyInstanceUID
    assert cli("pacs", "push", pacs.dicomweb, *files, "-q", env=ENV).exit_code == 0
    done = cli("pacs", "classify", pacs.dicomweb, "--study", study_uid, "--out",
               tmp_path / "work", "--checklist", "isuog-mid-trimester", "-q", env=ENV)
    assert done.exit_code == 0, done.output
    assert "checklist isuog-mid-trimester: " in done.output
    assert "pushed 2 result document(s)" in done.output
    client = DICOMwebClient(pacs.dicomweb, session=create_session_from_user_pass(USER, PASSWORD))
    docs = {}
    for modality in ("SR", "KO"):
        (found,) = client.search_for_instances(study_uid, search_filters={"Modality": modality})
        docs[modality] = client.retrieve_instance(study_uid, found["0020000E"]["Value"][0],
                                                  found["00080018"]["Value"][0])
        docs[modality].save_as(tmp_path / f"{modality}.dcm", enforce_file_format=True)
    rows = checklist_rows(docs["SR"])
    isuog = load_checklist("isuog-mid-trimester")
    assert list(rows) == [i.name for i in isuog.items if i.required]
    assert {r["VIEW_STATUS"][0] for r in rows.values()} <= {"PRESENT", "MISSING",
                                                            "NOT_ASSESSED"}
    missing = [n for n, r in rows.items() if r["VIEW_STATUS"][0] == "MISSING"]
    assert missing  # a 3-image study cannot show all 13 views
    text = dsrdump(tmp_path / "SR.dcm")
    assert 'CONTAINER:(,,"Exam checklist")' in text
    (description,) = [i.TextValue for i in docs["KO"].ContentSequence
                      if i.ValueType == "TEXT"
                      and i.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert f"Missing: {'; '.join(missing)}." in description
    assert dciodvfy(tmp_path / "SR.dcm") == [] and dciodvfy(tmp_path / "KO.dcm") == []
