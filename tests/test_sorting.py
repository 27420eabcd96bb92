"""Sorting: predicted (not true) folders, inputs untouched, no overwrite, resumable."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from pathlib import Path

from fetalplanes.inference.predictor import Predictor
from fetalplanes.workflows.sorting import safe_copy, sort_images


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sort_copies_to_predicted_folder(trained_run: Path, scans: Path, tmp_path: Path) -> None:
    before = _snapshot(scans)
    pred = Predictor.from_run(trained_run)
    out = tmp_path / "sorted"
    s = sort_images(pred, scans, out, min_confidence=0.0, progress=False)
    assert _snapshot(scans) == before  # inputs byte-identical, not even touched
    assert s.copied == 8
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert len(rows) == 8
    predicted = {Path(r.path).name: r.label for r in pred.predict([scans])}
    for r in rows:
        assert r["destination"].split("/")[0] == predicted[Path(r["path"]).name]
        assert (out / r["destination"]).read_bytes() == Path(r["path"]).read_bytes()
        assert abs(sum(float(r[f"p_{c}"]) for c in pred.classes) - 1) < 1e-4


def test_second_run_skips_and_new_files_are_added(trained_run: Path, scans: Path,
                                                  tmp_path: Path) -> None:
    pred = Predictor.from_run(trained_run)
    out = tmp_path / "sorted"
    sort_images(pred, scans, out, progress=False)
    first = _snapshot(out)
    again = sort_images(pred, scans, out, progress=False)
    assert again.copied == 0 and again.skipped_done == 8
    assert _snapshot(out) == first
    shutil.copy(scans / "scan_0.png", scans / "scan_new.png")
    third = sort_images(pred, scans, out, progress=False)
    assert third.copied == 1


def test_uncertain_folder(trained_run: Path, scans: Path, tmp_path: Path) -> None:
    pred = Predictor.from_run(trained_run)
    s = sort_images(pred, scans, tmp_path / "o", min_confidence=1.01, progress=False)
    assert set(s.counts) <= {"uncertain", "not_target"} and s.copied == 8
    assert len(list((tmp_path / "o").rglob("*.png"))) == 8


def test_crash_resume_loses_nothing(trained_run: Path, scans: Path, tmp_path: Path) -> None:
    """Copies made before a crash (journal not yet written) are recognised, not duplicated."""
    pred = Predictor.from_run(trained_run)
    out = tmp_path / "sorted"
    sort_images(pred, scans, out, progress=False)
    (out / "predictions.csv").unlink()  # as if the run died before journalling
    (out / "Fetal brain" / ".half.png.123.partial").write_bytes(b"half")  # a torn temp copy
    s = sort_images(pred, scans, out, progress=False)
    assert s.copied == 8
    pngs = [p for p in out.rglob("*.png")]
    assert len(pngs) == 8  # no '-1' duplicates


def test_collisions_get_a_suffix_never_overwrite(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    for p, content in ((a, b"one"), (b, b"two")):
        p.parent.mkdir()
        p.write_bytes(content)
    dest = tmp_path / "out"
    d1, d2, d3 = safe_copy(a, dest), safe_copy(b, dest), safe_copy(a, dest)
    assert d1.name == "x.png" and d2.name == "x-1.png" and d3 == d1
    assert d1.read_bytes() == b"one" and d2.read_bytes() == b"two"
    assert not [p for p in dest.iterdir() if p.name.endswith(".partial")]


def test_bad_files_listed(trained_run: Path, scans: Path, tmp_path: Path) -> None:
    (scans / "bad.png").write_bytes(b"garbage")
    s = sort_images(Predictor.from_run(trained_run), scans, tmp_path / "o", progress=False)
    assert s.copied == 8 and len(s.failures) == 1 and "bad.png" in s.failures[0]
    rows = list(csv.DictReader((tmp_path / "o" / "predictions.csv").read_text().splitlines()))
    assert any(r["error"] for r in rows)


def test_output_inside_input_is_excluded(trained_run: Path, scans: Path) -> None:
    out = scans / "sorted"
    pred = Predictor.from_run(trained_run)
    sort_images(pred, scans, out, progress=False)
    again = sort_images(pred, scans, out, progress=False)
    assert again.copied == 0 and again.skipped_done == 8
    assert os.path.isdir(out)
