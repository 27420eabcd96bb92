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
    """The CLI end to end: start, receive from storescu, SIGTERM, exit 0, results on disk,
    nothing identifying in its output."""
    need_tool("storescu")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fetalplanes", "listen", "--out", str(out), "--port", "0",
         "--verbose"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
    assert len(list((out / "reports").glob("*/sr.dcm"))) == 1
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
