"""Property-based fuzzing: decoders, the label-CSV reader and the upload endpoint.

Whatever bytes arrive, `decode_image` returns a 2-D uint8 array or raises ImageError
(one line), quickly; `load_dataset` returns data or raises a one-line FetalPlanesError;
the predict endpoint answers 200 or a one-line 4xx, never 500.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_faults import GOOD_PNG, dicom, encode, gray, jpeg, make_tiny_run, multipart

from fetalplanes.data.images import decode_image, image_size
from fetalplanes.errors import FetalPlanesError, ImageError
from fetalplanes.serving.uploads import UploadRejected, read_uploads

pytestmark = pytest.mark.slow  # real-frame, subprocess or timing tests: CI lane

#: Examples per test: about 10 s for the file on two shared cores. `FUZZ_SCALE=20` runs
#: twenty times as many (same derandomised inputs, then more).
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
BYTES_EXAMPLES = 500 * SCALE
MUTATION_EXAMPLES = 500 * SCALE
CSV_EXAMPLES = 150 * SCALE
MULTIPART_EXAMPLES = 500 * SCALE
ENDPOINT_EXAMPLES = 100 * SCALE
#: No single decode may take longer than this (the pixel guard keeps work small).
DECODE_SECONDS = 2.0

SEEDS = {
    "png": GOOD_PNG,
    "png-rgb": encode(Image.fromarray(np.stack([gray()] * 3, -1)), "PNG"),
    "jpeg": jpeg(),
    "gif": encode(Image.fromarray(gray()).convert("P"), "GIF"),
    "tiff": encode(Image.fromarray(gray()), "TIFF"),
    "bmp": encode(Image.fromarray(gray()), "BMP"),
    "webp": encode(Image.fromarray(gray()), "WEBP", lossless=True),
    "dicom": dicom(),
}
def fuzz(examples: int) -> settings:
    """Reproducible runs (no example database written into the checkout), no deadline:
    time is bounded by the assertions instead, per example."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def decodes_or_refuses(data: bytes, name: str = "fuzz.png") -> None:
    """An array of the header's size, or one ImageError line; quickly, and without a
    warning that would print a stray line on stderr."""
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = decode_image(data, name)
        except ImageError as exc:
            message = str(exc)
            assert message.startswith(f"{name}: ") and "\n" not in message, message
        else:
            assert out.ndim == 2 and out.dtype == np.uint8 and out.size > 0
            width, height = image_size(data, name)
            assert out.shape == (height, width)
    assert time.monotonic() - start < DECODE_SECONDS
    assert not caught, [str(w.message) for w in caught]


@fuzz(BYTES_EXAMPLES)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid file of some format with a few bytes flipped, cut, inserted or deleted."""
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "set"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80]))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
    return kind, bytes(data)


@fuzz(MUTATION_EXAMPLES)
@given(mutated())
def test_mutated_valid_files(sample: tuple[str, bytes]) -> None:
    kind, data = sample
    decodes_or_refuses(data, f"fuzz.{'dcm' if kind == 'dicom' else 'png'}")


@fuzz(60)
@given(
    st.sampled_from(["png", "jpeg", "gif", "tiff", "bmp", "webp"]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
def test_declared_sizes_are_checked_before_decoding(kind: str, width: int, height: int) -> None:
    """Any declared size, however large, is refused or decoded within the time budget."""
    from test_faults import (
        bmp_declaring,
        gif_declaring,
        jpeg_declaring,
        png_declaring,
        tiff_declaring,
        webp_declaring,
    )

    limits = {"jpeg": 65535, "gif": 65535, "bmp": 2**31 - 1, "webp": 16384, "tiff": 2**32 - 1}
    cap = limits.get(kind, 2**31 - 1)
    width, height = min(width, cap), min(height, cap)
    if kind == "webp":
        width, height = max(width, 1), max(height, 1)
    make = {"png": png_declaring, "jpeg": jpeg_declaring, "gif": gif_declaring,
            "tiff": tiff_declaring, "bmp": bmp_declaring, "webp": webp_declaring}[kind]
    decodes_or_refuses(make(width, height))


# ------------------------------------------------------------------ label CSVs


PLANES = ["Fetal brain", "Fetal abdomen", "Fetal femur", "Fetal thorax", "Other", "brain"]
CELL = st.one_of(
    st.sampled_from([*PLANES, "", " ", "Patient00001_Plane1_1_of_1", "a,b", '"', "=1+1"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
)


@st.composite
def label_csv(draw: st.DrawFn) -> bytes:
    """A label CSV: usual or odd headers, rows of names and planes, odd encodings."""
    header = draw(st.sampled_from([
        ["Image_name", "Plane"],
        ["Image_name", "Patient_num", "Plane", "Brain_plane", "Operator", "US_Machine", "Train "],
        ["Filename", "Plane", "Center", "Train"],
        ["name", "label"],
        [],
    ])) + draw(st.lists(st.sampled_from(["Plane", "extra", ""]), max_size=2))
    n = draw(st.integers(0, 6))
    rows = [
        [draw(st.sampled_from([f"scan_{i}", f"scan_{i}.png", "scan_0", "missing", ""]))]
        + [draw(CELL) for _ in range(max(len(header) - 1, draw(st.integers(0, 3))))]
        for i in range(n)
    ]
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf)
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    text = buf.getvalue()
    if draw(st.booleans()):
        text = text.replace("\r\n", draw(st.sampled_from(["\n", "\r", "\r\n\r\n"])))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        data = text.encode("utf-8")
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


@pytest.fixture(scope="module")
def label_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labels") / "data"
    (root / "images").mkdir(parents=True)
    for i in range(4):
        (root / "images" / f"scan_{i}.png").write_bytes(GOOD_PNG)
    return root


LOAD_DATASET_CRASHES: list[tuple[bytes, str]] = []


@fuzz(CSV_EXAMPLES)
@given(data=label_csv(), preset=st.sampled_from(["seed4", "fpdb6", "brain3"]))
def test_label_csv_reader(label_root: Path, data: bytes, preset: str) -> None:
    """`load_dataset` (owned by data/datasets.py) on generated CSVs: data or one line."""
    from fetalplanes.data.datasets import load_dataset

    labels = label_root / "labels.csv"
    labels.write_bytes(data)
    try:
        loaded = load_dataset(label_root, labels, preset)
    except FetalPlanesError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), str(exc)
        return
    assert loaded.samples


# ------------------------------------------------------------------ multipart


BOUNDARY = st.one_of(
    st.just("b0undary"),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=90),
)


@st.composite
def multipart_body(draw: st.DrawFn) -> tuple[str, bytes]:
    """A content type and body: well-formed parts, mangled ones, or raw noise."""
    boundary = draw(BOUNDARY)
    content_type = draw(st.sampled_from([
        f"multipart/form-data; boundary={boundary}",
        f'multipart/form-data; boundary="{boundary}"',
        "multipart/form-data",
        f"multipart/form-data; boundary={boundary}; charset=utf-8",
        "text/plain",
    ]))
    parts = draw(st.lists(st.tuples(
        st.sampled_from(["files", "note", "", 'fi"les', "files\r\n"]),
        st.one_of(st.none(), st.text(max_size=20)),
        st.one_of(st.binary(max_size=64), st.just(GOOD_PNG)),
    ), max_size=4))
    try:
        body = multipart(parts, boundary)
    except UnicodeEncodeError:
        body = b""
    if draw(st.booleans()):
        noise = draw(st.binary(max_size=64))
        at = draw(st.integers(0, len(body)))
        body = body[:at] + noise + body[at + draw(st.integers(0, 8)) :]
    return content_type, body


@fuzz(MULTIPART_EXAMPLES)
@given(multipart_body(), st.integers(1, 4096))
def test_upload_reader(sample: tuple[str, bytes], chunk: int) -> None:
    """Any body, in any chunking: uploads, or UploadRejected with a 4xx and one line."""
    content_type, body = sample

    async def stream() -> Any:
        for i in range(0, len(body), chunk):
            yield body[i : i + chunk]

    async def read() -> Any:
        return await read_uploads(content_type, str(len(body)), stream(), max_file_bytes=4096,
                                  max_request_bytes=1 << 20, max_files=3, max_field_bytes=128)

    try:
        uploads = asyncio.run(read())
    except UploadRejected as exc:
        assert 400 <= exc.status < 500 and exc.detail and "\n" not in exc.detail
    else:
        assert uploads and all(u.filename and "/" not in u.filename for u in uploads)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fetalplanes.inference.predictor import Predictor
    from fetalplanes.serving import ServeSettings, create_app

    predictor = Predictor.from_run(make_tiny_run(tmp_path_factory.mktemp("tiny") / "run"))
    with TestClient(create_app(predictor, ServeSettings(max_files=3)),
                    raise_server_exceptions=False) as c:
        yield c


@fuzz(ENDPOINT_EXAMPLES)
@given(multipart_body())
def test_predict_endpoint_never_500(client: TestClient, sample: tuple[str, bytes]) -> None:
    content_type, body = sample
    assume(content_type.isascii())
    r = client.post("/api/v1/predict", content=body, headers={"content-type": content_type})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 200:
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail
