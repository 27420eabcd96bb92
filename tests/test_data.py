"""Data layer: layouts, presets, patients, splits (leakage asserted absent), errors."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from fetalplanes.data.datasets import (
    PRESETS,
    Sample,
    canonical_plane,
    detect_layout,
    kfold_by_patient,
    load_dataset,
    patient_from_name,
    split_by_patient,
)
from fetalplanes.errors import LabelFileError


def test_seed_layout_names_without_extension(seed_data: Path) -> None:
    rows = list(csv.DictReader((seed_data / "image_label.csv").read_text().splitlines()))
    assert not rows[0]["Image_name"].endswith(".png")
    data = load_dataset(seed_data)
    assert data.layout == "csv"
    assert len(data.samples) == 160
    assert data.class_counts() == {c: 40 for c in PRESETS["seed4"].classes}
    assert all(s.path.is_file() for s in data.samples)
    assert all(s.patient.startswith("Patient") for s in data.samples)


def test_seed_layout_names_with_extension(seed_data: Path, tmp_path: Path) -> None:
    shutil.copytree(seed_data / "images", tmp_path / "images")
    rows = list(csv.DictReader((seed_data / "image_label.csv").read_text().splitlines()))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image_name", "Plane"])
        for r in rows:
            w.writerow([r["Image_name"] + ".png", r["Plane"]])
    data = load_dataset(tmp_path, labels=tmp_path / "labels.csv")
    assert len(data.samples) == 160 and not data.missing


def test_fpdb_layout_presets_and_train_column(fpdb_data: Path) -> None:
    header = (fpdb_data / "FETAL_PLANES_DB_data.csv").read_text().splitlines()[0]
    assert header.endswith("Train ")
    seed4 = load_dataset(fpdb_data, preset="seed4")
    assert seed4.layout == "fpdb"
    assert set(seed4.dropped) == {"Maternal cervix", "Other"}
    assert sum(seed4.dropped.values()) == 24
    fpdb6 = load_dataset(fpdb_data, preset="fpdb6")
    assert len(fpdb6.classes) == 6 and len(fpdb6.samples) == 72
    assert {s.subset for s in fpdb6.samples} == {"train", "test"}
    brain3 = load_dataset(fpdb_data, preset="brain3")
    assert set(brain3.classes) == {"Trans-thalamic", "Trans-cerebellum", "Trans-ventricular"}
    assert len(brain3.samples) == 12
    split = split_by_patient(fpdb6.samples, seed=0)
    test_patients = {s.patient for s in fpdb6.samples if s.subset == "test"}
    assert set(split.test) == test_patients
    assert not set(split.val) & test_patients and not set(split.train) & test_patients


def test_folders_layout(folders_data: Path) -> None:
    data = load_dataset(folders_data)
    assert data.layout == "folders"
    assert data.class_counts() == {c: 10 for c in PRESETS["seed4"].classes}


def test_folder_aliases(tmp_path: Path, folders_data: Path) -> None:
    shutil.copytree(folders_data / "Fetal brain", tmp_path / "brain")
    shutil.copytree(folders_data / "Fetal femur", tmp_path / "FEMUR")
    shutil.copytree(folders_data / "Fetal femur", tmp_path / "kidney")
    data = load_dataset(tmp_path)
    assert data.class_counts()["Fetal brain"] == 10
    assert data.class_counts()["Fetal femur"] == 10
    assert data.unknown == {"kidney": 10}


def test_patient_ids() -> None:
    assert patient_from_name("Patient00168_Plane3_1_of_3.png") == "Patient00168"
    assert patient_from_name("img_001.png") is None


def test_patient_fallback_one_per_image(tmp_path: Path, seed_data: Path) -> None:
    (tmp_path / "images").mkdir()
    rows = list(csv.DictReader((seed_data / "image_label.csv").read_text().splitlines()))[:8]
    with open(tmp_path / "image_label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image_name", "Plane"])
        for i, r in enumerate(rows):
            shutil.copy(seed_data / "images" / f"{r['Image_name']}.png",
                        tmp_path / "images" / f"scan{i}.png")
            w.writerow([f"scan{i}", r["Plane"]])
    data = load_dataset(tmp_path)
    assert len(data.patients) == 8


def test_wrong_columns_named(tmp_path: Path) -> None:
    (tmp_path / "image_label.csv").write_text("file,label\na,Fetal brain\n")
    with pytest.raises(LabelFileError) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    assert "Image_name" in msg and "Plane" in msg and "file, label" in msg
    assert "\n" not in msg and "image_label.csv" in msg


def test_unknown_planes_reported_and_missing_files(tmp_path: Path, seed_data: Path) -> None:
    shutil.copytree(seed_data / "images", tmp_path / "images")
    rows = list(csv.DictReader((seed_data / "image_label.csv").read_text().splitlines()))
    with open(tmp_path / "image_label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image_name", "Plane"])
        for r in rows:
            w.writerow([r["Image_name"], r["Plane"]])
        w.writerow([rows[0]["Image_name"] + "x", "Fetal kidney"])
        w.writerow(["does_not_exist", "Fetal brain"])
        w.writerow([rows[1]["Image_name"], rows[1]["Plane"]])
    data = load_dataset(tmp_path)
    assert data.unknown == {"Fetal kidney": 1}
    assert data.missing == ["does_not_exist"]
    assert data.duplicate_rows == [rows[1]["Image_name"]]


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(LabelFileError, match="not found"):
        detect_layout(tmp_path / "nope")
    with pytest.raises(LabelFileError, match="no label file"):
        detect_layout(tmp_path)
    with pytest.raises(LabelFileError, match="unknown preset"):
        load_dataset(tmp_path, preset="seed5")


def test_canonical_plane() -> None:
    known = PRESETS["fpdb6"].classes
    assert canonical_plane(" fetal  BRAIN ", known) == "Fetal brain"
    assert canonical_plane("cervix", known) == "Maternal cervix"
    assert canonical_plane("liver", known) is None


def _fake(n_patients: int, per: int = 3) -> list[Sample]:
    classes = ["A", "B", "C", "D"]
    return [Sample(Path(f"p{p}_{i}.png"), classes[p % 4], f"P{p}")
            for p in range(n_patients) for i in range(per)]


def test_split_no_leakage_deterministic_and_stratified() -> None:
    samples = _fake(120)
    a = split_by_patient(samples, 0.15, 0.15, seed=3)
    b = split_by_patient(samples, 0.15, 0.15, seed=3)
    c = split_by_patient(samples, 0.15, 0.15, seed=4)
    assert a == b and a != c
    tr, va, te = set(a.train), set(a.val), set(a.test)
    assert not tr & va and not tr & te and not va & te
    assert tr | va | te == {s.patient for s in samples}
    assert 14 <= len(te) <= 22 and 14 <= len(va) <= 22
    labels_in_test = {s.label for s in samples if s.patient in te}
    assert labels_in_test == {"A", "B", "C", "D"}


def test_split_real_synthetic_no_leakage(seed_data: Path) -> None:
    data = load_dataset(seed_data)
    split = split_by_patient(data.samples, seed=0)
    by_patient = {}
    for s in data.samples:
        by_patient.setdefault(s.patient, set()).add(s)
    for name in ("train", "val", "test"):
        others = {n for n in ("train", "val", "test") if n != name}
        for p in split.of(name):
            assert all(p not in split.of(o) for o in others)
    assert len(split.test) > 0 and len(split.val) > 0


def test_kfold_partitions_patients() -> None:
    samples = _fake(30)
    folds = kfold_by_patient(samples, 3, seed=0)
    flat = [p for f in folds for p in f]
    assert len(flat) == len(set(flat)) == 30
    assert all(8 <= len(f) <= 12 for f in folds)


def test_origin_layout_as_a_user_types_it(seed_data: Path, tmp_path: Path) -> None:
    """image_label.csv beside train_test/: `--labels` with DATA=train_test, and DATA=."""
    import shutil

    from fetalplanes.data.datasets import load_dataset

    shutil.copytree(seed_data / "images", tmp_path / "train_test")
    shutil.copy(seed_data / "image_label.csv", tmp_path / "image_label.csv")
    expected = len(load_dataset(seed_data).samples)
    a = load_dataset(tmp_path / "train_test", tmp_path / "image_label.csv")
    b = load_dataset(tmp_path)
    assert len(a.samples) == len(b.samples) == expected and not a.missing and not b.missing
    assert all(s.path.parent.name == "train_test" for s in b.samples)


def test_data_that_cannot_give_an_honest_model_is_a_problem(tmp_path: Path) -> None:
    """One class, or no validation/test patients: data check exits 1; train refuses one
    class and warns about missing held-out patients."""
    from typer.testing import CliRunner

    from fetalplanes.cli import app
    from fetalplanes.data.synth import generate

    one = tmp_path / "one"
    generate(one, per_class=6, planes=("Fetal brain",), size=(90, 120), progress=False)
    r = CliRunner().invoke(app, ["data", "check", str(one), "--preset", "seed4"])
    assert r.exit_code == 1 and "only one class has images (Fetal brain)" in r.output
    t = CliRunner().invoke(app, ["train", str(one), "--model", "seed-cnn", "--epochs", "1",
                                 "--out", str(tmp_path / "run"), "-q"])
    assert t.exit_code == 2 and "only one class" in t.output
    assert not (tmp_path / "run" / "weights.safetensors").exists()
    tiny = tmp_path / "tiny"
    generate(tiny, per_class=2, size=(90, 120), progress=False)
    r = CliRunner().invoke(app, ["data", "check", str(tiny)])
    assert r.exit_code == 1 and "no val patients" in r.output
