"""Training: it learns on unseen patients, is deterministic, writes a complete run folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import FAST

from fetalplanes.data.datasets import load_dataset
from fetalplanes.engine.evaluate import evaluate
from fetalplanes.engine.train import TrainConfig, lr_at, train
from fetalplanes.errors import FetalPlanesError


def test_run_folder_contents(trained_run: Path) -> None:
    for name in ("weights.safetensors", "model.json", "history.csv", "curves.png",
                 "train_config.json"):
        assert (trained_run / name).is_file(), name
    side = json.loads((trained_run / "model.json").read_text())
    assert side["classes"] == ["Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax"]
    assert side["preprocess"]["size"] == list(FAST["img_size"])
    assert side["data"]["fingerprint"] and side["data"]["layout"] == "csv"
    split = side["split"]
    assert split["train"] and split["val"] and split["test"]
    assert not set(split["train"]) & set(split["test"])
    assert not set(split["val"]) & set(split["test"])
    rows = list(csv.DictReader((trained_run / "history.csv").read_text().splitlines()))
    assert len(rows) == FAST["epochs"] and "val_loss" in rows[0]
    assert side["metrics"]["best_epoch"] == min(
        range(1, len(rows) + 1), key=lambda e: float(rows[e - 1]["val_loss"]))


def test_training_learns_on_unseen_patients(trained_run: Path) -> None:
    m = evaluate(trained_run, progress=False).metrics
    # 4 classes: chance is 0.25; the held-out patients were never seen in training
    assert m["accuracy"] >= 0.6, m["accuracy"]
    side = json.loads((trained_run / "model.json").read_text())
    test_patients = set(side["split"]["test"])
    data = load_dataset(side["data"]["root"])
    assert m["n_images"] == len(data.subset(test_patients))


@pytest.mark.slow
def test_deterministic_for_a_seed(seed_data: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(**(FAST | {"epochs": 1, "img_size": (48, 48)}))
    a = train(seed_data, config=cfg, out=tmp_path / "a", progress=False)
    b = train(seed_data, config=cfg, out=tmp_path / "b", progress=False)
    ha = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in a.history]
    hb = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in b.history]
    assert ha == hb
    assert (tmp_path / "a/weights.safetensors").read_bytes() == (
        tmp_path / "b/weights.safetensors").read_bytes()


def test_refuses_to_overwrite_a_run(seed_data: Path, trained_run: Path) -> None:
    with pytest.raises(FetalPlanesError, match="not empty"):
        train(seed_data, config=TrainConfig(**FAST), out=trained_run, progress=False)


@pytest.mark.slow
def test_unreadable_training_image_is_skipped(seed_data: Path, tmp_path: Path) -> None:
    import shutil

    data_dir = tmp_path / "d"
    shutil.copytree(seed_data, data_dir)
    victim = sorted((data_dir / "images").iterdir())[0]
    victim.write_bytes(b"corrupt")
    cfg = TrainConfig(**(FAST | {"epochs": 1, "img_size": (32, 32), "cache": False}))
    res = train(data_dir, config=cfg, out=tmp_path / "r", progress=False)
    unreadable = res.card.data["unreadable"]
    assert any(victim.name in m for m in unreadable) or victim.stem not in str(res.card.split)


def test_lr_schedule() -> None:
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(99, 100, 10, 1.0) < 0.05


def test_config_roundtrip_and_unknown_keys() -> None:
    cfg = TrainConfig(model="seed-cnn", img_size=(64, 64))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FetalPlanesError, match="unknown training option"):
        TrainConfig.from_dict({"modle": "x"})
