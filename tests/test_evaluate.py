"""Evaluation outputs on held-out patients and on another data set."""

from __future__ import annotations

import json
from pathlib import Path

from fetalplanes.engine.evaluate import evaluate

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


def test_rejection_is_reported(trained_run: Path, tmp_path: Path) -> None:
    m = evaluate(trained_run, out=tmp_path / "ev", progress=False).metrics
    r = m["rejection"]
    assert 0 <= r["rejection_rate"] <= 1 and r["coverage"] == 1 - r["rejection_rate"]
    assert r["n_rejected"] == round(r["rejection_rate"] * m["n_images"])
    assert len(r["risk_coverage"]["coverage"]) == m["n_images"]
    assert (tmp_path / "ev" / "risk_coverage.png").is_file()
    assert "Rejected as not a target plane" in (tmp_path / "ev" / "report.md").read_text()


def test_other_data_never_replaces_the_heldout_evaluation(
    trained_run: Path, folders_data: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    evaluate(run, progress=False)
    held = {p.name: p.read_bytes() for p in (run / "eval-test").iterdir()}
    assert json.loads((run / "model.json").read_text())["metrics"]["test"]["n_images"] > 0
    first = evaluate(run, folders_data, progress=False).out
    second = evaluate(run, folders_data, progress=False).out
    name = folders_data.name
    assert first == run / f"eval-{name}" and second == run / f"eval-{name}-2"
    assert {p.name: p.read_bytes() for p in (run / "eval-test").iterdir()} == held
    with open(first / "predictions.csv") as f:
        header = f.readline().strip().split(",")
    assert header[:3] == ["true_label", "patient", "path"] and len(header) == len(set(header))
