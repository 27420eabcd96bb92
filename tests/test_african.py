"""The African fetal planes layout (Zenodo 7540448) and a label-CSV reader that survives
what spreadsheets export: encodings, binary files, odd patient numbers, duplicate names.

The fixtures are built like the real archive: `African_planes_database.csv` with
`Patient_num,Plane,Train,Center,Filename`, extension-less names ending `plane0`..`plane3`,
and the images in per-country folders below a folder the reader is not told about.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from PIL import Image
from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.data.checks import check_dataset
from fetalplanes.data.datasets import (
    AFRICAN_CSV,
    AFRICAN_PLANES,
    african_plane,
    detect_layout,
    load_dataset,
    read_label_text,
)
from fetalplanes.errors import LabelFileError

CENTRES = {"DZA": "Algeria", "EGY": "Egypt", "GHA": "Ghana", "MWI": "Malawi", "UGA": "Uganda"}
HEADER = "Patient_num,Plane,Train,Center,Filename"
Row = tuple[str, int, int, int]  # centre code, patient number, plane 0-3, Train


def african_name(code: str, patient: int, k: int) -> str:
    return f"patient{patient:03d}_{code}_plane{k}"


def write_african(
    root: Path,
    rows: list[Row],
    image: Callable[[int, int], np.ndarray],
    plane_value: Callable[[int], str] = lambda k: AFRICAN_PLANES[k],
    center_value: Callable[[str], str] = lambda code: code,
) -> Path:
    """The CSV at DATA/ and each image at DATA/Zenodo_dataset/<Country>/<name>.<ext>
    (Egypt's as JPEG), as an archive whose image layout the reader must discover."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for i, (code, patient, k, train) in enumerate(rows):
        name = african_name(code, patient, k)
        lines.append(f"{patient},{plane_value(k)},{train},{center_value(code)},{name}")
        folder = root / "Zenodo_dataset" / CENTRES[code]
        folder.mkdir(parents=True, exist_ok=True)
        ext = ".jpg" if code == "EGY" else ".png"
        Image.fromarray(image(k, i)).save(folder / f"{name}{ext}", quality=95)
    (root / AFRICAN_CSV).write_text("\n".join(lines) + "\n")
    return root


def phantom(size: tuple[int, int] = (90, 120)) -> Callable[[int, int], np.ndarray]:
    """Synthetic B-mode phantoms of plane k (so a model can learn them)."""
    from fetalplanes.data.synth import render_phantom

    return lambda k, i: render_phantom(AFRICAN_PLANES[k], np.random.default_rng(1000 + i), size)


def noise(k: int, i: int) -> np.ndarray:
    """A tiny distinct image per row (fast; byte-identical files would be reported)."""
    return np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)


def forty_rows() -> list[Row]:
    """10 patients (2 per centre, numbered 1 and 2 in every centre) x 4 planes."""
    return [(code, p, k, int(p == 1)) for code in CENTRES for p in (1, 2) for k in range(4)]


def rows_450() -> list[Row]:
    """25 patients per centre; abdomen, brain, femur for all 125, thorax for 75 (the
    Egyptian and Ghanaian centres have none), patients 1-20 of each centre Train=1."""
    rows = []
    for code in CENTRES:
        for p in range(1, 26):
            planes = (0, 1, 2) if code in ("EGY", "GHA") else (0, 1, 2, 3)
            rows += [(code, p, k, int(p <= 20)) for k in planes]
    return rows


@pytest.fixture(scope="module")
def african40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("african") / "african"
    return write_african(root, forty_rows(), phantom(), center_value=lambda c: CENTRES[c])


def test_layout_is_detected_and_images_found_below(african40: Path) -> None:
    assert detect_layout(african40) == ("african", african40 / AFRICAN_CSV)
    data = load_dataset(african40)
    assert data.layout == "african" and data.classes == list(AFRICAN_PLANES)
    assert len(data.samples) == 40 and not data.missing and not data.unknown
    assert data.class_counts() == {c: 10 for c in AFRICAN_PLANES}
    suffixes = Counter(s.path.suffix for s in data.samples)
    assert suffixes == {".png": 32, ".jpg": 8}
    first = data.samples[0]
    assert first.patient == "Algeria-1" and first.meta == {"site": "Algeria"}
    assert first.subset == "train"


def test_patient_numbers_repeat_across_centres_but_ids_do_not(african40: Path) -> None:
    data = load_dataset(african40)
    assert len(data.patients) == 10  # numbers 1 and 2 in each of 5 centres
    per_patient = Counter(s.patient for s in data.samples)
    assert set(per_patient.values()) == {4}
    sites = {s.patient: s.meta["site"] for s in data.samples}
    assert all(p.startswith(site + "-") for p, site in sites.items())


def test_data_check_reports_four_classes(african40: Path) -> None:
    r = CliRunner().invoke(app, ["data", "check", str(african40), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["layout"] == "african" and len(report["classes"]) == 4
    assert report["n_images"] == 40 and report["n_patients"] == 10
    assert report["images_per_group"] == {"site": {c: 8 for c in sorted(CENTRES.values())}}
    assert report["patients_per_split"]["test"] == 5  # the Train=0 patients
    table = CliRunner().invoke(app, ["data", "check", str(african40)])
    assert table.exit_code == 0 and "images per site: Algeria 8" in table.stdout


def test_fpdb6_preset_reads_the_four_planes_it_has(african40: Path) -> None:
    data = load_dataset(african40, preset="fpdb6")
    assert data.classes == list(AFRICAN_PLANES) and len(data.samples) == 40
    with pytest.raises(LabelFileError, match=r"missing column.*Brain_plane"):
        load_dataset(african40, preset="brain3")


def test_450_rows_five_centres_two_without_thorax(tmp_path: Path) -> None:
    root = write_african(tmp_path / "african", rows_450(), noise)
    data = load_dataset(root)
    assert len(data.samples) == 450 and len(data.classes) == 4
    assert data.class_counts() == {
        "Fetal abdomen": 125, "Fetal brain": 125, "Fetal femur": 125, "Fetal thorax": 75
    }
    assert len(data.patients) == 125
    thorax_sites = {s.meta["site"] for s in data.samples if s.label == "Fetal thorax"}
    assert thorax_sites == {"DZA", "MWI", "UGA"}
    report = check_dataset(data, progress=False)
    assert report.ok and report.to_dict()["n_images"] == 450
    assert set(report.split.test) == {f"{c}-{p}" for c in CENTRES for p in range(21, 26)}


@pytest.mark.parametrize(
    ("value", "name", "plane"),
    [
        ("Fetal brain", "patient001_DZA_plane3", "Fetal brain"),  # the column wins
        ("Brain", "x", "Fetal brain"),
        ("abdomen", "x", "Fetal abdomen"),
        ("plane2", "x", "Fetal femur"),
        ("3", "x", "Fetal thorax"),
        ("", "patient004_UGA_plane0", "Fetal abdomen"),  # empty: the name's suffix
        ("", "patient004_UGA_plane0.png", "Fetal abdomen"),
        ("plane7", "patient004_UGA_plane0", None),
        ("Fetal kidney", "patient004_UGA_plane0", None),
    ],
)
def test_plane_values(value: str, name: str, plane: str | None) -> None:
    assert african_plane(value, name) == plane


def test_unknown_plane_values_are_reported(tmp_path: Path) -> None:
    rows = [("DZA", 1, k, 1) for k in range(4)]
    values = {0: "Fetal abdomen", 1: "kidney", 2: "", 3: "plane9"}
    root = write_african(tmp_path / "a", rows, noise, plane_value=values.__getitem__)
    data = load_dataset(root)
    assert data.class_counts() == {"Fetal abdomen": 1, "Fetal brain": 0, "Fetal femur": 1,
                                   "Fetal thorax": 0}
    assert data.unknown == {"kidney": 1, "plane9": 1}


def test_csv_one_folder_down_is_found(tmp_path: Path) -> None:
    """An archive extracted by hand keeps its top folder."""
    root = tmp_path / "download"
    write_african(root / "Zenodo_dataset", [("GHA", 1, k, 1) for k in range(4)], noise)
    layout, labels = detect_layout(root)
    assert layout == "african" and labels == root / "Zenodo_dataset" / AFRICAN_CSV
    assert len(load_dataset(root).samples) == 4


# ------------------------------------------------------------ a robust label-CSV reader


def _seed_layout(tmp_path: Path, text: str | None = None, raw: bytes | None = None) -> Path:
    """Two images and an image_label.csv given as text (UTF-8) or raw bytes."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for i in range(2):
        Image.fromarray(noise(0, i)).save(tmp_path / "images" / f"img{i}.png")
    path = tmp_path / "image_label.csv"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(text or "")
    return tmp_path


CSV_TEXT = "Image_name,Plane,Patient_num\nimg0,Fetal brain,Zoé 1\nimg1,Fetal femur,²\n"


@pytest.mark.parametrize(
    ("encoding", "warns"),
    [("utf-8", False), ("utf-8-sig", False), ("utf-16", False), ("utf-16-le", False),
     ("utf-16-be", False), ("latin-1", True)],
)
def test_encodings(tmp_path: Path, encoding: str, warns: bool,
                   capsys: pytest.CaptureFixture[str]) -> None:
    root = _seed_layout(tmp_path, raw=CSV_TEXT.encode(encoding))
    data = load_dataset(root)
    assert [s.patient for s in data.samples] == ["Zoé 1", "²"]  # odd ids are just strings
    assert [s.label for s in data.samples] == ["Fetal brain", "Fetal femur"]
    err = capsys.readouterr().err
    assert ("Windows-1252" in err or "Latin-1" in err) is warns  # cp1252 tried first
    assert err.count("warning") == int(warns)


def test_binary_label_file_is_one_line_naming_it(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200)  # an image saved as .csv
    root = _seed_layout(tmp_path, raw=png)
    with pytest.raises(LabelFileError) as e:
        load_dataset(root)
    assert str(e.value) == f"{root / 'image_label.csv'}: not a text CSV file (binary content)"
    r = CliRunner().invoke(app, ["data", "check", str(root)])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "binary content" in r.output


def test_read_label_text_strips_the_bom(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes("\ufeffa,b\n".encode("utf-16"))
    assert read_label_text(path) == "a,b\n"


def test_same_image_with_and_without_extension_counts_once(tmp_path: Path) -> None:
    root = _seed_layout(tmp_path, "Image_name,Plane\nimg0,Fetal brain\nimg0.png,Fetal brain\n"
                                  "img1.png,Fetal femur\nimages/img1.png,Fetal femur\n")
    data = load_dataset(root)
    assert len(data.samples) == 2
    assert data.duplicate_rows == ["img0.png", "images/img1.png"]
    assert not check_dataset(data, decode=False).ok


def test_african_duplicate_names_count_once(tmp_path: Path) -> None:
    root = write_african(tmp_path / "a", [("MWI", 1, k, 1) for k in range(4)], noise)
    csv_path = root / AFRICAN_CSV
    csv_path.write_text(csv_path.read_text() + "1,plane0,1,MWI,patient001_MWI_plane0.png\n")
    data = load_dataset(root)
    assert len(data.samples) == 4 and data.duplicate_rows == ["patient001_MWI_plane0.png"]


@pytest.mark.slow
def test_train_and_evaluate_on_african_data(african40: Path, tmp_path: Path) -> None:
    """`train` and `evaluate` read the layout through load_dataset: the Train=0 patients
    are the test split, and the held-out evaluation is broken down by site."""
    from fetalplanes.engine.evaluate import evaluate
    from fetalplanes.engine.train import TrainConfig, train

    cfg = TrainConfig(**(FAST | {"epochs": 2, "img_size": (64, 64)}))
    res = train(african40, config=cfg, out=tmp_path / "run", progress=False)
    assert res.card.classes == list(AFRICAN_PLANES)
    assert res.card.data["layout"] == "african"
    assert sorted(res.card.split["test"]) == sorted(f"{c}-2" for c in CENTRES.values())
    m = evaluate(res.run, progress=False).metrics
    assert m["n_images"] == 20 and set(m["by_site"]) == set(CENTRES.values())
    assert sum(g["n_images"] for g in m["by_site"].values()) == 20
