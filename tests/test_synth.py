"""Tests of the synthetic phantom generator: layouts, determinism, look, learnability."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fetalplanes.data.synth import (
    BRAIN_PLANES,
    FPDB_HEADER,
    PLANES,
    SEED4,
    SynthSummary,
    generate,
    main_preview,
    render_phantom,
)

NAME_RE = re.compile(r"^Patient(\d{5})_Plane(\d)_(\d+)_of_(\d+)$")
SMALL = (64, 96)


def _parse(name: str) -> tuple[int, str, int, int]:
    """(patient, plane, i, n) from a synthetic image name."""
    m = NAME_RE.match(name)
    assert m, f"bad image name {name!r}"
    patient, k, i, n = (int(g) for g in m.groups())
    return patient, PLANES[k - 1], i, n


def _check_names(
    names: list[str], planes: tuple[str, ...], per_class: int, lo: int, hi: int
) -> None:
    """Exact counts per plane, i runs 1..n per (patient, plane), 1-3 planes per patient."""
    groups: dict[tuple[int, str], list[tuple[int, int]]] = defaultdict(list)
    for name in names:
        patient, plane, i, n = _parse(name)
        groups[(patient, plane)].append((i, n))
    counts = {p: sum(len(v) for (_, q), v in groups.items() if q == p) for p in planes}
    assert counts == {p: per_class for p in planes}
    for items in groups.values():
        n = items[0][1]
        assert sorted(i for i, _ in items) == list(range(1, n + 1))
        assert {m for _, m in items} == {n}
        assert 1 <= n <= hi
    planes_of: dict[int, set[str]] = defaultdict(set)
    for patient, plane in groups:
        planes_of[patient].add(plane)
    assert all(1 <= len(v) <= 3 for v in planes_of.values())
    assert sorted(planes_of) == list(range(1, len(planes_of) + 1))
    assert sum(n >= lo for n in (v[0][1] for v in groups.values())) >= len(groups) - len(planes)


# ---------------------------------------------------------------- render_phantom


@pytest.mark.parametrize("plane", PLANES)
def test_render_shape_dtype_and_black_outside_sector(plane: str) -> None:
    img = render_phantom(plane, np.random.default_rng(3))
    assert img.shape == (540, 800) and img.dtype == np.uint8
    h, w = img.shape
    for corner in (img[-30:, :30], img[-30:, -30:], img[:30, :30], img[:30, -30:]):
        assert np.median(corner) <= 3, "corners must be black apart from burnt-in text"
        assert (corner > 60).mean() < 0.35
    bottom_middle = img[int(0.97 * h) : int(0.99 * h), int(0.3 * w) : int(0.7 * w)]
    assert bottom_middle.max() <= 3, "below the fan there is nothing"
    centre = img[int(0.35 * h) : int(0.75 * h), int(0.35 * w) : int(0.65 * w)]
    assert centre.mean() > 15, "the sector holds tissue"


def test_render_other_sizes_and_brain_planes() -> None:
    rng = np.random.default_rng(0)
    for bp in BRAIN_PLANES:
        img = render_phantom("Fetal brain", rng, size=(135, 200), brain_plane=bp)
        assert img.shape == (135, 200) and img.dtype == np.uint8
    img = render_phantom("Fetal femur", rng, size=(256, 256))
    assert img.shape == (256, 256)


def test_render_is_deterministic_for_a_seed() -> None:
    a = render_phantom("Fetal thorax", np.random.default_rng(7), size=SMALL)
    b = render_phantom("Fetal thorax", np.random.default_rng(7), size=SMALL)
    c = render_phantom("Fetal thorax", np.random.default_rng(8), size=SMALL)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unknown_plane_raises_naming_valid_ones() -> None:
    with pytest.raises(ValueError, match="Fetal kidney") as info:
        render_phantom("Fetal kidney", np.random.default_rng(0))
    assert all(p in str(info.value) for p in PLANES)
    with pytest.raises(ValueError, match="Trans-orbital"):
        render_phantom("Fetal brain", np.random.default_rng(0), brain_plane="Trans-orbital")
    with pytest.raises(ValueError, match="Fetal kidney"):
        generate("unused-never-created", planes=("Fetal kidney",), progress=False)
    assert not Path("unused-never-created").exists()


# ---------------------------------------------------------------- generate: layouts


def test_seed_layout(tmp_path: Path) -> None:
    out = tmp_path / "seed"
    s = generate(out, per_class=6, fmt="seed", seed=1, size=SMALL, progress=False)
    assert isinstance(s, SynthSummary)
    assert (s.out, s.format, s.n_images) == (out, "seed", 24)
    assert s.per_class == {p: 6 for p in SEED4}
    assert s.labels_file == out / "image_label.csv"
    lines = s.labels_file.read_text().splitlines()
    assert lines[0] == "Image_name,Plane"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 24
    names = [name for name, _ in rows]
    for name, plane in rows:
        assert not name.endswith(".png")
        assert _parse(name)[1] == plane
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(names)
    assert sorted(f.name for f in out.iterdir()) == ["image_label.csv", "images"]
    _check_names(names, SEED4, 6, 2, 4)
    assert s.n_patients == max(_parse(n)[0] for n in names)
    with Image.open(out / "images" / f"{names[0]}.png") as im:
        assert (im.mode, im.size) == ("L", (SMALL[1], SMALL[0]))


def test_fpdb_layout(tmp_path: Path) -> None:
    out = tmp_path / "fpdb"
    s = generate(
        out,
        per_class=8,
        fmt="fpdb",
        seed=2,
        planes=PLANES,
        size=SMALL,
        images_per_patient=(1, 3),
        train_fraction=0.7,
        progress=False,
    )
    assert s.labels_file == out / "FETAL_PLANES_DB_data.csv"
    raw = s.labels_file.read_text()
    header = raw.splitlines()[0]
    assert header == "Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train "
    assert header == FPDB_HEADER
    rows = [line.split(";") for line in raw.splitlines()[1:]]
    assert len(rows) == 48 and all(len(r) == 7 for r in rows)
    train_of: dict[int, set[str]] = defaultdict(set)
    for name, num, plane, brain, operator, machine, train in rows:
        patient, name_plane, _, _ = _parse(name)
        assert int(num) == patient and name_plane == plane
        assert brain in BRAIN_PLANES if plane == "Fetal brain" else brain == "Not A Brain"
        assert operator.startswith("Op. ") or operator == "Other"
        assert machine
        assert train in ("0", "1")
        train_of[patient].add(train)
        assert (out / "Images" / f"{name}.png").is_file()
    assert all(len(v) == 1 for v in train_of.values()), "Train is per patient"
    share = sum(v == {"1"} for v in train_of.values()) / len(train_of)
    assert abs(share - 0.7) <= 0.1
    assert len(list((out / "Images").iterdir())) == 48
    assert {r[3] for r in rows if r[2] == "Fetal brain"} <= set(BRAIN_PLANES)
    _check_names([r[0] for r in rows], PLANES, 8, 1, 3)
    assert s.per_class == {p: 8 for p in PLANES} and s.n_patients == len(train_of)


def test_folders_layout(tmp_path: Path) -> None:
    out = tmp_path / "folders"
    s = generate(
        out,
        per_class=5,
        fmt="folders",
        seed=3,
        planes=("Fetal brain", "Other"),
        size=SMALL,
        progress=False,
    )
    assert s.labels_file is None and s.n_images == 10
    assert sorted(f.name for f in out.iterdir()) == ["Fetal brain", "Other"]
    for plane in ("Fetal brain", "Other"):
        files = sorted((out / plane).iterdir())
        assert len(files) == 5 and all(f.suffix == ".png" for f in files)
        assert all(_parse(f.stem)[1] == plane for f in files)
    assert not list(out.glob("*.csv"))


def test_progress_bar_says_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(tmp_path / "p", per_class=1, size=SMALL, progress=True)
    assert "synthetic images" in capsys.readouterr().err


# ---------------------------------------------------------------- generate: safety, determinism


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kw = dict(per_class=4, fmt="fpdb", size=SMALL, progress=False)
    a = _all_bytes(generate(tmp_path / "a", seed=5, **kw).out)
    b = _all_bytes(generate(tmp_path / "b", seed=5, **kw).out)
    c = _all_bytes(generate(tmp_path / "c", seed=6, **kw).out)
    assert a == b
    common = set(a) & set(c)
    pngs = [k for k in common if k.endswith(".png")]
    assert pngs and all(a[k] != c[k] for k in pngs)


def test_refuses_non_empty_output(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="busy"):
        generate(out, per_class=1, size=SMALL, progress=False)
    assert [f.name for f in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate(empty, per_class=1, size=SMALL, progress=False).n_images == 4


def test_patients_share_a_look(tmp_path: Path) -> None:
    """Image brightness clusters by patient, so a patient-grouped split matters."""
    out = generate(
        tmp_path / "look",
        per_class=30,
        fmt="folders",
        seed=4,
        planes=("Fetal abdomen",),
        size=SMALL,
        progress=False,
    ).out
    by_patient: dict[int, list[float]] = defaultdict(list)
    for f in (out / "Fetal abdomen").iterdir():
        by_patient[_parse(f.stem)[0]].append(float(np.asarray(Image.open(f)).mean()))
    means = np.concatenate([v for v in by_patient.values()])
    within = np.mean([np.var(v) for v in by_patient.values() if len(v) > 1])
    assert within < 0.5 * np.var(means)


def test_main_preview_writes_contact_sheet(tmp_path: Path) -> None:
    path = main_preview(tmp_path / "sheet.png")
    with Image.open(path) as im:
        assert im.size[0] == 1600 and im.size[1] > 6 * 270


# ---------------------------------------------------------------- learnability


def _load(root: Path, planes: tuple[str, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    images, labels = [], []
    for k, plane in enumerate(planes):
        for f in sorted((root / plane).iterdir()):
            images.append(np.asarray(Image.open(f)))
            labels.append(k)
    return images, np.array(labels)


def _features(img: np.ndarray) -> np.ndarray:
    """Grey-level histogram plus gradient-magnitude histogram: no spatial layout at all."""
    grey = np.histogram(img, bins=16, range=(0, 256))[0] / img.size
    smooth = cv2.GaussianBlur(img.astype(np.float32), (5, 5), 0)
    mag = np.hypot(cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1))
    edges = np.histogram(mag, bins=16, range=(0, 400))[0] / img.size
    return np.concatenate([grey, edges])


def test_learnable_but_not_by_mean_intensity(tmp_path: Path) -> None:
    """Train on one seed's patients, test on another seed's: the task is learnable from
    image content, yet mean intensity alone stays near chance (0.25)."""
    kw = dict(per_class=40, fmt="folders", planes=SEED4, size=(135, 200), progress=False)
    train_x, train_y = _load(generate(tmp_path / "train", seed=11, **kw).out, SEED4)
    test_x, test_y = _load(generate(tmp_path / "test", seed=12, **kw).out, SEED4)

    def accuracy(feature) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
        clf.fit(np.array([feature(x) for x in train_x]), train_y)
        return float((clf.predict(np.array([feature(x) for x in test_x])) == test_y).mean())

    acc_features = accuracy(_features)
    acc_mean = accuracy(lambda x: np.array([x.mean()]))
    assert acc_features >= 0.5, acc_features
    assert acc_mean <= 0.45, acc_mean
    assert acc_features - acc_mean >= 0.15
