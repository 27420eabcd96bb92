"""Image decoding: formats by content, and one-line errors naming bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalplanes.data.images import decode_image, list_images, read_image
from fetalplanes.errors import ImageError


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_gray_rgb_and_16bit(tmp_path: Path) -> None:
    gray = (np.arange(200, dtype=np.uint8).reshape(10, 20))
    assert np.array_equal(decode_image(_png(gray)), gray)
    rgb = np.stack([gray] * 3, axis=-1)
    assert decode_image(_png(rgb)).shape == (10, 20)
    p = tmp_path / "x.tif"
    Image.fromarray(gray.astype(np.uint16) * 200).save(p)
    out = read_image(p)
    assert out.dtype == np.uint8 and out.max() == 255


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA"])
def test_png_modes_decode_quietly(mode: str, capfd: pytest.CaptureFixture[str]) -> None:
    """Every PNG mode decodes to Pillow's grey; a cut file is one line, nothing else on
    stderr (libpng, used by OpenCV, printed its own warnings: PNGs go through Pillow)."""
    from fetalplanes.data.images import _pil_to_gray

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as ref:
        expected = _pil_to_gray(ref)
    assert np.array_equal(decode_image(data), expected)
    with pytest.raises(ImageError, match=r"cut\.png"):
        decode_image(data[: len(data) // 2], "cut.png")
    assert capfd.readouterr().err == ""


def test_png_with_too_much_image_data_is_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    """libpng printed 'IDAT: Too much image data' beside our output."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + bytes(8) for _ in range(8)) + bytes(500)  # 500 bytes too many
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert decode_image(data, "extra.png").shape == (8, 8)
    assert capfd.readouterr().err == ""


def test_extension_is_not_trusted(tmp_path: Path) -> None:
    p = tmp_path / "really_png.jpg"
    p.write_bytes(_png(np.zeros((4, 4), np.uint8)))
    assert read_image(p).shape == (4, 4)


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"", "empty file"), (b"hello, not an image", "not an image")],
)
def test_bad_files(tmp_path: Path, content: bytes, needle: str) -> None:
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageError) as e:
        read_image(p)
    assert str(p) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_truncated_and_missing(tmp_path: Path) -> None:
    data = _png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    p = tmp_path / "trunc.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"trunc\.png"):
        read_image(p)
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a folder"):
        read_image(tmp_path)


def test_decompression_bomb_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    import fetalplanes.data.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="too large"):
        decode_image(_png(np.zeros((20, 20), np.uint8)), "big.png")


def test_dicom(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom", reason="pydicom not installed")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # US image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    arr = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    assert pydicom is not None
    out = read_image(tmp_path / "x.dcm")
    assert out.shape == (8, 8)


def test_list_images(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for name in ("a/1.png", "a/2.PNG", "a/notes.txt", "3.jpg"):
        (tmp_path / name).write_bytes(b"x")
    found = list_images([tmp_path])
    assert [f.name for f in found] == ["3.jpg", "1.png", "2.PNG"]
