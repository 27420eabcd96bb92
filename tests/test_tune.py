"""Optuna search end to end on a tiny synthetic set; its best config feeds `train --config`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fetalplanes.engine.train import TrainConfig
from fetalplanes.errors import FetalPlanesError

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fetalplanes.data.synth import generate

    out = tmp_path_factory.mktemp("tune") / "data"
    generate(out, per_class=12, fmt="seed", seed=41, size=(96, 128), progress=False)
    return out


@pytest.mark.slow
def test_tune_end_to_end(tiny: Path, tmp_path: Path) -> None:
    from fetalplanes.engine.tune import SearchSpace, supports_on_epoch, tune

    base = TrainConfig(img_size=(48, 48), epochs=2, batch_size=16, workers=0, cache=True)
    space = SearchSpace(models=("efficientnet_lite0", "seed-cnn"))
    res = tune(tiny, base=base, trials=5, out=tmp_path / "study", space=space, progress=False)
    best = TrainConfig.from_dict(json.loads((res.out / "best_config.json").read_text()))
    assert best.model in space.models and best.epochs == 2 and best.img_size == (48, 48)
    assert space.lr[0] <= best.lr <= space.lr[1]
    rows = list(csv.DictReader((res.out / "trials.csv").read_text().splitlines()))
    assert len(rows) == 5 and {"lr", "model", "label_smoothing", "freeze_epochs"} <= set(rows[0])
    finished = [r for r in rows if r["state"] == "COMPLETE"]
    assert finished and min(float(r["value"]) for r in finished) == pytest.approx(
        res.best_value, abs=1e-5
    )
    assert supports_on_epoch()


def test_pruning_callback_raises_trial_pruned() -> None:
    import optuna

    from fetalplanes.engine.tune import _pruning_callback

    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    trial = study.ask()
    callback = _pruning_callback(trial, optuna)
    callback(1, {"epoch": 1, "val_loss": 0.5})
    with pytest.raises(optuna.TrialPruned):
        callback(2, {"epoch": 2, "val_loss": 3.0})


def test_tune_refuses_bad_arguments(tiny: Path, tmp_path: Path) -> None:
    from fetalplanes.engine.tune import tune

    with pytest.raises(FetalPlanesError, match="at least 1"):
        tune(tiny, trials=0, out=tmp_path / "a")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(FetalPlanesError, match="not empty"):
        tune(tiny, trials=1, out=busy)
