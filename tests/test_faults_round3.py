"""Fault suite, round 3: decoders bounded by the data, nothing left out of a folder walk,
special files and broken run folders refused in one line, no raw control characters or
library warnings on the terminal.

Each kind is a fault a tester found (issue 22); docs/reliability.md lists them with the
behaviour before and after. Memory and time of the hostile DICOM files are measured in a
child process (peak RSS from ``getrusage(RUSAGE_CHILDREN)``): the test bounds the memory,
and never the time (it is only reported).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicomfiles import HOSTILE, hostile_dicom, real_frames
from PIL import Image
from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.errors import ImageError

#: Peak resident memory a child may reach on a hostile file (the tester's cases reached
#: 0.8 to 1.9 GB). A bare reader process needs about 60 MB, `predict sononet16` about 130.
PEAK_MB = 300
HAS_JPEGLS = importlib.util.find_spec("jpeg_ls") is not None or importlib.util.find_spec(
    "pyjpegls") is not None

#: kind -> what its one-line error says (None: the file is read, with a note at most).
DICOM_KINDS: dict[str, str | None] = {
    "jpeg-sof-12000": r"frame 0: its JPEG header says 12000x12000 pixels.*DICOM header says 64x64",
    "jpeg-ls-sof-12000": r"frame 0: its JPEG-LS header says 12000x12000",
    "rle-segments": r"frame 0: its RLE header lists 3 segments, but the DICOM header needs 1",
    "rle-overflow": r"frame 0: RLE segment 1 decodes to more than the 4,096 bytes",
    "frames-3m": r"NumberOfFrames is 3,000,000 but the pixel data holds only 1 fragment;",
    "frames-50": r"NumberOfFrames is 50 but the pixel data holds only 1 fragment;",
    "bot-short": r"NumberOfFrames is 50 but .* 1 Basic Offset Table offset;",
    "native-frames-3m": r"pixel data is truncated \(4,096 bytes, expected 12,288,000,000",
    "deflated-frames": r"pixel data is truncated",
    "frames-fraction": r"NumberOfFrames '2.5' is not a whole number",
    "region-inverted": None,
    "odd-values": None,
}
assert set(DICOM_KINDS) == set(HOSTILE)


def grey_frame() -> np.ndarray:
    return real_frames("hc18", 1, scale=4)[0]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every hostile DICOM kind, built from a real HC18 frame."""
    folder = tmp_path_factory.mktemp("hostile")
    frame = grey_frame()
    made = {}
    for kind in HOSTILE:
        if kind.startswith("jpeg-ls") and not HAS_JPEGLS:
            continue
        made[kind] = hostile_dicom(folder / f"{kind}.dcm", kind, frame)
    return made


def _file(hostile: dict[str, Path], kind: str) -> Path:
    if kind not in hostile:
        pytest.skip("no JPEG-LS encoder (pip install pyjpegls) to build this file")
    return hostile[kind]


# ------------------------------------------------------------------ DICOM: the reader


@pytest.mark.parametrize("kind", list(DICOM_KINDS))
def test_dicom_reader_is_bounded_by_the_data(hostile: dict[str, Path], kind: str) -> None:
    from fetalplanes.data.dicom import open_dicom

    path = _file(hostile, kind)
    needle = DICOM_KINDS[kind]
    if needle is None:
        dcm = open_dicom(path)
        frames = list(dcm.iter_frames())
        assert len(frames) == dcm.n_frames == 1 and frames[0][1].shape == (64, 64)
        assert all("\n" not in note for note in dcm.warnings)
        return
    with pytest.raises(ImageError) as info:
        dcm = open_dicom(path)
        list(dcm.iter_frames())
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert re.search(needle, message), message


def test_inverted_region_falls_back_to_the_guessed_crop(hostile: dict[str, Path]) -> None:
    from fetalplanes.data.dicom import open_dicom

    dcm = open_dicom(hostile["region-inverted"])
    assert dcm.regions and dcm.bmode_region() is None and dcm.spacing_mm() is None
    (note,) = dcm.warnings
    assert "region 1" in note and "(50,40)-(5,4)" in note and "inverted" in note


def test_region_partly_outside_the_frame_is_clipped(tmp_path: Path) -> None:
    from dicomfiles import write_dicom

    from fetalplanes.data.dicom import open_dicom

    frame = grey_frame()
    path = write_dicom(tmp_path / "r.dcm", [frame], transfer_syntax="explicit",
                       regions=[(5, 5, 5000, 60, 0.01, 0.01)])
    dcm = open_dicom(path)
    region = dcm.bmode_region()
    assert region is not None and not dcm.warnings
    assert (region.x0, region.y0, region.x1, region.y1) == (5, 5, dcm.columns - 1, 60)


def test_pydicom_warnings_become_notes(hostile: dict[str, Path]) -> None:
    """An odd value pydicom would warn about on stderr is a note on the file instead."""
    import warnings

    from fetalplanes.data.dicom import open_dicom

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping the reader fails the test
        dcm = open_dicom(hostile["odd-values"])
        dcm.frame(0)
    assert dcm.fps is None and any("FrameTime 'fast'" in n for n in dcm.warnings)


def test_frame_header_checks_cover_every_compressed_family() -> None:
    """The frame-header parsers on hand-made headers: J2K SIZ (no decoder installed here),
    a JPEG without a start of frame, a cut RLE table, and agreement passing."""
    import struct

    from fetalplanes.data.dicom import frame_problem

    siz = struct.pack(">HHIIIIIIIIH", 41, 0, 12000, 9000, 0, 0, 12000, 9000, 0, 0, 1) + b"\x07"
    j2k = b"\xff\x4f\xff\x51" + siz
    problem = frame_problem("1.2.840.10008.1.2.4.90", j2k, 64, 64, 1, 8)
    assert problem and "JPEG 2000 header says 12000x9000" in problem
    assert frame_problem("1.2.840.10008.1.2.4.90", j2k, 9000, 12000, 1, 8) is None
    assert "no JPEG frame header" in frame_problem(
        "1.2.840.10008.1.2.4.50", b"\xff\xd8\xff\xda\x00\x02", 64, 64, 1, 8)
    assert "cut short" in frame_problem("1.2.840.10008.1.2.5", b"\x01\x00", 64, 64, 1, 8)
    from fetalplanes.data import dicom, images

    assert dicom.MAX_PIXELS == images.MAX_PIXELS  # one pixel limit (no import between them)


# ------------------------------------------------------------------ DICOM: memory, in a child

_MEASURE = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    try:
        r = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=60)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = "timeout", "", ""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"rc": rc, "stdout": out, "stderr": err, "peak_mb": peak,
                      "seconds": time.perf_counter() - start}))
    """
)
_READ = textwrap.dedent(
    """
    import sys
    from fetalplanes.data.dicom import open_dicom
    from fetalplanes.errors import ImageError
    try:
        for _ in open_dicom(sys.argv[1]).iter_frames():
            pass
    except ImageError as exc:
        print(exc, file=sys.stderr)
    """
)


def measured(args: list[str]) -> dict[str, Any]:
    """Run `args` in a fresh child (through a small parent that waits for it) and return its
    exit code, stderr, peak RSS in MB and wall time; the 60 s limit only stops a hang."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DICOM_KINDS))
def test_hostile_dicom_reader_stays_small_in_a_child(hostile: dict[str, Path], kind: str) -> None:
    res = measured([sys.executable, "-c", _READ, str(_file(hostile, kind))])
    assert res["rc"] == 0, res
    assert res["peak_mb"] <= PEAK_MB, res
    lines = res["stderr"].splitlines()
    assert len(lines) == (0 if DICOM_KINDS[kind] is None else 1), res["stderr"]


@pytest.mark.slow
def test_predict_sononet16_on_hostile_dicom(hostile: dict[str, Path], tmp_path: Path) -> None:
    """`fetalplanes predict sononet16` on a folder of every hostile file and two good scans:
    one line per refused file, no library warning, the rest classified, memory bounded."""
    folder = tmp_path / "study"
    folder.mkdir()
    for path in hostile.values():
        (folder / path.name).write_bytes(path.read_bytes())
    for i, frame in enumerate(real_frames("hc18", 2, scale=4)):
        Image.fromarray(frame).save(folder / f"good_{i}.png")
    cmd = [sys.executable, "-m", "fetalplanes", "predict", "sononet16", str(folder), "-q",
           "--format", "json"]
    res = measured(cmd)
    assert res["rc"] == 0 and res["peak_mb"] <= PEAK_MB, res
    err = res["stderr"]
    for bad in ("Traceback", "Warning", "warn_and_log", "Please see"):
        assert bad not in err, err
    for kind, needle in DICOM_KINDS.items():
        if kind not in hostile:
            continue
        said = [line for line in err.splitlines() if f"/{kind}.dcm" in line]
        assert len(said) == (0 if needle is None else 1), (kind, said)
    rows = json.loads(res["stdout"])
    read = {Path(r["path"].split("#")[0]).name for r in rows if r.get("error") is None}
    assert {"good_0.png", "good_1.png", "region-inverted.dcm", "odd-values.dcm"} <= read


def test_inverted_region_does_not_stop_the_batch(hostile: dict[str, Path], tmp_path: Path,
                                                 tiny_run: Path) -> None:
    """The tester's case: an inverted region stopped `sort` (0 of 10 good scans sorted)."""
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(10):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64), np.uint8)).save(
            inp / f"good_{i}.png")
    (inp / "region.dcm").write_bytes(hostile["region-inverted"].read_bytes())
    r = CliRunner().invoke(app, ["sort", str(tiny_run), str(inp), str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 11 and not [row for row in rows if row.rstrip().endswith(".dcm:")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained seed-cnn at 32 px: loads in milliseconds; faults need no accuracy."""
    import torch

    from fetalplanes.data.preprocess import Preprocess
    from fetalplanes.models import create_model
    from fetalplanes.models.card import ModelCard
    from fetalplanes.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("tiny") / "run"
    classes = ["Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax"]
    net = create_model("seed-cnn", len(classes), pretrained=False, input_size=(32, 32))
    save_checkpoint(run, net, ModelCard("seed-cnn", classes, Preprocess(size=(32, 32))))
    return run




# ------------------------------------------------------------------ folder walks


def bare_dicom(path: Path, frame: np.ndarray) -> Path:
    """A DICOM data set written from byte 0 in implicit VR little endian: no preamble, no
    'DICM', no file meta (old exports and some PACS dumps), under an extension-less name."""
    import pydicom
    from dicomfiles import write_dicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(write_dicom(path.with_suffix(".tmp"), [frame], transfer_syntax="implicit"))
    path.with_suffix(".tmp").unlink()
    del ds.file_meta
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture()
def export(tmp_path: Path) -> Path:
    """A scanner export: DICOM without extensions (as in a DICOMDIR export), .dicom, .jfif
    and .gif files, a DICOMDIR, notes, hidden files and fetalplanes' own outputs."""
    from dicomfiles import write_dicom

    frame = grey_frame()
    folder = tmp_path / "export"
    (folder / "DICOM" / "ST000001").mkdir(parents=True)
    write_dicom(folder / "DICOM" / "ST000001" / "IM000001", [frame], transfer_syntax="explicit")
    bare_dicom(folder / "DICOM" / "ST000001" / "IM000002", frame)
    write_dicom(folder / "scan.dicom", [frame], transfer_syntax="jpeg-baseline")
    Image.fromarray(frame).save(folder / "scan.jfif", "JPEG")
    Image.fromarray(frame).save(folder / "scan.gif")
    dicomdir = write_dicom(folder / "x.dcm", [frame]).read_bytes()  # a DICOM file by content
    (folder / "DICOMDIR").write_bytes(dicomdir)
    (folder / "x.dcm").unlink()
    (folder / "notes.txt").write_text("patient moved; repeat the femur\n")
    # group 0008 at byte 0, but a first element of 9,999 bytes: not taken for DICOM
    (folder / "IM000003.bak").write_bytes(b"\x08\x00\x05\x00\x0f\x27\x00\x00" + bytes(200))
    (folder / ".DS_Store").write_bytes(b"\0" * 64)
    (folder / "predictions.csv").write_text("path,label\n")
    return folder


EXPORT_IMAGES = ["DICOM/ST000001/IM000001", "DICOM/ST000001/IM000002", "scan.dicom",
                 "scan.gif", "scan.jfif"]


def test_folder_walk_finds_dicom_by_content_and_names_every_skip(export: Path) -> None:
    from fetalplanes.data.images import list_images

    errors: list[str] = []
    found = list_images([export], errors=errors)
    assert sorted(str(p.relative_to(export)) for p in found) == EXPORT_IMAGES
    assert sorted(errors) == sorted([
        f"{export / 'DICOMDIR'}: a DICOMDIR index, not an image (its images are read from "
        "the folder)",
        f"{export / 'IM000003.bak'}: not an image or DICOM file",
        f"{export / 'notes.txt'}: not an image or DICOM file",
    ])
    assert found.skipped == errors and found.hidden == 2  # .DS_Store, predictions.csv


def test_predict_reads_the_export_and_says_what_it_skipped(export: Path, tiny_run: Path) -> None:
    r = CliRunner().invoke(app, ["predict", str(tiny_run), str(export), "--format", "json", "-q"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    rows = {str(Path(x["path"]).relative_to(export)): x for x in json.loads(r.stdout)}
    for name in ("DICOM/ST000001/IM000001", "scan.dicom", "scan.gif", "scan.jfif"):
        assert rows[name].get("error") is None and rows[name]["label"], rows[name]
    for skipped in ("notes.txt", "DICOMDIR", "IM000003.bak"):
        said = [line for line in r.stderr.splitlines() if f"/{skipped}:" in line]
        assert len(said) == 1 and said[0].startswith("skipped: "), r.stderr
    assert ".DS_Store" not in r.stderr and "predictions.csv" not in r.stderr


@pytest.mark.xfail(strict=False, reason="the decode side (data.images._sniff_dicom, owned by "
                   "another session) reads a DICOM without preamble only under a .dcm name")
def test_dicom_without_preamble_and_extension_is_read(tmp_path: Path) -> None:
    from fetalplanes.data.images import read_image

    path = bare_dicom(tmp_path / "IM000002", grey_frame())
    assert read_image(path).shape == grey_frame().shape
