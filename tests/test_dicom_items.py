"""Every frame of a multi-frame DICOM is an item in predict, sort and evaluate: named
`file.dcm#frame=N`, cropped to the declared B-mode region, with its pixel spacing."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from dicomfiles import PATIENT_ID, PATIENT_NAME, SONONET_REGION, real_frames, write_dicom
from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.data.loading import expand_frames, list_items, read_item
from fetalplanes.workflows.sorting import JOURNAL

ORDER = ("ABDOMINAL", "BRAIN-CB", "FEMUR")  # the cine's planes, in frame order
PLANE = {"ABDOMINAL": "Fetal abdomen", "BRAIN-CB": "Fetal brain", "FEMUR": "Fetal femur"}


@pytest.fixture(scope="module")
def cine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-frame JPEG YBR cine of real SonoNet frames with their B-mode region declared."""
    frames = {Path(p).stem: f for p, f in zip(
        sorted((Path(__file__).resolve().parents[1].parent / "shared" / "sononet" /
                "example_images").glob("*.png")), real_frames("sononet", 13), strict=False)}
    folder = tmp_path_factory.mktemp("cine")
    x0, y0, x1, y1 = SONONET_REGION
    write_dicom(folder / "cine.dcm", [frames[k] for k in ORDER], fps=10,
                regions=[(x0, y0, x1, y1, 0.02, 0.02)])
    return folder


def test_frames_are_items_with_region_and_spacing(cine: Path) -> None:
    items = list_items([cine])
    assert items == [f"{cine / 'cine.dcm'}#frame={i}" for i in range(3)]
    assert expand_frames(items) == items  # already expanded: unchanged
    gray, meta, _ = read_item(items[1])
    x0, y0, x1, y1 = SONONET_REGION
    assert gray.shape == (y1 - y0 + 1, x1 - x0 + 1) and gray.dtype == np.uint8
    assert meta["frame"] == 1 and meta["pixel_spacing_mm"] == pytest.approx((0.2, 0.2))


def test_predict_and_sort_frames_without_identities(cine: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["predict", "sononet16", str(cine), "--format", "csv", "-q"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["frame"] for row in rows] == ["0", "1", "2"]
    assert [row["label"] for row in rows] == [PLANE[k] for k in ORDER]
    assert all(row["pixel_spacing_mm"] == "0.2x0.2" for row in rows)
    out = tmp_path / "sorted"
    s = CliRunner().invoke(app, ["sort", "sononet16", str(cine), str(out), "-q"])
    assert s.exit_code == 0, s.output
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == sorted(f"{PLANE[k]}/cine_frame{i:04d}.png" for i, k in enumerate(ORDER))
    journal = (out / JOURNAL).read_text()
    assert journal.count("#frame=") == 3
    again = CliRunner().invoke(app, ["sort", "sononet16", str(cine), str(out), "-q"])
    assert again.exit_code == 0 and (out / JOURNAL).read_text() == journal
    everything = r.stdout + s.stdout + journal + " ".join(pngs)
    assert PATIENT_NAME.split("^")[0] not in everything and PATIENT_ID not in everything
    assert not (out / ".fetalplanes-frames").exists() or not any(
        (out / ".fetalplanes-frames").iterdir())
