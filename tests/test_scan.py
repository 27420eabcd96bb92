"""`fetalplanes scan` and `fetalplanes deid`: temporal smoothing, segments and best frames (with a
predictor that reads its answers from the pixels), then the real thing: zero-shot SonoNet-16 on
an MP4, a DICOM cine and a folder of frames built from real screen captures in a known order.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import shared_dir
from dicomfiles import IDENTIFIERS, PATIENT_NAME
from PIL import Image
from test_video import PLANE_OF, nearest, region_of, segments, sweep, write_cine, write_clip
from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.data.crop import to_gray
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.data.sources import Item, open_source
from fetalplanes.data.sources import Source as FrameSource
from fetalplanes.errors import FetalPlanesError, ImageError
from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import NOT_TARGET, Prediction, columns
from fetalplanes.workflows.scan import (
    ScanLimitError,
    ScanResult,
    Timeline,
    measure_scan_fps,
    plane_filename,
    scan,
    scan_path,
    timeline_columns,
    write_scan,
)

pytestmark = pytest.mark.slow  # real-frame, subprocess or timing tests: CI lane

runner = CliRunner()
CLASSES = ["A", "B", NOT_TARGET]


# ------------------------------------------------------------------ a predictor that reads pixels
class ListSource(FrameSource):
    """In-memory frames (frame i is filled with the value i, plus a pattern of its own)."""

    kind = "test"

    def __init__(self, n: int, fps: float = 10.0, known_length: bool = True,
                 fail_at: int | None = None):
        super().__init__("sweep.avi", fps, n if known_length else None)
        self.n, self.fail_at = n, fail_at

    def items(self, every: int = 1) -> Iterator[Item]:
        for i in range(0, self.n, every):
            if i == self.fail_at:
                raise ImageError(f"{self.name}: cannot decode frame {i}")
            frame = np.full((20, 30), i, np.uint8)
            frame[i % 20, :] = 255 - i  # makes every frame's full-size pixels unique
            yield Item(self.item_name(i), i, i / self.fps, pixels=frame)


class CodedPredictor(Predictor):
    """The engine with a network that answers from a table: frame i (its pixel value) ->
    (label, confidence, rejected by the per-frame rule). The rest of the probability is
    shared by the other classes."""

    pp = Preprocess(size=(4, 4), crop=False)
    output_classes = CLASSES  # type: ignore[assignment]
    min_confidence = 0.5

    def __init__(self, table: Sequence[tuple[str, float, bool]]):
        self.table = list(table)
        self.batches: list[int] = []
        self.backend = None  # type: ignore[assignment]  # no worker model: classify below

    def classify(self, items: Any, batch: Any, keep_outputs: bool = False) -> list[Prediction]:
        """The engine's classify step with the table as the network."""
        assert not batch.failures
        preds = self.predict_prepared(batch.arrays, [it.name for it in items])
        for item, pred in zip(items, preds, strict=True):
            pred.frame, pred.time_s = item.frame, item.time_s
        return preds

    def predict_prepared(self, pixels: np.ndarray, names: Sequence[str]) -> list[Prediction]:
        self.batches.append(len(pixels))
        out = []
        for px, name in zip(pixels, names, strict=True):
            assert px.shape == (4, 4)  # the model input, not the frame
            label, conf, rejected = self.table[int(np.median(px))]
            rest = (1 - conf) / (len(CLASSES) - 1)
            probs = {c: conf if c == label else rest for c in CLASSES}
            nt = rejected or label == NOT_TARGET
            out.append(Prediction(name, label=NOT_TARGET if nt else label, confidence=conf,
                                  probs=probs, not_target=nt,
                                  uncertain=not nt and conf < self.min_confidence))
        return out


def run(table: Sequence[tuple[str, float, bool]], **kw: object) -> ScanResult:
    source = ListSource(len(table))
    return scan(CodedPredictor(table), source, **kw)  # type: ignore[arg-type]


def smoothed(result: ScanResult) -> str:
    """One character per scanned frame: the smoothed label, '.' rejected, '?' uncertain."""
    return "".join("." if r.not_target else "?" if r.uncertain else r.label for r in result.rows)


def spans(result: ScanResult) -> list[tuple[str, int, int]]:
    return [(s.plane, s.start, s.end) for s in result.segments]


A, B = ("A", 0.9, False), ("B", 0.9, False)


def test_one_frame_flicker_is_smoothed_away() -> None:
    table = [A] * 6 + [B] + [A] * 6
    assert smoothed(run(table)) == "A" * 13
    assert spans(run(table)) == [("A", 0, 12)]
    raw = run(table, window=1)  # no smoothing: the flicker splits the plane
    assert smoothed(raw) == "AAAAAABAAAAAA"
    assert spans(raw) == [("A", 0, 5), ("B", 6, 6), ("A", 7, 12)]
    assert raw.found == ["A", "B"] and raw.missing == []


def test_most_of_a_window_rejected_rejects_the_frame_and_best_frames_skip_them() -> None:
    rejected = ("A", 0.99, True)  # confident, but the per-frame rule says not a target plane
    table = [("A", 0.8, False)] * 13
    table[5:8] = [rejected] * 3
    table[2], table[10] = ("A", 0.85, False), ("A", 0.9, False)
    result = run(table)
    assert smoothed(result) == "AAAAA...AAAAA"  # frames 4 and 8 see 2 of 5 rejected: kept
    assert spans(result) == [("A", 0, 4), ("A", 8, 12)]
    best = result.best["A"]
    assert (best.frame, best.confidence) == (10, pytest.approx(0.9))
    assert [s.best.frame for s in result.segments] == [2, 10]


def test_best_frame_keeps_the_original_pixels_and_segments_follow_the_labels() -> None:
    table = [A] * 5 + [("B", 0.8, False)] * 2 + [("B", 0.95, False)] + [("B", 0.8, False)] * 4
    result = run(table)
    assert smoothed(result) == "AAAAABBBBBBB"
    assert spans(result) == [("A", 0, 4), ("B", 5, 11)]
    best = result.best["B"]
    assert best.frame == 7 and best.time_s == pytest.approx(0.7)
    frame = dict((i, f) for i, _, f in ListSource(12).frames())[7]
    assert best.pixels is not None and np.array_equal(best.pixels, frame)  # 20x30, not 4x4
    png = Image.open(io.BytesIO(best.png()))
    assert np.array_equal(np.asarray(png), frame)
    assert all(s.best.pixels is None for s in result.segments)  # one frame per plane is kept


def test_uncertain_frames_do_not_make_a_segment() -> None:
    table = [A] * 4 + [("B", 0.45, False)] * 6 + [A] * 4
    result = run(table)
    assert smoothed(result) == "AAAAA????AAAAA"  # edges: 2 confident A outweigh 3 weak B
    assert result.found == ["A"] and result.missing == ["B"]


def test_streaming_results_do_not_depend_on_batch_size_or_workers() -> None:
    rng = np.random.default_rng(3)
    table = [(str(rng.choice(CLASSES)), float(rng.uniform(0.4, 1)), bool(rng.random() < 0.2))
             for _ in range(40)]
    reference = run(table, batch_size=1)
    for size, workers in ((3, 1), (16, 1), (64, 1), (3, 2), (5, 3)):
        other = run(table, batch_size=size, workers=workers)  # batches at once, in order
        assert smoothed(other) == smoothed(reference)
        assert spans(other) == spans(reference)
        assert [r.probs for r in other.rows] == [r.probs for r in reference.rows]


def test_the_timeline_sink_one_result_at_a_time_is_scan() -> None:
    """`Timeline.push` (what live sessions use) gives scan's rows, segments and best frames;
    rows become final window // 2 results late; `best` includes the open segment."""
    table = [A] * 4 + [("B", 0.8, False), ("B", 0.95, False)] + [("B", 0.8, False)] * 4
    reference = run(table)
    predictor = CodedPredictor(table)
    timeline = Timeline(CLASSES, predictor.min_confidence, window=5, fps=10.0,
                        keep_rows=False)
    emitted: list[list[int]] = []
    best_seen: list[dict[str, int]] = []
    for result in predictor.stream(ListSource(len(table)).items(), workers=0, batch_size=1):
        emitted.append([r.frame for r in timeline.push(result.item, result.prediction)])
        best_seen.append({p: b.frame for p, b in timeline.best.items()})
    assert emitted == [[], [], *([i] for i in range(len(table) - 2))]  # two results late
    last = timeline.flush()
    assert [r.frame for r in last] == [len(table) - 2, len(table) - 1]
    assert timeline.rows == [] and timeline.emitted == len(table)  # keep_rows=False
    assert best_seen[7] == {"A": 0, "B": 5}  # B's segment is still open: its best so far
    assert [(s.plane, s.start, s.end) for s in timeline.segments] == spans(reference)
    assert {p: b.frame for p, b in timeline.best.items()} == \
        {p: b.frame for p, b in reference.best.items()}
    with pytest.raises(FetalPlanesError, match="flushed"):
        timeline.push(Item("x", 99), Prediction("x", label="A", confidence=1.0))


def test_every_k_scans_those_frames_at_their_time() -> None:
    predictor = CodedPredictor([A] * 30)
    result = scan(predictor, ListSource(30), every=4, batch_size=3)  # type: ignore[arg-type]
    assert [r.frame for r in result.rows] == list(range(0, 30, 4))
    assert [r.time_s for r in result.rows] == pytest.approx([i / 10 for i in range(0, 30, 4)])
    assert predictor.batches == [3, 3, 2]
    assert result.duration_s == pytest.approx(3.2) and result.segments[0].end == 28


def test_bad_parameters_and_limits_are_one_line() -> None:
    table = [A] * 10
    for kw, match in (({"window": 4}, "odd"), ({"every": 0}, "every"),
                      ({"batch_size": 0}, "batch")):
        with pytest.raises(FetalPlanesError, match=match):
            run(table, **kw)
    with pytest.raises(ScanLimitError, match="more than 5 frames"):
        run(table, max_frames=5)
    unknown = ListSource(10, known_length=False)  # counted while streaming instead
    with pytest.raises(ScanLimitError, match="every K-th"):
        scan(CodedPredictor(table), unknown, max_frames=5)  # type: ignore[arg-type]
    assert len(run(table, every=2, max_frames=5).rows) == 5


def test_a_decode_error_in_the_reader_thread_reaches_the_caller() -> None:
    source = ListSource(40, fail_at=25)
    with pytest.raises(ImageError, match=r"sweep\.avi: cannot decode frame 25"):
        scan(CodedPredictor([A] * 40), source)  # type: ignore[arg-type]


def test_timeline_csv_is_the_result_schema_plus_time_and_smoothing(tmp_path: Path) -> None:
    result = run([A] * 4 + [B] * 4)
    write_scan(result, tmp_path)
    with (tmp_path / "timeline.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    header = reader.fieldnames
    assert header == timeline_columns(CLASSES)
    assert header[: len(columns(CLASSES))] == columns(CLASSES)  # the result schema, time in it
    assert header[:3] == ["path", "frame", "time_s"]
    assert {"p_A", "p_B", "p_not_target", "rejection_score", "smoothed_label",
            "smoothed_p_A"} <= set(header)
    assert [r["frame"] for r in rows] == [str(i) for i in range(8)]
    assert rows[1]["path"] == "sweep.avi#frame=1" and rows[1]["time_s"] == "0.100000"
    assert rows[0]["label"] == "A" and float(rows[0]["p_A"]) == pytest.approx(0.9)
    assert [r["smoothed_label"] for r in rows] == ["A"] * 4 + ["B"] * 4
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["A.png", "B.png"]
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plane_file_names_are_safe() -> None:
    assert plane_filename("Fetal abdomen") == "Fetal_abdomen.png"
    assert plane_filename("../trans-thalamic/x") == "trans-thalamic_x.png"
    assert plane_filename("...") == "plane.png"


# ------------------------------------------------------------------ SonoNet-16 on real sweeps
@pytest.fixture(scope="module")
def weights() -> Path:
    path = shared_dir() / "sononet" / "SonoNet16.pth"
    if not path.is_file():
        pytest.skip(f"SonoNet weights not found at {path}: shared/ data is absent "
                    "(set FETALPLANES_SHARED)")
    return path


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The sweep of test_video: MP4 with all four planes; DICOM cine (20 fps, region,
    fake patient) that stops before the thorax; a folder of its PNG frames."""
    frames, names = sweep()
    folder = tmp_path_factory.mktemp("real-sweep")
    (folder / "frames").mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / "frames" / f"f{i}.png", compress_level=1)
    n_cine = segments(names)["Fetal thorax"][0]  # the cine ends before the 4CH frames
    return {"frames": frames, "names": names, "clip": write_clip(folder, frames),
            "cine": write_cine(folder, frames[:n_cine]), "folder": folder / "frames",
            "n_cine": n_cine}


def scan_cli(weights: Path, *args: object) -> str:
    r = runner.invoke(app, ["scan", "--model", "sononet16", "--weights", str(weights), "-q",
                            *map(str, args)])
    assert r.exit_code == 0, r.output
    return r.stdout


def label_runs(labels: list[str]) -> dict[str, tuple[int, int]]:
    """Plane -> (first, last) index of its (single) run in a per-frame label list."""
    out: dict[str, tuple[int, int]] = {}
    for i, label in enumerate(labels):
        if label != NOT_TARGET:
            assert label not in out or out[label][1] == i - 1, f"{label} split at {i}"
            out[label] = (out.get(label, (i, i))[0], i)
    return out


def best_frames(stdout: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"found ([^:]+):.*best frame (\d+)", stdout)}


def check_segments(found: dict[str, tuple[int, int]], expected: dict[str, tuple[int, int]]
                   ) -> None:
    assert set(found) == set(expected)
    for plane, (start, end) in expected.items():
        got = found[plane]
        assert abs(got[0] - start) <= 2 and abs(got[1] - end) <= 2, (plane, got, (start, end))


def test_scan_mp4_finds_each_plane_and_its_best_frame(weights: Path, real: dict,
                                                      tmp_path: Path) -> None:
    frames, names = real["frames"], real["names"]
    out = tmp_path / "out"
    stdout = scan_cli(weights, real["clip"], "--out", out)
    expected = segments(names)
    assert "missing: none" in stdout and "at 25 fps" in stdout
    with (out / "timeline.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(frames)
    check_segments(label_runs([r["smoothed_label"] for r in rows]), expected)
    best = best_frames(stdout)
    assert set(best) == set(expected)
    gray = [to_gray(f) for f in frames]
    for plane, index in best.items():
        png = np.asarray(Image.open(out / "best" / plane_filename(plane)))
        assert png.shape == gray[0].shape  # the decoded frame, not the 224x288 model input
        match, diff = nearest(png, gray)
        assert match == index and diff < 6  # it is that frame (mp4v is lossy) ...
        assert PLANE_OF[names[index]] == plane  # ... and one of that plane's source frames
        assert f"found {plane}: " in stdout
    assert (out / "timeline.png").stat().st_size > 10_000


def test_scan_dicom_cine_crops_reports_spacing_and_missing_planes(
    weights: Path, real: dict, tmp_path: Path
) -> None:
    frames, names, n = real["frames"], real["names"], real["n_cine"]
    out = tmp_path / "cine-out"
    stdout = scan_cli(weights, real["cine"], "--out", out)
    assert "missing: Fetal thorax" in stdout and "at 20 fps" in stdout
    assert "pixel spacing 0.25 x 0.3 mm" in stdout
    with (out / "timeline.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and {r["pixel_spacing_mm"] for r in rows} == {"0.25x0.3"}
    assert rows[3]["time_s"] == "0.150000" and rows[3]["path"].endswith("cine.dcm#frame=3")
    expected = segments(names[:n])
    check_segments(label_runs([r["smoothed_label"] for r in rows]), expected)
    regions = [to_gray(region_of(f)) for f in frames[:n]]
    for plane, index in best_frames(stdout).items():
        png = np.asarray(Image.open(out / "best" / plane_filename(plane)))
        assert png.shape == regions[0].shape == (660, 821)  # cropped to the B-mode region
        match, diff = nearest(png, regions)
        assert match == index and diff < 3 and PLANE_OF[names[index]] == plane
    # nothing of the patient anywhere: stdout, file names, CSV
    text = stdout + (out / "timeline.csv").read_text()
    text += " ".join(str(p.relative_to(out)) for p in out.rglob("*"))
    for ident in IDENTIFIERS:
        assert ident not in text and ident.split("^")[0] not in text, ident


def test_scan_folder_of_frames_best_frames_are_exactly_source_frames(
    weights: Path, real: dict
) -> None:
    from fetalplanes.inference.predictor import Predictor

    frames, names = real["frames"], real["names"]
    predictor = Predictor.from_pretrained("sononet16", weights)
    result = scan_path(predictor, real["folder"], fps=30, every=2)
    assert result.fps == 30 and [r.frame for r in result.rows] == list(range(0, len(frames), 2))
    assert result.found == list(PLANE_OF.values()) and result.missing == []
    for plane, best in result.best.items():
        assert PLANE_OF[names[best.frame]] == plane
        assert np.array_equal(best.pixels, to_gray(frames[best.frame]))  # PNG: exact
        assert best.time_s == pytest.approx(best.frame / 30)


def test_default_out_is_runs_scan_stem_and_never_overwrites(
    weights: Path, real: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs go to runs/scan/<stem>[-N], never beside the input, and are marked so a later
    predict or sort of the folder does not take timeline.png or best frames for scans."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        stdout = scan_cli(weights, real["clip"], "--every", "10", "--window", "1")
    scans = tmp_path / "runs" / "scan"
    assert sorted(p.name for p in scans.iterdir()) == ["clip", "clip-1"]
    assert "runs/scan/clip-1/timeline.csv" in stdout
    r = runner.invoke(app, ["scan", "--model", "sononet16", "--weights", str(weights),
                            str(real["clip"]), "--out", str(scans / "clip")])
    assert r.exit_code == 2 and "never overwrites" in r.output
    assert len(r.output.strip().splitlines()) == 1
    # listing the project's own output: skipped with one line, never classified
    r = runner.invoke(app, ["predict", "sononet16", "--weights", str(weights), str(tmp_path),
                            "--format", "csv", "-q"])
    assert "timeline.png" not in r.stdout and "best/" not in r.stdout
    assert "results written by fetalplanes" in r.output


def test_scan_refuses_an_output_inside_the_scanned_folder(
    weights: Path, real: dict, tmp_path: Path
) -> None:
    folder = real["folder"]
    r = runner.invoke(app, ["scan", "sononet16", "--weights", str(weights), str(folder),
                            "--out", str(folder / "out")])
    assert r.exit_code == 2 and "inside the folder being scanned" in r.output
    assert not (folder / "out").exists()


def test_scan_with_the_bundled_model_needs_no_weights(real: dict, tmp_path: Path) -> None:
    """`fetalplanes scan sononet16 CLIP`: the bundled model (ONNX Runtime when installed)."""
    from fetalplanes.models import get_spec

    if get_spec("sononet16").bundled_weights() is None:
        pytest.skip("this install does not bundle the SonoNet-16 weights")
    r = runner.invoke(app, ["scan", "sononet16", str(real["clip"]), "--out",
                            str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    assert "missing: none" in r.stdout
    assert set(best_frames(r.stdout)) == set(PLANE_OF.values())


def test_scan_cli_errors_are_one_line(weights: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.mov"
    junk.write_bytes(b"\x00garbage" * 100)
    cases = [
        (["scan", "--model", "sononet16", "--weights", str(weights), str(junk)], "junk.mov"),
        (["scan", "--model", "sononet16", "--weights", str(weights), str(tmp_path / "no.mp4")],
         "not found"),
        (["scan", "--model", "sononet16", str(junk), str(junk)], "usage"),
        (["scan", "--model", "sononet16", str(junk), "--window", "4"], "odd"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and needle in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_measure_scan_fps_for_the_bench(weights: Path, real: dict) -> None:
    from fetalplanes.inference.predictor import Predictor

    predictor = Predictor.from_pretrained("sononet16", weights)
    fps = measure_scan_fps(predictor, real["clip"], every=5, batch_size=8)
    assert 0 < fps < 10_000


# ------------------------------------------------------------------ deid
def test_deid_cli_removes_the_patient_and_prints_the_summary(real: dict, tmp_path: Path) -> None:
    out = tmp_path / "deid"
    uid_map = tmp_path / "keys" / "uids.csv"
    r = runner.invoke(app, ["deid", str(real["cine"]), str(out), "--top-band", "0.05",
                            "--uid-map", str(uid_map), "--rename"])
    assert r.exit_code == 0, r.output
    assert "1 written, 0 skipped (exist), 0 failed" in r.stdout
    (written,) = list(out.iterdir())
    data = written.read_bytes()
    assert PATIENT_NAME.encode() not in data and written.suffix == ".dcm"
    assert "cine" not in written.name and uid_map.is_file()
    source = open_source(written)
    assert source.crop_box is not None and source.n_frames == real["n_cine"]
    inside = real["cine"].parent / "deid"  # an output inside the input folder is refused
    again = runner.invoke(app, ["deid", str(real["cine"].parent), str(inside), "--no-mask"])
    assert again.exit_code == 2 and len(again.output.strip().splitlines()) == 1, again.output


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_deid_cli_reports_bad_files_one_line_each(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    r = runner.invoke(app, ["deid", str(src), str(tmp_path / "out")])
    assert r.exit_code == 1
    assert "broken.dcm" in r.output and "0 written" in r.stdout
    assert all(line.startswith(("failed:", "0 written")) for line in r.output.splitlines())
