"""Patient-grouped K-fold cross-validation, and the K fold runs as one ensemble predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, make_data

from fetalplanes.data.datasets import load_dataset
from fetalplanes.engine.crossval import cross_validate, fold_splits
from fetalplanes.engine.evaluate import evaluate
from fetalplanes.engine.train import TrainConfig
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.calibration import calibrated_probs, rejection_margin
from fetalplanes.inference.ensemble import is_ensemble_dir, member_runs
from fetalplanes.inference.predictor import Predictor

CV = dict(
    model="efficientnet_lite0",
    img_size=(64, 64),
    epochs=8,
    batch_size=16,
    lr=2e-3,
    seed=0,
    cache=True,
    workers=0,
)


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory, "cvdata", size=SMALL, fmt="seed", per_class=40, seed=31)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """New synthetic patients (another seed) that no fold ever saw."""
    return make_data(tmp_path_factory, "heldout", size=SMALL, fmt="seed", per_class=30, seed=32)


@pytest.fixture(scope="module")
def cv_out(tmp_path_factory: pytest.TempPathFactory, cv_data: Path) -> Path:
    out = tmp_path_factory.mktemp("cv") / "cv"
    cross_validate(cv_data, TrainConfig(**CV), folds=3, out=out, progress=False)
    return out


def test_fold_splits_partition_patients(cv_data: Path) -> None:
    data = load_dataset(cv_data)
    splits = fold_splits(data.samples, 3, seed=0)
    tests = [set(s.test) for s in splits]
    assert set().union(*tests) == set(data.patients) and sum(map(len, tests)) == len(data.patients)
    for s in splits:
        assert not (set(s.train) & set(s.val)) and not ((set(s.train) | set(s.val)) & set(s.test))
        assert s.val and set(s.train) | set(s.val) | set(s.test) == set(data.patients)
    with pytest.raises(FetalPlanesError, match="patients"):
        fold_splits(data.samples[:2], 3)


def test_crossval_writes_summary(cv_out: Path) -> None:
    summary = json.loads((cv_out / "cv_summary.json").read_text())
    assert summary["folds"] == 3 and len(summary["per_fold"]) == 3
    for key in ("accuracy", "macro_f1", "ece", "loss"):
        s = summary["summary"][key]
        values = [row[key] for row in summary["per_fold"]]
        assert s["mean"] == pytest.approx(np.mean(values))
        assert s["sd"] == pytest.approx(np.std(values, ddof=1))
    for k in (1, 2, 3):
        assert (cv_out / f"fold-{k}" / "model.json").is_file()
        assert (cv_out / f"fold-{k}" / "eval-test" / "metrics.json").is_file()
    assert is_ensemble_dir(cv_out) and not is_ensemble_dir(cv_out / "fold-1")
    assert [p.name for p in member_runs(cv_out)] == ["fold-1", "fold-2", "fold-3"]


def test_ensemble_beats_its_members_on_new_patients(
    cv_out: Path, heldout: Path, tmp_path: Path
) -> None:
    ens = Predictor.from_ensemble([cv_out], device="cpu")
    assert ens.card.temperature == 1.0 and ens.card.split == {}
    members = {}
    for run in member_runs(cv_out):
        m = evaluate(run, heldout, out=tmp_path / run.name, progress=False).metrics
        members[run.name] = m
    e = evaluate(cv_out, heldout, out=tmp_path / "ensemble", predictor=ens, progress=False).metrics
    accs = {k: round(m["accuracy"], 4) for k, m in members.items()}
    print(
        f"held-out accuracy: members {accs}, ensemble {e['accuracy']:.4f}; "
        f"ECE members {[round(m['ece'], 4) for m in members.values()]}, "
        f"ensemble {e['ece']:.4f}"
    )
    assert e["accuracy"] >= max(m["accuracy"] for m in members.values())
    assert 0.0 <= e["ece"] <= 1.0 and (tmp_path / "ensemble" / "reliability.png").is_file()


def test_ensemble_outputs_are_mean_probabilities_and_mean_margins(
    cv_out: Path, heldout: Path
) -> None:
    ens = Predictor.from_ensemble(member_runs(cv_out), device="cpu")
    data = load_dataset(heldout)
    pixels = np.stack([ens.pp.prepare(s.path) for s in data.samples[:12]])
    out = ens.outputs(pixels)
    probs, margins = [], []
    for backend, card in ens.backend.members:
        raw = backend.outputs(pixels)  # logits and the knn score
        assert raw.logits.shape == (12, len(card.classes)) and raw.score is not None
        assert card.rejection["method"] == "knn"
        probs.append(calibrated_probs(raw.logits, card.temperature))
        margins.append(rejection_margin(raw, card.temperature, card.rejection))
    np.testing.assert_allclose(calibrated_probs(out.logits), np.mean(probs, 0), atol=1e-5)
    assert ens.card.rejection["method"] == "margin" and ens.card.rejection["threshold"] == 0
    preds = ens.results([f"x{i}" for i in range(12)], out)
    np.testing.assert_array_equal([p.not_target for p in preds], np.mean(margins, 0) < 0)
    np.testing.assert_allclose([p.rejection_score for p in preds], np.mean(margins, 0),
                               atol=1e-4)


def test_ensemble_heatmap_and_errors(cv_out: Path, heldout: Path, tmp_path: Path) -> None:
    from fetalplanes.data.images import read_image
    from fetalplanes.inference.explain import heatmap

    ens = Predictor.from_ensemble([cv_out], device="cpu")
    heat = heatmap(ens, read_image(load_dataset(heldout).samples[0].path))
    assert heat.shape == tuple(ens.pp.size) and 0 <= heat.min() <= heat.max() <= 1
    with pytest.raises(FetalPlanesError, match="at least two"):
        Predictor.from_ensemble([cv_out / "fold-1"])
    odd = tmp_path / "odd"
    (odd / "a").mkdir(parents=True)
    assert not is_ensemble_dir(odd) and Predictor is not None


def test_crossval_cli_rejects_one_fold(cv_data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fetalplanes.cli import app

    res = CliRunner().invoke(app, ["crossval", str(cv_data), "--folds", "1"])
    assert res.exit_code == 2 and "at least 2" in res.output
