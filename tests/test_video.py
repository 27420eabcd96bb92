"""Frame sources of `fetalplanes scan`: video files, DICOM cines and folders of frames, read one
frame at a time, with real ultrasound frames in a known order.

Also holds the sweep builders the scan and scan-API tests share: a sweep made of the real
SonoNet screen captures (ABDOMINAL x8, BRAIN-CB x8, FEMUR x8, 4CH x8, three transition frames
between planes), written as an MP4, a JPEG YBR DICOM cine with an ultrasound region and a fake
patient, or a folder of PNG frames.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from dicomfiles import PATIENT_NAME, SHARED, SONONET_REGION, write_dicom
from PIL import Image

from fetalplanes.data.crop import to_gray
from fetalplanes.data.images import opencv
from fetalplanes.data.sources import (
    DEFAULT_FPS,
    DicomFile,
    FrameFolder,
    VideoFile,
    open_source,
    open_upload,
)
from fetalplanes.data.video import memory_file, natural_key, write_video
from fetalplanes.errors import FetalPlanesError, ImageError

pytestmark = pytest.mark.slow  # real-frame, subprocess or timing tests: CI lane

#: (capture, frames) in order. Between the standard planes the probe passes other anatomy
#: (kidneys, spine, profile: planes the model must reject), three frames each.
PLAN = (("ABDOMINAL", 8), ("KIDNEYS", 3), ("BRAIN-CB", 8), ("SPINE-SAGITTAL", 3), ("FEMUR", 8),
        ("PROFILE", 3), ("4CH", 8))
PLANE_OF = {"ABDOMINAL": "Fetal abdomen", "BRAIN-CB": "Fetal brain", "FEMUR": "Fetal femur",
            "4CH": "Fetal thorax"}
SIZE = (736, 976)  # the 975x735 captures padded by one pixel: video encoders want even sizes
SPACING_CM = (0.03, 0.025)  # region PhysicalDeltaX, PhysicalDeltaY in cm
cv2 = opencv()


def _capture(name: str) -> np.ndarray:
    path = SHARED / "sononet" / "example_images" / f"{name}.png"
    if not path.exists():
        pytest.skip(f"real frames not found at {path}: set FETALPLANES_SHARED to shared/")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return np.pad(rgb, ((0, SIZE[0] - rgb.shape[0]), (0, SIZE[1] - rgb.shape[1]), (0, 0)),
                  mode="edge")


def _transition(capture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A non-target frame: the capture with mild speckle noise inside the image region."""
    x0, y0, x1, y1 = SONONET_REGION
    frame = capture.copy()
    region = frame[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
    region += rng.normal(0, 6, region.shape[:2]).astype(np.float32)[..., None]
    frame[y0 : y1 + 1, x0 : x1 + 1] = np.clip(region, 0, 255).astype(np.uint8)
    return frame


def sweep() -> tuple[list[np.ndarray], list[str]]:
    """The sweep's RGB frames and each frame's capture name. Plane frames are the capture
    shifted by a few pixels and transition frames carry random noise, so every frame differs
    from every other."""
    rng = np.random.default_rng(7)
    frames: list[np.ndarray] = []
    names: list[str] = []
    for name, n in PLAN:
        capture = _capture(name)
        if name in PLANE_OF:
            frames += [np.roll(capture, (k % 3 - 1, k - 4), (0, 1)) for k in range(n)]
        else:
            frames += [_transition(capture, rng) for _ in range(n)]
        names += [name] * n
    return frames, names


def segments(names: list[str]) -> dict[str, tuple[int, int]]:
    """Plane -> (first, last) frame index in the sweep."""
    spans: dict[str, tuple[int, int]] = {}
    for i, name in enumerate(names):
        if name in PLANE_OF:
            plane = PLANE_OF[name]
            spans[plane] = (spans.get(plane, (i, i))[0], i)
    return spans


def write_clip(folder: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    """The sweep as MP4 (mp4v), or MJPG AVI where this OpenCV has no MP4 encoder."""
    return write_video(folder / "clip.mp4", frames, fps)


def write_cine(folder: Path, frames: list[np.ndarray], fps: float = 20.0) -> Path:
    """The sweep as a JPEG Baseline YBR_FULL_422 multi-frame DICOM with one calibrated B-mode
    region and the fake patient of tests/dicomfiles.py."""
    region = (*SONONET_REGION, *SPACING_CM)
    return write_dicom(folder / "cine.dcm", frames, transfer_syntax="jpeg-baseline",
                       regions=[region], fps=fps)


def region_of(frame: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = SONONET_REGION
    return frame[y0 : y1 + 1, x0 : x1 + 1]


def nearest(frame: np.ndarray, candidates: list[np.ndarray]) -> tuple[int, float]:
    """Index of the candidate closest to `frame` (mean absolute difference) and that distance."""
    diffs = [float(np.abs(frame.astype(np.int16) - c.astype(np.int16)).mean())
             for c in candidates]
    best = int(np.argmin(diffs))
    return best, diffs[best]


@pytest.fixture(scope="session")
def real_sweep() -> tuple[list[np.ndarray], list[str]]:
    return sweep()


@pytest.fixture(scope="session")
def sweep_files(tmp_path_factory: pytest.TempPathFactory,
                real_sweep: tuple[list[np.ndarray], list[str]]) -> dict[str, Path]:
    """clip.mp4 (25 fps), cine.dcm (20 fps, region, fake patient) and frames/ (PNGs named
    frame1..frame41, so a plain sort would misorder them)."""
    frames, _ = real_sweep
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "frames").mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / "frames" / f"frame{i + 1}.png", compress_level=1)
    return {"clip": write_clip(folder, frames), "cine": write_cine(folder, frames),
            "frames": folder / "frames"}


# ------------------------------------------------------------------ video
def test_video_yields_every_frame_in_order_with_container_timing(
    sweep_files: dict[str, Path], real_sweep: tuple[list[np.ndarray], list[str]]
) -> None:
    frames, _ = real_sweep
    source = open_source(sweep_files["clip"])
    assert isinstance(source, VideoFile) and source.fps == 25.0
    assert source.n_frames == len(frames) and source.spacing_mm is None
    got = list(source.frames())
    assert [i for i, _, _ in got] == list(range(len(frames)))
    assert [t for _, t, _ in got] == pytest.approx([i / 25.0 for i in range(len(frames))])
    gray = [to_gray(f) for f in frames]
    for index, _, frame in got:
        assert frame.dtype == np.uint8 and frame.shape == SIZE
        match, diff = nearest(frame, gray)
        assert match == index and diff < 6, (index, match, diff)  # lossy mp4v, right frame


def test_video_every_k_skips_frames(sweep_files: dict[str, Path],
                                    real_sweep: tuple[list[np.ndarray], list[str]]) -> None:
    frames, _ = real_sweep
    gray = [to_gray(f) for f in frames]
    got = list(open_source(sweep_files["clip"]).frames(every=4))
    assert [i for i, _, _ in got] == list(range(0, len(frames), 4))
    assert [t for _, t, _ in got] == pytest.approx([i / 25 for i in range(0, len(frames), 4)])
    for index, _, frame in got:
        assert nearest(frame, gray)[0] == index


def test_video_from_memory_reads_the_same_frames(sweep_files: dict[str, Path]) -> None:
    data = sweep_files["clip"].read_bytes()
    with open_upload(data, "upload.mp4") as source:
        assert isinstance(source, VideoFile) and source.name == "upload.mp4"
        from_memory = [f for _, _, f in source.frames(every=10)]
    from_disk = [f for _, _, f in open_source(sweep_files["clip"]).frames(every=10)]
    assert len(from_memory) == len(from_disk) == 5
    for a, b in zip(from_memory, from_disk, strict=True):
        assert np.array_equal(a, b)


def test_memory_file_is_not_on_any_file_system(tmp_path: Path) -> None:
    if not hasattr(os, "memfd_create"):
        pytest.skip("memfd_create is Linux-only")
    with memory_file(b"abc" * 1000, "x.mp4") as path:
        assert path.startswith("/proc/self/fd/")
        assert Path(path).read_bytes() == b"abc" * 1000
        assert os.readlink(path).startswith("/memfd:")  # anonymous memory, no directory entry


# ------------------------------------------------------------------ DICOM
def test_dicom_cine_is_cropped_to_its_region_with_spacing_and_timing(
    sweep_files: dict[str, Path], real_sweep: tuple[list[np.ndarray], list[str]]
) -> None:
    frames, _ = real_sweep
    source = open_source(sweep_files["cine"])
    assert isinstance(source, DicomFile)
    assert source.fps == pytest.approx(20.0) and source.n_frames == len(frames)
    assert source.crop_box == SONONET_REGION
    dx_cm, dy_cm = SPACING_CM
    assert source.spacing_mm == pytest.approx((dy_cm * 10, dx_cm * 10))
    x0, y0, x1, y1 = SONONET_REGION
    regions = [to_gray(region_of(f)) for f in frames]
    got = list(source.frames(every=3))
    assert [i for i, _, _ in got] == list(range(0, len(frames), 3))
    for index, time_s, frame in got:
        assert frame.shape == (y1 - y0 + 1, x1 - x0 + 1) and frame.dtype == np.uint8
        assert time_s == pytest.approx(index / 20.0)
        match, diff = nearest(frame, regions)
        assert match == index and diff < 3, (index, match, diff)  # JPEG 4:2:2, same frame


def test_dicom_from_memory_and_never_its_patient(sweep_files: dict[str, Path]) -> None:
    data = sweep_files["cine"].read_bytes()
    assert PATIENT_NAME.encode() in data  # the file does carry a patient
    with open_upload(data, "cine-upload.dcm") as source:
        assert isinstance(source, DicomFile)
        assert PATIENT_NAME not in repr(source) and source.name == "cine-upload.dcm"
        index, _, frame = next(source.frames())
    assert index == 0 and frame.shape == (660, 821)


def test_dicom_without_timing_uses_the_given_rate(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (3, 40, 50), np.uint8)
    path = write_dicom(tmp_path / "no-rate.dcm", frames, transfer_syntax="explicit")
    assert open_source(path).fps == DEFAULT_FPS
    source = open_source(path, fps=10)
    assert source.fps == 10 and source.crop_box is None and source.spacing_mm is None
    got = list(source.frames())
    assert [t for _, t, _ in got] == pytest.approx([0.0, 0.1, 0.2])
    assert all(np.array_equal(f, frames[i]) for i, _, f in got)  # no region: whole frame


# ------------------------------------------------------------------ folder
def test_folder_frames_in_natural_order_at_the_given_rate(
    sweep_files: dict[str, Path], real_sweep: tuple[list[np.ndarray], list[str]]
) -> None:
    frames, _ = real_sweep
    source = open_source(sweep_files["frames"], fps=10)
    assert isinstance(source, FrameFolder) and source.fps == 10
    assert [p.name for p in source.files[:3]] == ["frame1.png", "frame2.png", "frame3.png"]
    assert source.files[9].name == "frame10.png"
    got = list(source.frames(every=5))
    assert [i for i, _, _ in got] == list(range(0, len(frames), 5))
    for index, time_s, frame in got:
        assert time_s == pytest.approx(index / 10)
        assert np.array_equal(frame, to_gray(frames[index]))  # PNG: exact
    assert source.item_name(9).endswith("frame10.png")
    assert open_source(sweep_files["frames"]).fps == DEFAULT_FPS


def test_natural_key_orders_numbers_by_value() -> None:
    names = ["f10.png", "f2.png", "F1.png", "f1b.png"]
    assert sorted(names, key=lambda n: natural_key(Path(n))) == [
        "F1.png", "f1b.png", "f2.png", "f10.png"]


# ------------------------------------------------------------------ errors
def test_unreadable_inputs_give_one_line_naming_the_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 50)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    truncated = tmp_path / "cut.dcm"
    frames = np.zeros((2, 32, 32), np.uint8)
    truncated.write_bytes(write_dicom(tmp_path / "ok.dcm", frames,
                                      transfer_syntax="explicit").read_bytes()[:-900])
    cases = {text: "notes.mp4", tmp_path / "missing.avi": "missing.avi", empty_dir: "empty",
             truncated: "cut.dcm"}
    for path, name in cases.items():
        with pytest.raises(FetalPlanesError) as info:  # ImageError, NoInputError (empty)
            source = open_source(path)
            list(source.frames())
        msg = str(info.value)
        assert name in msg and "\n" not in msg, msg
    with pytest.raises(ImageError, match="--fps"):
        open_source(text, fps=0)


def test_sweep_builder_is_deterministic(real_sweep: tuple[list[np.ndarray], list[str]]
                                        ) -> None:
    frames, names = real_sweep
    assert len(frames) == len(names) == sum(n for _, n in PLAN)
    digests = {hashlib.sha1(f.tobytes()).hexdigest() for f in frames}
    assert len(digests) == len(frames)  # every frame distinct, so a best frame is identifiable
    assert segments(names)["Fetal brain"] == (11, 18)
