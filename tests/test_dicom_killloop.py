"""Nothing acknowledged is lost: `listen` is SIGKILLed again and again while dcmtk's
storescu sends 200 instances; what was not acknowledged is sent again. Afterwards every
acknowledged instance is on disk and classified, nothing is duplicated and no partial file
is left. Kill moments are drawn from a seeded generator; correctness never depends on them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
from dicomfiles import real_frames, write_dicom
from dicomtools import need_tool
from pydicom import dcmread
from pydicom.uid import generate_uid

N_INSTANCES = 200
N_STUDIES = 4
MIN_KILLS = 10


def make_instances(folder: Path) -> list[Path]:
    """200 single-frame 96x72 grey instances from the real HC18 scans, in 4 studies."""
    frames = [np.asarray(f, np.uint8) for f in real_frames("hc18", 24, scale=8)]
    studies = [generate_uid() for _ in range(N_STUDIES)]
    return [write_dicom(folder / f"i{i:03d}.dcm", [frames[i % len(frames)]],
                        transfer_syntax="explicit", study_uid=studies[i % N_STUDIES])
            for i in range(N_INSTANCES)]


class Node:
    """`fetalplanes listen` as a subprocess on a free port."""

    def __init__(self, out: Path, log: Path):
        self.log = open(log, "a")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fetalplanes", "listen", "--out", str(out), "--port", "0",
             "--settle", "0.5"], stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        assert "listening as" in line, f"listen did not start: {line!r}"
        self.port = int(line.split(":")[-1].split(";")[0])

    def stop(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(120)
        self.log.close()


def pending(folder: Path) -> list[Path]:
    """Files not acknowledged yet: storescu +rn renames acknowledged ones X.done and failed
    ones X.bad; the failed ones get their name back to be sent again."""
    for bad in folder.glob("*.bad"):
        bad.rename(bad.with_suffix(""))
    return sorted(folder.glob("*.dcm"))


def send(port: int, files: list[Path]) -> subprocess.Popen:
    return subprocess.Popen(
        [need_tool("storescu"), "-aec", "FETALPLANES", "-xe", "+rn", "-nh", "-q",
         "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_results(out: Path, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = len(list((out / "results").glob("*/*.json")))
        if got >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_loop_loses_nothing_acknowledged(tmp_path: Path):
    need_tool("storescu")
    outbox, out = tmp_path / "outbox", tmp_path / "out"
    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p.name
            for p in make_instances(outbox)}
    rng = random.Random(19)
    kills = rounds = 0
    acked_at_kill: list[int] = []
    while pending(outbox) and kills < MIN_KILLS and rounds < 40:
        rounds += 1
        node = Node(out, tmp_path / "listen.log")
        before = N_INSTANCES - len(pending(outbox))
        sender = send(node.port, pending(outbox))
        target = before + rng.randint(2, 25)
        while N_INSTANCES - len(pending(outbox)) < target and sender.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.3)  # sometimes mid-write, mid-batch, mid-report
        node.stop(signal.SIGKILL)
        kills += 1
        sender.wait(60)
        acked_at_kill.append(N_INSTANCES - len(pending(outbox)))
    assert kills >= MIN_KILLS
    node = Node(out, tmp_path / "listen.log")  # restart: resend what was not acknowledged
    for _ in range(5):
        if not pending(outbox):
            break
        send(node.port, pending(outbox)).wait(300)
    assert not pending(outbox), "storescu could not deliver everything"
    assert wait_results(out, N_INSTANCES, 300) == N_INSTANCES
    node.stop(signal.SIGTERM)
    assert node.proc.returncode == 0

    acknowledged = {uid for uid, name in sent.items() if (outbox / f"{name}.done").exists()}
    assert acknowledged == set(sent)
    stored = {p.stem: p for p in (out / "instances").glob("*/*.dcm")}
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*/*.json")}
    assert set(stored) == set(results) == acknowledged  # on disk, classified, nothing else
    for uid, record in results.items():
        assert record["sop_instance_uid"] == uid
        assert len(record["predictions"]) == 1 and "error" not in record["predictions"][0]
    for uid in rng.sample(sorted(stored), 10):  # stored as sent
        src = dcmread(outbox / f"{sent[uid]}.done")
        assert dcmread(stored[uid]).PixelData == src.PixelData
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name.endswith(".part")]
    assert leftovers == [] and not list((out / ".incoming").iterdir())
    # one SR per study listing each of its instances exactly once (no duplicates)
    for study in (out / "reports").iterdir():
        sr = dcmread(study / "sr.dcm")
        groups = sr.ContentSequence[-1].ContentSequence
        refs = [item.ContentSequence[-1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for item in groups]
        assert sorted(refs) == sorted(p.stem for p in (out / "instances" / study.name).iterdir())
    final = [line for line in (tmp_path / "listen.log").read_text().splitlines()
             if "stopped:" in line]
    print(f"kill loop: {kills} SIGKILLs (acknowledged so far at each: {acked_at_kill}); "
          f"{len(acknowledged)} acknowledged, {len(stored)} stored, {len(results)} classified, "
          f"no duplicate, no partial file; last run {final[-1].split('stopped: ')[-1]}")
