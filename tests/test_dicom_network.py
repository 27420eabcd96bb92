"""`fetalplanes listen`: a Storage SCP fed by a second implementation (dcmtk storescu,
echoscu) and by pynetdicom for what storescu cannot send (malformed data sets)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
from dicomfiles import IDENTIFIERS, bomb_dicom, real_frames, write_dicom
from dicomtools import dciodvfy, dsrdump, need_tool
from pydicom import dcmread
from pydicom.uid import generate_uid

from fetalplanes.workflows.dicom_listen import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    Listener,
    OutputFolder,
    Peer,
    model_info,
)

#: storescu's option proposing each test file's transfer syntax
PROPOSE = {"jpeg-baseline": "-xy", "rle": "-xr", "jpeg-ls": "-xt", "explicit": "-xe",
           "implicit": "-xi", "deflated": "-xd"}


@pytest.fixture(scope="module")
def predictor():
    from fetalplanes.inference.predictor import Predictor

    return Predictor.load("sononet16")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One study from real frames in every transfer syntax the reader decodes: single
    frames, and a 3-frame cine loop (JPEG Baseline)."""
    folder = tmp_path_factory.mktemp("send")
    frames = real_frames("sononet", 4, scale=4)
    grey = [np.asarray(f.mean(axis=2), np.uint8) for f in frames]
    uid = generate_uid()
    files = {"cine": write_dicom(folder / "cine.dcm", frames[:3], study_uid=uid)}
    for i, ts in enumerate(PROPOSE):
        img = frames[i % 4] if ts in ("jpeg-baseline", "rle", "jpeg-ls") else grey[i % 4]
        files[ts] = write_dicom(folder / f"{ts}.dcm", [img], transfer_syntax=ts,
                                study_uid=uid)
    return files


def storescu(port: int, files: list[Path], *flags: str, aet: str = "STORESCU",
             ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [need_tool("storescu"), "-aet", aet, "-aec", "FETALPLANES", *flags, "127.0.0.1",
         str(port), *map(str, files)], capture_output=True, text=True, timeout=120)


def send_all(port: int, files: dict[str, Path], aet: str = "STORESCU") -> None:
    for name, path in files.items():
        ts = "jpeg-baseline" if name == "cine" else name
        proc = storescu(port, [path], PROPOSE[ts], aet=aet)
        assert proc.returncode == 0, proc.stderr


@pytest.fixture()
def listener(predictor, tmp_path: Path):
    node = Listener(predictor, tmp_path / "out", model_info(predictor, "sononet16", "auto"),
                    port=0, settle=0.2)
    node.start()
    yield node
    node.stop(drain_timeout=10)


def results_of(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*/*.json")}


def test_storescu_to_listen_every_syntax_classified_and_reported(listener, study, caplog):
    need_tool("storescu")
    caplog.set_level(logging.DEBUG, logger="fetalplanes")
    send_all(listener.port, study)
    assert listener.wait_idle(60)
    out = listener.folder.root
    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: name
            for name, p in study.items()}
    results = results_of(out)
    assert set(results) == set(sent)
    for uid, record in results.items():
        preds = record["predictions"]
        assert len(preds) == (3 if sent[uid] == "cine" else 1)
        assert all("error" not in p and p["label"] for p in preds), preds
        assert record["file"].startswith("instances/")
        assert (out / record["file"]).read_bytes()[128:132] == b"DICM"
    cine = next(r for u, r in results.items() if sent[u] == "cine")
    assert [p["frame"] for p in cine["predictions"]] == [0, 1, 2]
    # the study's SR and KOS, read by dcmtk and validated by dicom3tools
    (study_dir,) = (out / "reports").iterdir()
    sr, kos = study_dir / "sr.dcm", study_dir / "kos.dcm"
    assert dcmread(sr).StudyInstanceUID == study_dir.name
    text = dsrdump(sr)
    assert text.count('"Measurement Group"') == 3 + len(PROPOSE)
    assert dsrdump(kos).startswith("Key Object Selection Document")
    assert dciodvfy(sr) == [] and dciodvfy(kos) == []
    assert listener.stats.received == len(study) and listener.stats.refused == 0
    assert listener.stats.latencies  # last byte -> SR on disk was measured
    logged = caplog.text
    assert all(secret not in logged for secret in IDENTIFIERS)
    assert not list((out / ".incoming").iterdir())


def test_same_instance_twice_is_stored_and_classified_once(listener, study):
    need_tool("storescu")
    for _ in range(2):
        assert storescu(listener.port, [study["explicit"]], "-xe").returncode == 0
    assert listener.wait_idle(30)
    assert len(results_of(listener.folder.root)) == 1
    assert listener.stats.received == 1 and listener.stats.duplicates == 1
    assert listener.stats.classified == 1


def test_echo_and_unsupported_sop_class(listener, tmp_path: Path):
    echo = subprocess.run([need_tool("echoscu"), "-aec", "FETALPLANES", "127.0.0.1",
                           str(listener.port)], capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    sr = tmp_path / "sr.dcm"
    ds = dcmread(write_dicom(tmp_path / "img.dcm", [np.zeros((32, 32), np.uint8)],
                             transfer_syntax="explicit"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.save_as(sr)
    proc = storescu(listener.port, [sr], "-xe")
    assert proc.returncode != 0 and "presentation context" in proc.stderr.lower()
    assert listener.stats.received == 0
    assert not results_of(listener.folder.root)


def test_allow_list_refuses_unknown_calling_ae(predictor, study, tmp_path: Path):
    need_tool("storescu")
    node = Listener(predictor, tmp_path / "out", {"name": "sononet16"}, port=0,
                    allow=["SCANNER1"])
    with node:
        refused = storescu(node.port, [study["explicit"]], "-xe", aet="INTRUDER")
        assert refused.returncode != 0
        assert "rejected" in (refused.stderr + refused.stdout).lower()
        assert storescu(node.port, [study["explicit"]], "-xe", aet="SCANNER1").returncode == 0
        assert node.wait_idle(30)
    assert node.stats.received == 1


def send_raw(port: int, path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """C-STORE a file's bytes as they are (pynetdicom, not decoded on the way)."""
    from pynetdicom import AE, _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    meta = dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(meta.file_meta.MediaStorageSOPClassUID,
                             meta.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FETALPLANES")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(status.Status), str(status.get("ErrorComment", ""))


def test_oversized_and_malformed_refused_before_decoding(listener, tmp_path, monkeypatch):
    bomb = bomb_dicom(tmp_path / "bomb.dcm")  # 158 KB claiming a 9000x9000 16-bit frame
    code, comment = send_raw(listener.port, bomb, monkeypatch)
    assert code == OUT_OF_RESOURCES and "limit" in comment
    short = write_dicom(tmp_path / "short.dcm", [np.zeros((64, 64), np.uint8)],
                        transfer_syntax="explicit")
    ds = dcmread(short)
    ds.PixelData = ds.PixelData[:100]  # header promises 4,096 bytes
    ds.save_as(short)
    code, comment = send_raw(listener.port, short, monkeypatch)
    assert code == CANNOT_UNDERSTAND and "truncated" in comment
    assert listener.stats.refused == 2 and listener.stats.received == 0
    assert not any((listener.folder.root / "instances").iterdir())


def test_restart_classifies_what_was_stored_and_removes_partial_files(predictor, study,
                                                                      tmp_path: Path):
    out = tmp_path / "out"
    folder = OutputFolder(out)
    ds = dcmread(study["rle"], stop_before_pixels=True)
    stored = folder.instance_path(ds.StudyInstanceUID, ds.SOPInstanceUID)
    stored.parent.mkdir(parents=True)
    stored.write_bytes(study["rle"].read_bytes())  # stored, then killed before classifying
    (folder.incoming / "x.dcm.123.part").write_bytes(b"half an instance")
    node = Listener(predictor, out, {"name": "sononet16"}, port=0)
    with node:
        assert node.wait_idle(30)
    assert set(results_of(out)) == {ds.SOPInstanceUID}
    assert not list(folder.incoming.iterdir())
    assert (out / "reports" / ds.StudyInstanceUID / "sr.dcm").is_file()
    state = json.loads((out / "state.json").read_text())
    assert state["studies"][ds.StudyInstanceUID]["instances"] == 1


def test_peer_grammar():
    assert Peer.parse("ORTHANC@127.0.0.1:4242") == Peer("ORTHANC", "127.0.0.1", 4242)
    assert Peer.parse("PACS@[::1]:104").host == "::1"
    from fetalplanes.errors import FetalPlanesError

    for bad in ("ORTHANC@127.0.0.1", "127.0.0.1:4242", "A@h:99999", "TOO_LONG_AE_TITLE_X@h:1"):
        with pytest.raises(FetalPlanesError):
            Peer.parse(bad)


@pytest.mark.slow
def test_listen_command_sigterm_finishes_and_logs_no_identity(study, tmp_path: Path):
    """The CLI end to end: start, receive from storescu, SIGTERM, exit 0, results on disk
    (with the exam checklist asked for), nothing identifying in its output."""
    need_tool("storescu")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fetalplanes", "listen", "--out", str(out), "--port", "0",
         "--verbose", "--checklist", "seed4-planes"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert "listening as FETALPLANES on 127.0.0.1:" in line, proc.stderr.read()
        port = int(line.split(":")[-1].split(";")[0])
        send_all(port, {k: study[k] for k in ("cine", "rle", "implicit")})
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert len(results_of(out)) == 3
    (sr,) = (out / "reports").glob("*/sr.dcm")
    assert dsrdump(sr).count('"Checklist item")') == 4  # seed4-planes: four planes
    assert "checklist seed4-planes: " in stderr
    assert all(secret not in line + stdout + stderr for secret in IDENTIFIERS)
    assert "stopped: received 3" in stderr


@pytest.mark.slow
def test_node_classifies_and_reports_without_torch(study, tmp_path: Path):
    """`pip install fetalplanes[network]` is enough: the node never imports torch."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fetalplanes.inference.predictor import Predictor\n"
        "from fetalplanes.workflows.dicom_listen import Listener, model_info\n"
        "p = Predictor.load('sononet16')\n"
        f"node = Listener(p, Path({str(tmp_path / 'out')!r}), model_info(p, 'sononet16', 'auto'))\n"
        "node.start(network=False)\n"
        f"data = Path({str(study['cine'])!r}).read_bytes()\n"
        "assert node.receive_file(data, time.time()) is None\n"
        "assert node.wait_idle(120)\n"
        "node.stop()\n"
        "print(node.stats.frames, node.stats.reports, 'torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["3", "1", "False"]


def test_unsupported_transfer_syntax_rejected_at_negotiation(listener):
    """A presentation context in a syntax the reader cannot decode (big endian here) is
    rejected with result 4, "transfer syntaxes not supported"; a decodable one is not."""
    from pynetdicom import AE

    ae = AE(ae_title="TSSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.1.2.2")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.1.2.5")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="FETALPLANES")
    try:
        assert assoc.is_established
        rejected = {cx.transfer_syntax[0]: cx.result for cx in assoc.rejected_contexts}
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
    finally:
        assoc.release()
    assert rejected == {"1.2.840.10008.1.2.2": 0x04}
    assert accepted == ["1.2.840.10008.1.2.5"]


# ------------------------------------------------------------------ the exam checklist
from dicomfiles import SHARED, SONONET_REGION  # noqa: E402
from test_dicom_results import checklist_rows, checklist_section  # noqa: E402

from fetalplanes.workflows.audit import AuditOptions, run_audit  # noqa: E402
from fetalplanes.workflows.checklist import load_checklist  # noqa: E402
from fetalplanes.workflows.dicom_listen import fit_checklist  # noqa: E402

EXAMPLES = SHARED / "sononet" / "example_images"
ISUOG = load_checklist("isuog-mid-trimester")
#: example frames -> ISUOG items, and the views taken out of the second study
ITEM_OF = {
    "3VV": "heart-3vv", "4CH": "heart-4ch", "ABDOMINAL": "abdomen-ac",
    "BRAIN-CB": "head-transcerebellar", "BRAIN-TV": "head-transventricular", "FEMUR": "femur",
    "KIDNEYS": "abdomen-kidneys", "LIPS": "face-lips", "LVOT": "heart-lvot",
    "PROFILE": "face-profile", "RVOT": "heart-rvot", "SPINE-CORONAL": "spine-coronal",
    "SPINE-SAGITTAL": "spine-sagittal",
}
REMOVED = ("BRAIN-CB", "FEMUR", "KIDNEYS", "ABDOMINAL")
CINE = ("SPINE-SAGITTAL", "SPINE-CORONAL")  # one 2-frame cine loop, the rest stills


def exam_study(folder: Path, stems: list[str]) -> list[Path]:
    """A study of the real example frames (full size, their ultrasound region declared,
    JPEG Baseline): a still per view, and the spine views as one 2-frame cine loop."""
    from PIL import Image

    uid, region = generate_uid(), (*SONONET_REGION, 0.03, 0.03)

    def frame(stem: str) -> np.ndarray:
        with Image.open(EXAMPLES / f"{stem}.png") as im:
            return np.asarray(im.convert("RGB"))

    files = [write_dicom(folder / f"{s}.dcm", [frame(s)], study_uid=uid, regions=[region])
             for s in stems if s not in CINE]
    loop = [frame(s) for s in CINE if s in stems]
    if loop:
        files.append(write_dicom(folder / "cine.dcm", loop, study_uid=uid, regions=[region],
                                 fps=10))
    return files


@pytest.fixture(scope="module")
def exams(predictor, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two studies through `listen --checklist isuog-mid-trimester` (storescu): all 13
    views, and the same without `REMOVED`; and `fetalplanes audit` on the same files."""
    need_tool("storescu")
    if not EXAMPLES.is_dir():
        pytest.skip(f"real frames not found at {EXAMPLES}: set FETALPLANES_SHARED to shared/")
    tmp = tmp_path_factory.mktemp("exams")
    studies = {"all": exam_study(tmp / "all", list(ITEM_OF)),
               "some": exam_study(tmp / "some", [s for s in ITEM_OF if s not in REMOVED])}
    fitted = fit_checklist(predictor, ISUOG)
    node = Listener(predictor, tmp / "out", model_info(fitted, "sononet16", "auto"), port=0,
                    checklist=ISUOG)
    with node:
        for files in studies.values():
            proc = storescu(node.port, files, "-xy")
            assert proc.returncode == 0, proc.stderr
        assert node.wait_idle(120)
    # the same files through `fetalplanes audit` (each frame as it is: --window 1)
    audit = run_audit([tmp / "all", tmp / "some"], tmp / "audit", fitted, ISUOG,
                      options=AuditOptions(window=1, workers=0), salt_file=tmp / "salt")
    by_uid = {}
    for a in audit.audits:
        uid = dcmread(a.study.files[0].path, stop_before_pixels=True).StudyInstanceUID
        by_uid[uid] = a
    out = {}
    for name, files in studies.items():
        uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        sr, kos = node.folder.report_paths(uid)
        out[name] = {"files": files, "sr": sr, "kos": kos, "audit": by_uid[uid].result,
                     "listen": node.checklist_of(uid)}
    return out


def kos_description(path: Path) -> str:
    (text,) = [i.TextValue for i in dcmread(path).ContentSequence if i.ValueType == "TEXT"
               and i.ConceptNameCodeSequence[0].CodeValue == "113012"]
    return text


@pytest.mark.slow  # 25 full-size real frames, listen and audit
def test_listen_checklist_agrees_with_audit_on_the_same_frames(exams):
    """Per required item: the SR's status, best frame and confidence are what `fetalplanes
    audit` finds in the same files (the same engine); dcmtk reads it, dicom3tools finds
    no error."""
    for name, study in exams.items():
        audit = study["audit"]
        rows = checklist_rows(dcmread(study["sr"]))
        sop = {f.name: dcmread(f, stop_before_pixels=True).SOPInstanceUID
               for f in study["files"]}
        assert list(rows) == [r.item.name for r in audit.items if r.item.required]
        for r in audit.items:
            row = rows[r.item.name]
            assert row["VIEW_STATUS"][0] == r.status.upper(), (name, r.item.id)
            if r.best is None:
                assert "BEST_FRAME" not in row
                continue
            frame = None if r.best.frame is None else r.best.frame + 1
            assert row["BEST_FRAME"] == (sop[Path(r.best.source).name], frame), r.item.id
            assert row["CONFIDENCE"] == pytest.approx(r.best.confidence, abs=1e-6)
            assert row["VIEW_FRAMES"] == r.frames
        texts = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue
                 for i in checklist_section(dcmread(study["sr"])) if i.ValueType == "TEXT"}
        assert texts["MISSING_VIEWS"] == ("; ".join(audit.missing) or "none")
        assert texts["UNASSESSED_ITEMS"] == "; ".join(audit.not_assessed)
        assert audit.assessed == 13 and len(audit.not_assessed) == 13
        assert study["listen"].present == audit.present
        text = dsrdump(study["sr"])
        assert text.count('"Checklist item")') == len(ISUOG.items)
        assert "(USm image,,2)" in text.split('"Exam checklist"')[1]  # a cine's frame 2
        assert dciodvfy(study["sr"]) == [] and dciodvfy(study["kos"]) == []
    # measured: 11 of 13 present (in its declared ultrasound region the 3VV frame is
    # uncertain, 0.50, and the coronal lips frame not a target plane)
    assert len(exams["all"]["audit"].present) >= 11


@pytest.mark.slow  # 25 full-size real frames, listen and audit
def test_views_removed_from_a_study_are_missing_in_its_sr_and_kos(exams):
    full, some = exams["all"]["audit"], exams["some"]["audit"]
    removed = {ISUOG.items[[i.id for i in ISUOG.items].index(ITEM_OF[s])].name
               for s in REMOVED}
    assert removed <= set(some.missing) and not removed & set(full.missing)
    rows = checklist_rows(dcmread(exams["some"]["sr"]))
    assert all(rows[n]["VIEW_STATUS"][0] == "MISSING" for n in removed)
    text = kos_description(exams["some"]["kos"])
    missing = text.split("Missing: ")[1]
    assert all(n in missing for n in removed)
    assert all(n not in text.split("Missing: ")[0] for n in removed)
    assert all(n not in kos_description(exams["all"]["kos"]).split("Missing: ")[1]
               for n in removed)
    # the KOS selects the best frame of each present view: one reference per frame
    refs = [i for i in dcmread(exams["some"]["kos"]).ContentSequence if i.ValueType == "IMAGE"]
    best = {(r.best.source, r.best.frame) for r in some.items if r.best is not None}
    assert len(refs) == len(best)


def test_listen_checklist_errors_are_one_line(tmp_path: Path):
    """An unknown checklist, or one the model can assess nothing of: one line, exit 2,
    before anything listens."""
    from typer.testing import CliRunner

    from fetalplanes.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["listen", "--out", str(tmp_path / "out"), "--port", "0",
                              "--checklist", "no-such-checklist"])
    assert bad.exit_code == 2 and "unknown checklist" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"name": "other", "preset": "seed4", "items": [
        {"id": "x", "name": "A view no model has", "views": ["Nothing like it"]}]}))
    misfit = runner.invoke(app, ["pacs", "classify", "http://127.0.0.1:9/dicom-web",
                                 "--study", "1.2.3", "--out", str(tmp_path / "work"),
                                 "--checklist", str(other)])
    assert misfit.exit_code == 2, misfit.output
    assert "names none of these views" in misfit.output
    assert len(misfit.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_restart_with_a_checklist_rewrites_the_reports(predictor, study, tmp_path: Path):
    """Reports written without a checklist are rewritten from the stored results when the
    node restarts with one (state.json records it), and again when it is dropped."""
    need_tool("storescu")
    out = tmp_path / "out"
    with Listener(predictor, out, {"name": "sononet16"}, port=0) as node:
        assert storescu(node.port, [study["rle"]], "-xr").returncode == 0
        assert node.wait_idle(30)
    (sr,) = (out / "reports").glob("*/sr.dcm")
    assert "CHECKLIST" not in [i.ConceptNameCodeSequence[0].CodeValue
                               for i in dcmread(sr).ContentSequence]
    seed = load_checklist("seed4-planes")
    with Listener(predictor, out, {"name": "sononet16"}, port=0, checklist=seed) as node:
        assert node.wait_idle(30)
    assert node.stats.classified == 0 and node.stats.reports == 1  # nothing classified again
    assert len(checklist_rows(dcmread(sr))) == 4
    assert json.loads((out / "state.json").read_text())["checklist"] == "seed4-planes"
    with Listener(predictor, out, {"name": "sononet16"}, port=0) as node:
        assert node.wait_idle(30)
    assert node.stats.reports == 1 and "CHECKLIST" not in [
        i.ConceptNameCodeSequence[0].CodeValue for i in dcmread(sr).ContentSequence]


def test_report_writes_keep_to_their_share_while_instances_wait(predictor, tmp_path: Path,
                                                                 monkeypatch):
    """40 studies arriving interleaved, each quiet for a second between instances: while
    instances wait to be classified the reporter writes at most REPORT_SHARE of the time
    (the oldest news first); once nothing waits it writes every due study at once."""
    import time

    from fetalplanes.workflows.dicom_listen import REPORT_SHARE, StudyState

    node = Listener(predictor, tmp_path / "out", {"name": "sononet16"}, port=0)
    written: list[str] = []
    cost = 0.02

    def write(uid: str) -> None:
        time.sleep(cost)  # a report's write
        node._studies[uid].dirty = False
        written.append(uid)

    monkeypatch.setattr(node, "_write_study", write)
    now = time.time()
    for i in range(40):  # quiet for 2 s, results since 40-i s ago: oldest first
        node._studies[f"1.2.{i}"] = StudyState(dirty=True, dirty_since=now - 40 + i,
                                               last_received=now - 2)
    node._queue.put(object())  # an instance waits to be classified
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        node._write_reports()
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    assert 0 < len(written) * cost <= REPORT_SHARE * elapsed + cost
    assert written == [f"1.2.{i}" for i in range(len(written))]  # oldest first
    node._queue.get()
    node._queue.task_done()  # nothing waits any more: all the rest at once
    node._write_reports()
    assert sorted(written) == sorted(node._studies)
