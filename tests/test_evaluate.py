"""Evaluation outputs on held-out patients and on another data set."""

from __future__ import annotations

import json
from pathlib import Path

from fetalplanes.evaluate import evaluate

KEYS = {"loss", "accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix",
        "classes", "n_images", "ece", "brier"}


def test_outputs(trained_run: Path, tmp_path: Path) -> None:
    res = evaluate(trained_run, out=tmp_path / "ev", progress=False)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(m) >= KEYS
    assert m == json.loads(json.dumps(res.metrics))
    assert sum(sum(r) for r in m["confusion_matrix"]) == m["n_images"]
    assert set(m["per_class"]) == set(m["classes"])
    assert {"precision", "recall", "f1", "support"} <= set(m["per_class"]["Fetal brain"])
    for name in ("confusion_matrix.png", "reliability.png", "report.md", "predictions.csv"):
        assert (tmp_path / "ev" / name).is_file()
    assert "accuracy" in (tmp_path / "ev" / "report.md").read_text()


def test_val_split_and_other_dataset(trained_run: Path, folders_data: Path, tmp_path: Path
                                     ) -> None:
    val = evaluate(trained_run, split="val", out=tmp_path / "v", progress=False).metrics
    test = evaluate(trained_run, split="test", out=tmp_path / "t", progress=False).metrics
    assert val["n_images"] != test["n_images"] or val["evaluated_on"] != test["evaluated_on"]
    other = evaluate(trained_run, folders_data, out=tmp_path / "o", progress=False).metrics
    assert other["n_images"] == 40 and "all 40 images" in other["evaluated_on"]
