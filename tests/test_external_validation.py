"""External validation: a run evaluated on other data, classes matched by name, results
broken down by site, machine and operator."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import test_african as african
from conftest import FAST
from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.data.datasets import AFRICAN_PLANES, PLANES, LabelledData, Sample
from fetalplanes.engine.evaluate import (
    ClassMap,
    evaluate,
    evaluation_metrics,
    group_metrics,
    map_classes,
)
from fetalplanes.errors import FetalPlanesError

SIX_TO_FOUR = ClassMap(list(AFRICAN_PLANES), list(PLANES), {c: i for i, c in enumerate(PLANES[:4])})


def _onehot(pred: list[int], n: int = 6) -> np.ndarray:
    probs = np.full((len(pred), n), 0.02)
    probs[np.arange(len(pred)), pred] = 1 - 0.02 * (n - 1)
    return probs


def test_six_class_model_on_four_class_data() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = [0, 4, 1, 1, 2, 5, 3, 0]  # one cervix, one other, one thorax->abdomen
    m = evaluation_metrics(_onehot(pred), y, SIX_TO_FOUR)
    assert m["classes"] == list(AFRICAN_PLANES) and m["model_classes"] == list(PLANES)
    assert m["accuracy"] == 5 / 8
    assert m["predicted_outside_data"] == {"Maternal cervix": 1, "Other": 1}
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() + 2 == 8 and np.trace(cm) == 5
    assert set(m["per_class"]) == set(AFRICAN_PLANES)
    assert m["per_class"]["Fetal abdomen"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5 + 0.5) / 4)
    f1 = [v["f1"] for v in m["per_class"].values()]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))


def test_identical_classes_keep_the_plain_metrics() -> None:
    same = ClassMap(list(PLANES), list(PLANES), {c: i for i, c in enumerate(PLANES)})
    m = evaluation_metrics(_onehot([0, 1, 2, 3, 4, 5]), np.arange(6), same)
    assert m["accuracy"] == 1.0 and "predicted_outside_data" not in m


def _data(classes: list[str], labels: list[str]) -> tuple[LabelledData, list[Sample]]:
    samples = [Sample(Path(f"{i}.png"), lab, f"P{i}") for i, lab in enumerate(labels)]
    return LabelledData(Path("other"), "csv", None, "x", classes, samples), samples


def test_map_classes_by_name_and_refuses_classes_the_model_lacks() -> None:
    data, samples = _data(["Fetal brain", "Fetal femur", "Fetal thorax"], ["Fetal brain",
                                                                         "Fetal femur"])
    cmap = map_classes(data, ["fetal femur", "Fetal brain", "Other"], samples, same=False)
    assert cmap.data_classes == ["Fetal brain", "Fetal femur"]  # thorax: no image of it
    assert cmap.run_index == {"Fetal brain": 1, "Fetal femur": 0} and cmap.outside == [2]
    data, samples = _data(list(PLANES), list(PLANES))
    with pytest.raises(FetalPlanesError) as e:
        map_classes(data, list(PLANES[:4]), samples, same=False)
    msg = str(e.value)
    assert "Maternal cervix, Other" in msg and "--preset" in msg and "\n" not in msg


def test_group_metrics_score_each_site_on_its_own_classes() -> None:
    meta = [{"site": "A"}] * 4 + [{"site": "B"}] * 3 + [{}]
    samples = [Sample(Path(f"{i}.png"), "x", f"P{i // 2}", None, m) for i, m in enumerate(meta)]
    y = np.array([0, 1, 2, 3, 0, 1, 2, 0])
    pred = np.array([0, 1, 2, 0, 0, 3, 2, 0])  # B has no class 3 but one is predicted
    g = group_metrics(samples, pred, y)
    assert set(g) == {"by_site"}
    a, b, none = g["by_site"]["A"], g["by_site"]["B"], g["by_site"]["(not recorded)"]
    assert a["n_images"] == 4 and a["n_patients"] == 2 and a["accuracy"] == 0.75
    assert a["balanced_accuracy"] == 0.75 and a["classes_present"] == 4
    assert b["n_images"] == 3 and b["accuracy"] == pytest.approx(2 / 3)
    assert b["balanced_accuracy"] == pytest.approx(2 / 3) and b["classes_present"] == 3
    assert b["macro_f1"] == pytest.approx((1 + 0 + 1) / 3)
    assert none["n_images"] == 1


# ------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def african_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ext") / "african"
    return african.write_african(root, african.forty_rows(), african.phantom())


@pytest.fixture(scope="module")
def fpdb6_run(tmp_path_factory: pytest.TempPathFactory, fpdb_data: Path) -> Path:
    from fetalplanes.engine.train import TrainConfig, train

    cfg = TrainConfig(**(FAST | {"epochs": 1, "img_size": (64, 64)}))
    out = tmp_path_factory.mktemp("fpdb6run") / "run"
    train(fpdb_data, preset="fpdb6", config=cfg, out=out, progress=False)
    return out


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


@pytest.mark.slow
def test_four_class_run_on_african_data_by_site(trained_run: Path, african_data: Path,
                                                tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    res = evaluate(run, african_data, progress=False)
    assert res.out == run / "eval-african"
    m = res.metrics
    assert m["n_images"] == 40 and m["classes"] == list(AFRICAN_PLANES)
    assert "predicted_outside_data" not in m
    assert set(m["by_site"]) == set(african.CENTRES)
    for g in m["by_site"].values():
        assert g["n_images"] == 8 and g["n_patients"] == 2
        assert set(g) >= {"accuracy", "balanced_accuracy", "macro_f1"}
    report = (res.out / "report.md").read_text()
    assert "## By site" in report and "| DZA | 8 | 2 |" in report
    assert _header(res.out / "predictions.csv")[:4] == ["true_label", "patient", "site", "path"]
    saved = json.loads((res.out / "metrics.json").read_text())
    assert saved["by_site"] == json.loads(json.dumps(m["by_site"]))


@pytest.mark.slow
def test_six_class_run_on_four_class_african_data(fpdb6_run: Path, african_data: Path,
                                                  tmp_path: Path) -> None:
    m = evaluate(fpdb6_run, african_data, out=tmp_path / "ev", progress=False).metrics
    assert m["classes"] == list(AFRICAN_PLANES) and m["model_classes"] == list(PLANES)
    outside = m["predicted_outside_data"]
    assert set(outside) == {"Maternal cervix", "Other"}
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() + sum(outside.values()) == m["n_images"] == 40
    assert m["accuracy"] == pytest.approx(np.trace(cm) / 40)
    assert "## Classes the data lacks" in (tmp_path / "ev" / "report.md").read_text()
    with open(tmp_path / "ev" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"p_Maternal cervix", "p_Other"} <= set(rows[0])
    top = [max(PLANES, key=lambda c, r=r: float(r[f"p_{c}"])) for r in rows]
    assert sum(t in outside for t in top) == sum(outside.values())


@pytest.mark.slow
def test_cli_external_validation_and_preset_mismatch(fpdb6_run: Path, trained_run: Path,
                                                     african_data: Path, fpdb_data: Path,
                                                     tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["evaluate", str(fpdb6_run), str(african_data),
                            "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "classes the data lacks" in r.output and "DZA" in r.output
    # A 4-class run on FETAL_PLANES_DB read as 6 classes: the extra ones are an error ...
    r = runner.invoke(app, ["evaluate", str(trained_run), str(fpdb_data), "--preset", "fpdb6",
                            "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "Maternal cervix, Other" in r.output
    assert r.output.strip().count("\n") == 0
    # ... under the run's own preset the data matches, broken down by machine and operator.
    r = runner.invoke(app, ["evaluate", str(trained_run), str(fpdb_data),
                            "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["classes"] == list(PLANES[:4]) and "by_site" not in m
    assert set(m) >= {"by_machine", "by_operator"}
    assert sum(g["n_images"] for g in m["by_machine"].values()) == m["n_images"]
    header = _header(tmp_path / "c" / "predictions.csv")
    assert header[:5] == ["true_label", "patient", "machine", "operator", "path"]
