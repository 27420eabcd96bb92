"""Zero-shot SonoNet through the CLI, as a new user runs it on real scans (shared/ data)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_dir
from PIL import Image
from typer.testing import CliRunner

from fetalplanes.cli import app

pytestmark = pytest.mark.slow  # real frames and subprocesses: CI lane

SEED4_OF = {"3VV": "Fetal thorax", "4CH": "Fetal thorax", "LVOT": "Fetal thorax",
            "RVOT": "Fetal thorax", "ABDOMINAL": "Fetal abdomen", "BRAIN-CB": "Fetal brain",
            "BRAIN-TV": "Fetal brain", "FEMUR": "Fetal femur"}

SONONET_NAME = {"3VV": "3VV", "4CH": "4CH", "ABDOMINAL": "Abdominal", "BRAIN-CB": "Brain (Cb.)",
                "BRAIN-TV": "Brain (Tv.)", "FEMUR": "Femur", "KIDNEYS": "Kidneys", "LIPS": "Lips",
                "LVOT": "LVOT", "PROFILE": "Profile", "RVOT": "RVOT",
                "SPINE-CORONAL": "Spine (cor.)", "SPINE-SAGITTAL": "Spine (sag.)"}


@pytest.fixture(scope="module")
def sononet() -> tuple[Path, Path, Path]:
    root = shared_dir()
    weights = root / "sononet" / "SonoNet16.pth"
    if not weights.is_file():
        pytest.skip(f"SonoNet weights not found at {weights}: shared/ data is absent "
                    "(set FETALPLANES_SHARED)")
    return weights, root / "sononet" / "example_images", root / "hc18-sample"


def _predict_csv(weights: Path, *inputs: Path) -> list[dict[str, str]]:
    r = CliRunner().invoke(app, ["predict", "--model", "sononet16", "--weights", str(weights),
                                 "--format", "csv", "-q", *map(str, inputs)])
    assert r.exit_code == 0, r.output
    return list(csv.DictReader(io.StringIO(r.stdout)))


def test_example_frames_fold_to_their_plane(sononet) -> None:
    weights, frames, _ = sononet
    rows = _predict_csv(weights, frames)
    assert len(rows) == 13
    for row in rows:
        stem = Path(row["path"]).stem
        assert row["label"] == SEED4_OF.get(stem, "not_target"), row
        assert row["model_label"]
    wrong = [Path(r["path"]).stem for r in rows if r["model_label"] != SONONET_NAME[
        Path(r["path"]).stem]]
    assert wrong in ([], ["3VV"])  # 3VV reads as RVOT on the auto-cropped frame (both thorax)


def test_hc18_heads_fold_to_brain(sononet) -> None:
    weights, _, heads = sononet
    rows = _predict_csv(weights, heads)
    brain = sum(r["label"] == "Fetal brain" for r in rows)
    assert len(rows) == 24 and brain >= 20  # measured: 22/24


def test_stable_to_the_scanner_ui(sononet, tmp_path: Path) -> None:
    """The same frame with and without its scanner UI gives the same plane."""
    weights, frames, _ = sononet
    for f in sorted(frames.iterdir()):
        rgb = np.asarray(Image.open(f).convert("RGB"))
        Image.fromarray(rgb[115:734, 81:874]).save(tmp_path / f.name)  # UI cut away
    full = {Path(r["path"]).name: r["label"] for r in _predict_csv(weights, frames)}
    bare = {Path(r["path"]).name: r["label"] for r in _predict_csv(weights, tmp_path)}
    assert full == bare


def test_zero_shot_sort(sononet, tmp_path: Path) -> None:
    weights, frames, _ = sononet
    r = CliRunner().invoke(app, ["sort", "--model", "sononet16", "--weights", str(weights),
                                 str(frames), str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "out" / "not_target").iterdir())) == 5
    assert len(list((tmp_path / "out" / "Fetal thorax").iterdir())) == 4


def test_bundled_weights_need_no_weights_flag(sononet) -> None:
    """The package ships SonoNet-16: `predict sononet16 FRAMES` works with no --weights and
    gives the same folded labels as the published file (its sha256 equals download's pin)."""
    from fetalplanes.models import get_spec
    from fetalplanes.tools.download import ASSETS, sha256_of

    bundled = get_spec("sononet16").bundled_weights()
    assert bundled is not None and sha256_of(bundled) == ASSETS["sononet16"].sha256
    assert (bundled.parent / "LICENSE").is_file() and (bundled.parent / "NOTICE.md").is_file()
    weights, frames, _ = sononet
    for args in (["sononet16"], ["--model", "sononet16"]):
        r = CliRunner().invoke(app, ["predict", *args, "--format", "csv", "-q", str(frames)])
        assert r.exit_code == 0, r.output
        rows = list(csv.DictReader(io.StringIO(r.stdout)))
        assert len(rows) == 13
        assert all(row["label"] == SEED4_OF.get(Path(row["path"]).stem, "not_target")
                   for row in rows)
    header = r.stdout.splitlines()[0].split(",")
    assert len(header) == len(set(header))  # the zero-shot CSV once had not_target twice
    explicit = _predict_csv(weights, frames)  # --weights: the torch model
    assert [r["label"] for r in explicit] == [r["label"] for r in rows]


def test_unknown_model_name_is_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["predict", "nonesuch", str(tmp_path)])
    assert r.exit_code == 2 and "not a run folder, an .onnx file or a pretrained" in r.output


def test_not_target_for_the_bundled_model_is_background_or_other_planes() -> None:
    """No fitted rule: temperature 1 and no threshold are stated in the card; blank and
    noise frames fold to not_target through SonoNet's Background class."""
    from fetalplanes.inference.predictor import Predictor

    p = Predictor.load("sononet16")
    assert p.card.temperature == 1.0 and not p.card.rejection
    rng = np.random.default_rng(0)
    images = [np.zeros((540, 800), np.uint8), np.full((540, 800), 128, np.uint8),
              rng.integers(0, 256, (540, 800)).astype(np.uint8)]
    for r in p.predict_arrays(images):
        assert r.label == "not_target" and r.not_target and r.model_label == "Background"


def test_evaluate_the_bundled_model_on_labelled_real_scans(
    sononet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`evaluate sononet16 DATA` scores the folded planes (not_target counts as an error)
    and writes runs/eval/sononet16-<data>/, never into the package."""
    import json
    import shutil

    _, _, heads = sononet
    data = tmp_path / "heads"
    (data / "Fetal brain").mkdir(parents=True)
    for f in sorted(heads.glob("*.png")):
        shutil.copy(f, data / "Fetal brain" / f.name)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["evaluate", "sononet16", str(data)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "runs" / "eval" / "sononet16-heads" / "metrics.json")
                         .read_text())
    assert metrics["n_images"] == 24 and metrics["accuracy"] >= 0.8
