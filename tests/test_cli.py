"""The command line, as a user drives it: happy paths and one-line errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from typer.testing import CliRunner

from fetalplanes.cli import app

runner = CliRunner()


def _run(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_commands() -> None:
    r = _run("--help")
    assert r.exit_code == 0
    for cmd in ("synth", "train", "evaluate", "predict", "sort", "demo", "data"):
        assert cmd in r.output


def test_synth_and_data_check(tmp_path: Path) -> None:
    r = _run("synth", tmp_path / "d", "--per-class", "3", "--format", "fpdb", "--seed", "4")
    assert r.exit_code == 0 and "synthetic" in r.output
    r = _run("data", "check", tmp_path / "d", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["n_images"] == 12 and report["layout"] == "fpdb"
    assert sum(report["patients_per_split"].values()) == report["n_patients"]


def test_data_check_lists_problems(tmp_path: Path, seed_data: Path) -> None:
    import shutil

    shutil.copytree(seed_data, tmp_path / "d")
    imgs = sorted((tmp_path / "d" / "images").iterdir())
    imgs[0].write_bytes(b"")
    shutil.copy(imgs[1], imgs[2])
    r = _run("data", "check", tmp_path / "d")
    assert r.exit_code == 1
    assert "unreadable files (1)" in r.output and imgs[0].name in r.output
    assert "identical files (1)" in r.output


def test_train_cli_and_bad_data(tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "data folder not found" in r.output
    assert "Traceback" not in r.output


def test_predict_formats(trained_run: Path, scans: Path) -> None:
    r = _run("predict", trained_run, scans, "--format", "json", "-q")
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert len(rows) == 8 and set(rows[0]["probabilities"]) == {
        "Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax"}
    r = _run("predict", trained_run, scans / "scan_0.png", "--format", "csv", "-q")
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(table) == 1 and table[0]["label"]
    r = _run("predict", trained_run, scans, "-q")
    assert r.exit_code == 0 and "scan_0.png" in r.output


def test_predict_bad_file_is_one_line_and_batch_survives(trained_run: Path, scans: Path) -> None:
    (scans / "notes.png").write_text("not an image")
    r = runner.invoke(app, ["predict", str(trained_run), str(scans), "--format", "json", "-q"])
    assert r.exit_code == 0
    assert "skipped:" in r.stderr and "notes.png" in r.stderr
    assert len([x for x in json.loads(r.stdout) if "error" not in x]) == 8


def test_predict_missing_run(tmp_path: Path, scans: Path) -> None:
    r = runner.invoke(app, ["predict", str(tmp_path / "norun"), str(scans)])
    assert r.exit_code == 2 and "not a run folder" in r.output


def test_evaluate_and_sort(trained_run: Path, scans: Path, tmp_path: Path) -> None:
    r = _run("evaluate", trained_run, "--out", tmp_path / "ev")
    assert r.exit_code == 0 and (tmp_path / "ev" / "metrics.json").is_file()
    r = _run("sort", trained_run, scans, tmp_path / "sorted", "--min-confidence", "0.3", "-q")
    assert r.exit_code == 0 and "sorted 8 images" in r.output
    r = _run("sort", trained_run, scans, tmp_path / "sorted", "--min-confidence", "0.3", "-q")
    assert "sorted 0 images" in r.output and "8 already done" in r.output
    # other settings than the journal's: said in one line, nothing sorted by other rules
    r = _run("sort", trained_run, scans, tmp_path / "sorted", "-q")
    assert r.exit_code == 2 and "sorted with other settings" in r.output
    assert "min_confidence 0.3" in r.output and "min_confidence 0.5" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_models_lists_registry() -> None:
    r = _run("models")
    assert "efficientnet_lite0" in r.output and "seed-cnn" in r.output
