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
import os
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


def test_dicom_without_preamble_and_extension_is_read(tmp_path: Path) -> None:
    from fetalplanes.data.images import read_image

    path = bare_dicom(tmp_path / "IM000002", grey_frame())
    assert read_image(path).shape == grey_frame().shape


# ------------------------------------------------------------------ special files: never waited on


def no_hang(call: Any, fifos: list[Path], seconds: float = 20) -> Any:
    """`call()` in a thread; if it is still running after `seconds` (blocked on a FIFO),
    open the FIFOs' other ends so it can finish, then fail the test."""
    import threading

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # raised again in the test's thread
            box["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=seconds)
    hung = worker.is_alive()
    if hung:
        for fifo in fifos:
            os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        worker.join(timeout=30)
    assert not hung, f"blocked on a FIFO: {fifos}"
    if "error" in box:
        raise box["error"]
    return box["result"]


def cli(*args: Any) -> Any:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def one_error(r: Any, code: int = 2) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def labelled(folder: Path, names: list[str]) -> Path:
    """A seed-layout data set: images/NAME for each name, labels written by the caller."""
    (folder / "images").mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64), np.uint8)).save(
            folder / "images" / name, "PNG")
    return folder


CLASSES = ["Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax"]


def test_data_check_with_a_fifo_as_label_file(tmp_path: Path) -> None:
    data = labelled(tmp_path / "data", ["a.png"])
    os.mkfifo(data / "image_label.csv")
    r = no_hang(lambda: cli("data", "check", data), [data / "image_label.csv"])
    assert "image_label.csv: not a regular file but a named pipe" in one_error(r)
    r = no_hang(lambda: cli("data", "check", data, "--labels", data / "image_label.csv"),
                [data / "image_label.csv"])
    assert "named pipe" in one_error(r)


def test_label_csv_in_windows_1252_loses_no_file(tmp_path: Path) -> None:
    """Excel on Western Windows writes € and – as 0x80 and 0x96; read as Latin-1 they were
    control codes and the files were not found."""
    names = ["coût 5€ scan.png", "fémur – vue 2.png", "thorax.png", "abdomen.png"]
    data = labelled(tmp_path / "data", names)
    rows = ["Image_name,Plane"] + [f"{n},{CLASSES[i]}" for i, n in enumerate(names)]
    (data / "image_label.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode("cp1252"))
    r = cli("data", "check", data)
    assert r.exit_code == 0, r.output
    assert "4 images" in r.stdout and "missing" not in r.stdout.lower(), r.stdout
    (line,) = [x for x in r.stderr.splitlines() if "warning" in x]
    assert "image_label.csv" in line and "read as Windows-1252" in line


def test_sort_journal_that_is_a_fifo(tmp_path: Path, tiny_run: Path) -> None:
    inp, out = labelled(tmp_path / "in", ["a.png", "b.png"]) / "images", tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "predictions.csv")
    r = no_hang(lambda: cli("sort", tiny_run, inp, out, "-q"), [out / "predictions.csv"])
    line = one_error(r)
    assert "predictions.csv: the sort journal is a named pipe (FIFO), not a file" in line
    assert not list(out.glob("*/*.png"))  # nothing copied


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_sort_lock_that_is_not_a_file(tmp_path: Path, tiny_run: Path, kind: str) -> None:
    inp, out = labelled(tmp_path / "in", ["a.png"]) / "images", tmp_path / "out"
    out.mkdir()
    lock = out / ".fetalplanes-sort.lock"
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    r = no_hang(lambda: cli("sort", tiny_run, inp, out, "-q"), [] if kind == "folder" else [lock])
    line = one_error(r)
    what = "a folder" if kind == "folder" else "a named pipe (FIFO)"
    assert line == f"error: {lock}: the sort lock is {what}, not a file; remove it", line


def test_open_file_refuses_special_files_without_blocking(tmp_path: Path) -> None:
    from fetalplanes.data.images import open_file
    from fetalplanes.errors import FetalPlanesError

    os.mkfifo(tmp_path / "pipe")
    for flags in (os.O_RDONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_CREAT):
        with pytest.raises(FetalPlanesError, match="pipe: not a regular file but a named pipe"):
            no_hang(lambda f=flags: open_file(tmp_path / "pipe", f), [tmp_path / "pipe"])
    with pytest.raises(ImageError, match="the journal is a character device, not a file"):
        open_file("/dev/null", os.O_RDONLY, what="journal")
    fd = open_file(tmp_path / "new.txt", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    assert (tmp_path / "new.txt").is_file()


# ------------------------------------------------------------------ run folders


@pytest.fixture()
def run(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run to break."""
    import shutil

    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.fixture()
def scans(tmp_path: Path) -> Path:
    return labelled(tmp_path / "scans", ["a.png", "b.png"]) / "images"


def edit_card(run: Path, **changes: Any) -> None:
    card = json.loads((run / "model.json").read_text())
    card.update(changes)
    (run / "model.json").write_text(json.dumps(card))


def add_bank(run: Path, dim: int, sidecar_dim: int | None) -> Path:
    """A feature bank of `dim`-value rows and the knn rule naming it (with `feature_dim` in
    the sidecar as training writes it, unless None)."""
    from fetalplanes.inference.rejection import BANK_FILE, make_bank, save_bank

    save_bank(run, make_bank(np.random.default_rng(0).normal(size=(20, dim)).astype(np.float32)))
    rule = {"method": "knn", "threshold": 0.5, "k": 1, "bank": BANK_FILE}
    if sidecar_dim is not None:
        rule["feature_dim"] = sidecar_dim
    edit_card(run, rejection=rule)
    return run / BANK_FILE


def model_dim(run: Path) -> int:
    from fetalplanes.inference.rejection import feature_dim
    from fetalplanes.models.checkpoint import load_checkpoint

    model, card = load_checkpoint(run)
    return feature_dim(model, card.preprocess.size)


def test_weights_with_nan_are_refused(run: Path, scans: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "weights.safetensors"))
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first][0] = float("nan")
    save_file(state, str(run / "weights.safetensors"))
    line = one_error(cli("predict", run, scans, "-q"))
    assert line.startswith(f"error: {run / 'weights.safetensors'}: ") and "NaN" in line, line
    assert first in line


def test_weights_file_with_nan_for_a_pretrained_model(tmp_path: Path, scans: Path) -> None:
    import torch

    weights = tmp_path / "sononet.pth"
    torch.save({"w": torch.tensor([1.0, float("inf")])}, weights)
    line = one_error(cli("predict", "--model", "sononet16", "--weights", weights, scans, "-q"))
    assert line.startswith(f"error: {weights}: ") and "NaN or infinite" in line, line


@pytest.mark.parametrize("sidecar_dim", [True, False], ids=["dim in sidecar", "no dim"])
def test_feature_bank_of_another_dimension(run: Path, scans: Path, sidecar_dim: bool) -> None:
    dim = model_dim(run)
    bank = add_bank(run, dim + 3, dim if sidecar_dim else None)
    line = one_error(cli("predict", run, scans, "-q"))
    assert line.startswith(f"error: {bank}: feature bank rows have {dim + 3} values, but the "
                           f"model gives {dim}-value features"), line


def test_feature_bank_checked_against_the_model(run: Path) -> None:
    from fetalplanes.errors import CheckpointError
    from fetalplanes.inference.rejection import load_knn
    from fetalplanes.models.checkpoint import load_checkpoint

    dim = model_dim(run)
    add_bank(run, dim + 1, None)
    model, card = load_checkpoint(run)
    with pytest.raises(CheckpointError, match=f"rows have {dim + 1} values.*gives {dim}-value"):
        load_knn(run, card.rejection, model, card.preprocess.size)
    add_bank(run, dim, dim)
    assert load_knn(run, card.rejection, model, card.preprocess.size) is not None


def test_unknown_architecture_names_the_sidecar(run: Path, scans: Path) -> None:
    edit_card(run, architecture={"name": "resnet9000", "num_classes": 4, "in_chans": 1})
    line = one_error(cli("predict", run, scans, "-q"))
    assert line.startswith(f"error: {run / 'model.json'}: unknown model 'resnet9000'"), line


def test_class_lists_are_bounded_before_anything_is_built(run: Path, scans: Path) -> None:
    from fetalplanes.errors import CheckpointError
    from fetalplanes.models.card import load_card

    names = [f"plane {i}" for i in range(1_000_000)]
    edit_card(run, classes=names, architecture={"name": "seed-cnn", "num_classes": len(names)})
    with pytest.raises(CheckpointError, match=r"model.json: 1,000,000 class names; at most 1,000"):
        load_card(run)  # at once: the repeat check was quadratic and never ended
    edit_card(run, classes=["x" * 201, "b", "c", "d"],
              architecture={"name": "seed-cnn", "num_classes": 4})
    line = one_error(cli("predict", run, scans, "-q"))
    assert "model.json: a class name of 201 characters; at most 200" in line, line


@pytest.mark.slow
def test_huge_architecture_is_refused_before_allocation(run: Path, scans: Path) -> None:
    """A sidecar naming a 1-billion-parameter timm model (4 GB of weights): refused from its
    parameter count on the meta device, with no more memory than importing torch and timm."""
    timm = pytest.importorskip("timm")
    assert timm.is_model("vit_giant_patch14_224")
    edit_card(run, architecture={"name": "vit_giant_patch14_224", "num_classes": 4,
                                 "in_chans": 1})
    base = measured([sys.executable, "-c", "import torch, timm, fetalplanes.cli"])
    res = measured([sys.executable, "-m", "fetalplanes", "predict", str(run), str(scans), "-q"])
    lines = res["stderr"].splitlines()
    assert res["rc"] == 2 and len(lines) == 1, res
    assert lines[0].startswith(f"error: {run / 'model.json'}: architecture vit_giant_patch14_224 "
                               "has 1,0"), lines
    assert "over the 200,000,000" in lines[0]
    assert res["peak_mb"] <= base["peak_mb"] + PEAK_MB, (res, base)


def test_parameter_count_on_the_meta_device_matches_the_real_model() -> None:
    from fetalplanes.models import create_model
    from fetalplanes.models.registry import parameter_count

    for name, size in (("seed-cnn", (32, 32)), ("sononet16", None)):
        real = create_model(name, 4, pretrained=False, input_size=size)
        assert parameter_count(name, 4, size) == sum(p.numel() for p in real.parameters())


# ------------------------------------------------------------------ the terminal

#: A file name that sets the terminal title, rings the bell, clears the screen (CSI as ESC [
#: and as the C1 byte 0x9b), deletes, fakes a second line and reverses the text after it.
EVIL = "\x1b]0;pwned\x07scan\x1b[2J\x9b2J\x7f\nerror: fake\u202egnp.png"
ESCAPED = "\\x1b]0;pwned\\x07scan\\x1b[2J\\x9b2J\\x7f\\x0aerror: fake\\u202egnp.png"


def raw_controls(text: str) -> list[str]:
    return sorted({c for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F
                   or c == "\u202e"})


def test_safe_text_escapes_every_control_character() -> None:
    from fetalplanes.cli.common import printable
    from fetalplanes.console import safe_text

    assert safe_text(EVIL) == printable(EVIL) == ESCAPED
    assert safe_text("échographie\tfœtale 胎儿 😀") == "échographie\tfœtale 胎儿 😀"
    undecodable = b"scan\xff.png".decode("utf-8", "surrogateescape")
    assert safe_text(undecodable) == "scan\\xff.png"


def test_names_with_escape_sequences_reach_the_terminal_escaped(tmp_path: Path, tiny_run: Path,
                                                                scans: Path) -> None:
    (scans / f"{EVIL}.txt").write_text("not an image")  # named by the folder walk
    r = cli("predict", tiny_run, scans, "-q", "--format", "csv")
    assert r.exit_code == 0 and f"skipped: {scans}/{ESCAPED}.txt: not an image" in r.stderr
    assert not raw_controls(r.stderr), r.stderr
    r = cli("predict", tmp_path / EVIL, scans, "-q")  # a run folder that is not there
    assert not raw_controls(r.stderr) and ESCAPED in one_error(r), r.stderr
    (scans / f"{EVIL}.txt").unlink()
    (scans / EVIL).write_bytes(b"not an image either")
    r = cli("sort", tiny_run, scans, tmp_path / "out", "-q")  # failures summed up at the end
    said = [line for line in r.stderr.splitlines() if "pwned" in line]
    assert said and not raw_controls("\n".join(said)), r.stderr


def test_predict_per_file_errors_escape_names(tiny_run: Path, scans: Path) -> None:
    (scans / EVIL).write_bytes(b"not an image")
    r = cli("predict", tiny_run, scans, "-q", "--format", "csv")
    assert not raw_controls(r.stderr), r.stderr
