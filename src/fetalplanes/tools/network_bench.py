"""`fetalplanes bench --only network`: the DICOM node measured over loopback.

Why: a Storage SCP must keep up with the scanners that send to it and run for weeks. This
starts `fetalplanes listen` as its own process, sends N ultrasound instances (800x540
JPEG Baseline scans rendered by `synth.render_phantom`, 50 per study) with dcmtk's storescu
over 127.0.0.1, and reports, per backend:

- frames/s received and classified: N frames / (first byte sent -> last result on disk);
- listen's memory (RSS and PSS of its process) after every quarter of the instances, and
  its growth from the first quarter to the end (flat = no leak);
- time from an instance's last byte to its study's SR on disk (p50, p95), measured by
  listen itself (OUT/stats.json): under that full load (storescu sends faster than the
  node classifies, so this is mostly time in the queue), and for one study of 50 sent at a
  scanner's pace (one association per instance, every 0.5 s) to an idle node.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from fetalplanes.console import progress as progress_bar
from fetalplanes.errors import FetalPlanesError
from fetalplanes.tools.bench import (
    BenchOptions,
    BenchReport,
    Row,
    _load,
    _rollup,
    machine_info,
    start_cli,
)
from fetalplanes.tools.native_tools import native_tool

PER_STUDY = 50
UNIQUE = 100  # distinct rendered scans; the others differ only in their UIDs
PACED_INTERVAL_S = 0.5  # a busy scanner: two images a second
#: dcmtk honours TCP_NODELAY=1 (no Nagle delay on its small command PDUs); without it each
#: instance waited ~40 ms for our delayed ACK and storescu itself capped the rate at
#: 15 instances/s on loopback, whatever the node did (measured: 300 instances in 20.1 s
#: without, 7.4 s with). Scanners' DICOM stacks set it; listen sets it on its side.
SENDER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def write_instances(folder: Path, n: int, progress: bool = True) -> list[Path]:
    """`n` single-frame Ultrasound Image Storage files, JPEG Baseline, 50 per study."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, UltrasoundImageStorage, generate_uid
    from tqdm import tqdm

    from fetalplanes.data.synth import SEED4, render_phantom

    rng = np.random.default_rng(0)
    jpegs = []
    for i in range(min(n, UNIQUE)):
        buf = io.BytesIO()
        Image.fromarray(render_phantom(SEED4[i % len(SEED4)], rng)).save(buf, "JPEG",
                                                                          quality=90)
        jpegs.append(buf.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    paths, study, series = [], "", ""
    for i in tqdm(range(n), desc="writing instances", unit="file", disable=not progress):
        if i % PER_STUDY == 0:
            study, series = generate_uid(), generate_uid()
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientName, ds.PatientID = "US", "BENCH^PATIENT", "BENCH"
        ds.PatientBirthDate = ds.PatientSex = ds.StudyDate = ds.StudyTime = ""
        ds.StudyID = ds.AccessionNumber = ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = 1, i % PER_STUDY + 1
        ds.Rows, ds.Columns, ds.SamplesPerPixel = 540, 800, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = encapsulate([jpegs[i % len(jpegs)]])
        ds["PixelData"].VR = "OB"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _start_listen(out: Path, backend: str) -> tuple[subprocess.Popen, int]:
    proc, line = start_cli(["listen", "sononet16", "--out", str(out), "--port", "0",
                            "--backend", backend, "--quiet"], "listening as", "listen")
    return proc, int(line.split(":")[-1].split(";")[0])


def _count(out: Path) -> int:
    return sum(1 for _ in (out / "results").glob("*/*.json"))


def measure(folder: Path, n: int, backend: str, progress: bool = True) -> list[Row]:
    """One backend: listen in a new process fed by storescu; see the module docstring."""
    storescu = native_tool("storescu")
    if storescu is None:
        raise FetalPlanesError("bench --only network needs dcmtk's storescu (apt install dcmtk)")
    out = folder / f"out-{backend}"
    proc, port = _start_listen(out, backend)
    marks = sorted({max(1, n * q // 4) for q in (1, 2, 3, 4)})
    rss: dict[int, tuple[float, float]] = {}
    try:
        t0 = time.perf_counter()
        sender = subprocess.Popen(
            [storescu, "-aec", "FETALPLANES", "-xy", "+sd", "-q", "127.0.0.1", str(port),
             str(folder / "in")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=SENDER_ENV)
        done = 0
        bar = progress_bar(total=n, desc=f"{backend}: classified", unit="instance",
                           disable=not progress)
        deadline = time.monotonic() + max(600.0, n)
        while done < n and time.monotonic() < deadline:
            time.sleep(0.25)
            done = _count(out)
            for m in marks:
                if done >= m and m not in rss:
                    r, p = _rollup(proc.pid)
                    rss[m] = (r / 1024, p / 1024)
            bar.update(done - bar.n)
        wall = time.perf_counter() - t0
        bar.close()
        _, err = sender.communicate(timeout=60)
        if sender.returncode != 0 or done < n:
            raise FetalPlanesError(f"bench: storescu -> listen did not finish ({done}/{n}; "
                                   f"{(err or '').strip()[-200:]})")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    stats = json.loads((out / "stats.json").read_text())
    engine = f"{backend}/cpu"
    first, last = rss[marks[0]], rss[marks[-1]]
    rows = [
        Row(f"network_{backend}_frames_s", "storescu -> listen, received + classified",
            engine, 1, n / wall, "frames/s", f"{n} instances over loopback"),
        Row(f"network_{backend}_rss_mb", f"listen RSS after {n} instances", engine, "-",
            last[0], "MB", "after " + ", ".join(f"{m}: {rss[m][0]:.0f}" for m in marks)),
        Row(f"network_{backend}_pss_mb", f"listen PSS after {n} instances", engine, "-",
            last[1], "MB", ""),
        Row(f"network_{backend}_rss_growth_mb", "listen RSS growth", engine, "-",
            last[0] - first[0], "MB", f"from {marks[0]} to {marks[-1]} instances"),
    ]
    for q in ("p50", "p95"):
        key = f"latency_{q}_s"
        if key in stats:
            rows.append(Row(f"network_{backend}_sr_latency_{q}_s",
                            f"last byte -> study SR on disk, {q}", engine, "-", stats[key],
                            "s", f"{stats.get('reports', 0)} SR writes"))
    return rows


def paced_latency(folder: Path, backend: str, interval: float = PACED_INTERVAL_S) -> list[Row]:
    """Last byte -> SR when instances come at a scanner's pace (one study of 50, one
    association each, `interval` apart) to an idle node: what a sonographer waits."""
    storescu = native_tool("storescu") or "storescu"
    files = sorted((folder / "paced").glob("*.dcm"))
    out = folder / f"paced-{backend}"
    proc, port = _start_listen(out, backend)
    try:
        for f in files:
            started = time.monotonic()
            subprocess.run([storescu, "-aec", "FETALPLANES", "-xy", "-q", "127.0.0.1",
                            str(port), str(f)], check=True, timeout=60, env=SENDER_ENV)
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
        deadline = time.monotonic() + 300
        while _count(out) < len(files) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    stats = json.loads((out / "stats.json").read_text())
    return [Row(f"network_{backend}_paced_sr_latency_{q}_s",
                f"last byte -> study SR on disk, {q}, 1 instance per {interval:g} s",
                f"{backend}/cpu", "-", stats[f"latency_{q}_s"], "s",
                f"{len(files)} instances, one study")
            for q in ("p50", "p95") if f"latency_{q}_s" in stats]


def network_rows(tmp: Path, n: int, backends: tuple[str, ...] = ("onnx-int8", "onnx"),
                 progress: bool = True) -> list[Row]:
    write_instances(tmp / "in", n, progress=progress)
    write_instances(tmp / "paced", PER_STUDY, progress=False)
    rows: list[Row] = []
    for backend in backends:
        rows += measure(tmp, n, backend, progress=progress)
        rows += paced_latency(tmp, backend)
    return rows


def run_network(opts: BenchOptions, progress: bool = True) -> BenchReport:
    """Only the network rows (`fetalplanes bench --only network`), with machine and load."""
    started, load_start = time.perf_counter(), _load()
    report = BenchReport(machine_info("cpu"), asdict(opts))
    n = opts.images or (40 if opts.quick else 2000)
    with tempfile.TemporaryDirectory(prefix="fetalplanes-bench-") as tmp:
        report.rows = network_rows(Path(tmp), n, progress=progress)
    report.load_average = {"start": load_start, "end": _load()}
    report.seconds = time.perf_counter() - started
    return report
