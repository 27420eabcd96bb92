"""Ultrasound DICOM reading on real frames: every transfer syntax, colour space and bit depth
scanners produce, frame timing, regions and spacing, and the guards that refuse bad files."""

from __future__ import annotations

import importlib.util
import io
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomfiles import (
    PATIENT_NAME,
    SONONET_REGION,
    bomb_dicom,
    real_frames,
    write_dicom,
)
from PIL import Image
from pydicom.pixels.decoders.base import Decoder

from fetalplanes.data import dicom
from fetalplanes.data.dicom import (
    frame_name,
    is_dicom,
    open_dicom,
    parse_frame_name,
)
from fetalplanes.errors import ImageError

HAS_JPEGLS_ENCODER = importlib.util.find_spec("jpeg_ls") is not None


def minmax(frame: np.ndarray) -> np.ndarray:
    """The project's rule for non-8-bit frames: (x - lo) * 255 / (hi - lo)."""
    lo, hi = float(frame.min()), float(frame.max())
    return np.round((frame.astype(np.float64) - lo) * 255.0 / (hi - lo))


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and PATIENT_NAME not in message
    return message


def test_jpeg_baseline_ybr422_cine_decodes_each_frame_close_to_source(tmp_path: Path) -> None:
    frames = real_frames("sononet", 6)  # full 975x735: odd width, as scanners write it
    region = (*SONONET_REGION, 0.01, 0.012)
    path = write_dicom(tmp_path / "cine.dcm", frames, fps=30, regions=[region])

    dcm = open_dicom(path)

    assert dcm.n_frames == 6 and dcm.photometric == "YBR_FULL_422"
    assert dcm.transfer_syntax == "JPEG Baseline (Process 1)"
    for index, frame in dcm.iter_frames():
        assert frame.dtype == np.uint8 and frame.shape == (735, 975, 3)
        assert np.abs(frame.astype(int) - frames[index]).mean() < 3.0
    assert dcm.fps == pytest.approx(30.0, rel=1e-3)
    assert [(r.x0, r.y0, r.x1, r.y1) for r in dcm.regions] == [SONONET_REGION]
    assert dcm.bmode_region() == dcm.regions[0]
    assert dcm.spacing_mm() == pytest.approx((0.12, 0.1))


LOSSLESS = [
    ("rle", "sononet", "RGB", 8),
    ("rle", "sononet", "YBR_FULL", 8),
    ("rle", "hc18", "MONOCHROME1", 16),
    ("jpeg-ls", "sononet", "RGB", 8),
    ("jpeg-ls", "hc18", "MONOCHROME2", 16),
    ("explicit", "sononet", "RGB", 8),
    ("explicit", "sononet", "YBR_FULL", 8),
    ("explicit", "hc18", "MONOCHROME1", 16),
    ("explicit", "hc18", "MONOCHROME2", 16),
    ("implicit", "hc18", "MONOCHROME2", 8),
    ("deflated", "sononet", "RGB", 8),
    ("deflated", "hc18", "MONOCHROME1", 8),
]


@pytest.mark.parametrize(("syntax", "kind", "photometric", "bits"), LOSSLESS)
def test_lossless_syntaxes_give_back_the_source_frames(
    tmp_path: Path, syntax: str, kind: str, photometric: str, bits: int
) -> None:
    if syntax == "jpeg-ls" and not HAS_JPEGLS_ENCODER:
        pytest.skip("no JPEG-LS encoder to build the file: pip install pyjpegls")
    frames = real_frames(kind, 3, scale=2 if kind == "sononet" else 1)
    path = write_dicom(
        tmp_path / "f.dcm", frames, transfer_syntax=syntax, photometric=photometric, bits=bits
    )

    dcm = open_dicom(path)

    assert (dcm.n_frames, dcm.photometric, dcm.bits_allocated) == (3, photometric, bits)
    for index, frame in dcm.iter_frames():
        assert frame.dtype == np.uint8 and frame.shape == frames[index].shape
        expected = minmax(frames[index]) if bits == 16 else frames[index]
        diff = np.abs(frame.astype(int) - expected)
        if photometric == "YBR_FULL":  # RGB -> YBR -> RGB rounds a little
            assert diff.mean() < 0.5 and diff.max() <= 3
        elif bits == 16:  # scaled to uint8 per frame
            assert diff.max() <= 1 and diff.mean() < 0.01
        else:
            assert diff.max() == 0


def test_grey_jpeg_baseline_and_stored_values(tmp_path: Path) -> None:
    frames = real_frames("hc18", 2)
    dcm = open_dicom(write_dicom(tmp_path / "g.dcm", frames))
    assert dcm.photometric == "MONOCHROME2"
    assert np.abs(dcm.frame(1).astype(int) - frames[1]).mean() < 2.0

    path = tmp_path / "m1.dcm"
    write_dicom(path, frames, transfer_syntax="explicit", photometric="MONOCHROME1", bits=16)
    mono1 = open_dicom(path)
    stored = mono1.frame(0, as_uint8=False)
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, 65535 - frames[0].astype(np.uint16) * 257)


def test_iter_frames_every_yields_the_right_indices(tmp_path: Path) -> None:
    frames = real_frames("hc18", 5)
    dcm = open_dicom(write_dicom(tmp_path / "c.dcm", frames, transfer_syntax="explicit"))
    assert [i for i, _ in dcm.iter_frames(every=2)] == [0, 2, 4]
    assert [i for i, _ in dcm.iter_frames(every=3)] == [0, 3]
    for index, frame in dcm.iter_frames(every=2):
        np.testing.assert_array_equal(frame, frames[index])
    assert "no frame 5" in error_of(dcm.frame, 5)


@pytest.mark.parametrize("syntax", ["deflated", "jpeg-baseline"])
def test_iter_frames_holds_one_frame_at_a_time(tmp_path: Path, syntax: str) -> None:
    frames = real_frames("hc18", 24)  # 24 x 432 KB = 10.4 MB decoded
    dcm = open_dicom(write_dicom(tmp_path / "loop.dcm", frames, transfer_syntax=syntax))
    tracemalloc.start()
    try:
        count = sum(1 for _ in dcm.iter_frames())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 24
    assert peak < 5 * 2**20, f"peak {peak:,} bytes: frames are not decoded one at a time"


def test_frame_rate_falls_back_to_cine_rate_then_display_rate(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "r.dcm", real_frames("hc18", 1), transfer_syntax="explicit")
    assert open_dicom(path).fps is None
    ds = pydicom.dcmread(path)
    ds.RecommendedDisplayFrameRate = 15
    ds.save_as(path)
    assert open_dicom(path).fps == 15.0
    ds.CineRate = 24
    ds.save_as(path)
    assert open_dicom(path).fps == 24.0


def test_largest_tissue_region_gives_the_spacing(tmp_path: Path) -> None:
    regions = [(0, 0, 99, 49, 0.02, 0.02), (100, 60, 399, 269, 0.005, 0.0075)]
    dcm = open_dicom(write_dicom(tmp_path / "r.dcm", real_frames("hc18", 1), regions=regions))
    assert [r.area for r in dcm.regions] == [100 * 50, 300 * 210]
    assert (dcm.bmode_region().x0, dcm.bmode_region().y1) == (100, 269)
    assert dcm.spacing_mm() == pytest.approx((0.075, 0.05))
    plain = open_dicom(write_dicom(tmp_path / "p.dcm", real_frames("hc18", 1)))
    assert plain.regions == [] and plain.bmode_region() is None and plain.spacing_mm() is None


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    path = bomb_dicom(tmp_path / "bomb.dcm")
    assert path.stat().st_size < 300_000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = error_of(open_dicom, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 10 * 2**20  # the 162 MB frame was never inflated
    assert message.startswith(str(path)) and "81,000,000 pixels" in message


def test_file_without_pixel_data(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "nopix.dcm", real_frames("hc18", 1), transfer_syntax="explicit")
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    assert error_of(open_dicom, path) == f"{path}: DICOM file has no pixel data"


def test_unsupported_transfer_syntax_names_file_and_syntax(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "vendor.dcm", real_frames("hc18", 1), transfer_syntax="explicit")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.7777.1"  # a vendor's own syntax
    ds.save_as(path, implicit_vr=False, little_endian=True)
    message = error_of(open_dicom, path)
    assert message.startswith(f"{path}: ")
    assert "1.2.826.0.1.3680043.9.7777.1" in message and "not supported" in message


def test_missing_decoder_plugin_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_dicom(tmp_path / "rle.dcm", real_frames("hc18", 1), transfer_syntax="rle")
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    message = error_of(open_dicom, path)
    assert message == (
        f"{path}: transfer syntax 'RLE Lossless' (1.2.840.10008.1.2.5) needs a decoder "
        "plugin: pip install pylibjpeg pylibjpeg-rle"
    )


def test_truncated_and_non_dicom_files_are_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "cut.dcm", real_frames("hc18", 1), transfer_syntax="explicit")
    data = path.read_bytes()[:-1000]
    message = error_of(open_dicom, data, name="upload.dcm")
    assert message.startswith("upload.dcm: pixel data is truncated")
    png = io.BytesIO()
    Image.fromarray(real_frames("hc18", 1)[0]).save(png, "PNG")
    assert "not a DICOM file" in error_of(open_dicom, png.getvalue())


def test_oversized_header_element_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_dicom(tmp_path / "h.dcm", real_frames("hc18", 1), transfer_syntax="deflated")
    monkeypatch.setattr(dicom, "MAX_ELEMENT_BYTES", 16)
    assert "header element" in error_of(open_dicom, path)


@pytest.mark.parametrize("implicit", [True, False])
def test_is_dicom_and_files_without_preamble(tmp_path: Path, implicit: bool) -> None:
    frames = real_frames("hc18", 1)
    path = write_dicom(tmp_path / "a.dcm", frames, transfer_syntax="explicit")
    assert is_dicom(path.read_bytes()[:4096])
    bare = tmp_path / "bare.dcm"
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(bare, implicit_vr=implicit, little_endian=True)  # no preamble, no file meta
    head = bare.read_bytes()[:4096]
    assert head[128:132] != b"DICM"
    assert is_dicom(head, "bare.dcm") and not is_dicom(head, "bare.bin")
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + bytes(200), "fake.dcm")
    np.testing.assert_array_equal(open_dicom(bare).frame(0), frames[0])


def test_frame_names_round_trip() -> None:
    assert frame_name("scans/cine.dcm", 12) == "scans/cine.dcm#frame=12"
    assert parse_frame_name("scans/cine.dcm#frame=12") == ("scans/cine.dcm", 12)
    assert parse_frame_name("scans/a#b.dcm") == ("scans/a#b.dcm", None)
    assert parse_frame_name("still.png") == ("still.png", None)


def test_no_patient_identity_is_kept(tmp_path: Path) -> None:
    dcm = open_dicom(write_dicom(tmp_path / "p.dcm", real_frames("hc18", 1)))
    everything = repr(dcm) + repr(vars(dcm))
    assert PATIENT_NAME not in everything and "PatientName" not in everything
