"""Predictor: class names only from the checkpoint, bad inputs as per-item errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from fetalplanes.inference.predictor import Predictor


def test_predict_folder(trained_run: Path, scans: Path) -> None:
    p = Predictor.from_run(trained_run)
    preds = p.predict([scans])
    assert len(preds) == 8 and all(r.ok for r in preds)
    for r in preds:
        assert set(r.probs) == set(p.classes)
        assert abs(sum(r.probs.values()) - 1) < 1e-5
        assert r.label in p.classes or r.label == "not_target"


def test_class_names_follow_the_checkpoint(trained_run: Path, scans: Path, tmp_path: Path) -> None:
    """Permuting the sidecar's class list permutes the names, not the probabilities."""
    run2 = tmp_path / "run2"
    shutil.copytree(trained_run, run2)
    side = json.loads((run2 / "model.json").read_text())
    original = list(side["classes"])
    side["classes"] = original[::-1]
    (run2 / "model.json").write_text(json.dumps(side))
    a = Predictor.from_run(trained_run).predict([scans])
    b = Predictor.from_run(run2).predict([scans])
    for ra, rb in zip(a, b, strict=True):
        for i, name in enumerate(original):
            assert rb.probs[side["classes"][i]] == ra.probs[name]


def test_bad_files_do_not_stop_a_batch(trained_run: Path, scans: Path) -> None:
    (scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (scans / "empty.png").write_bytes(b"")
    preds = Predictor.from_run(trained_run).predict([scans])
    bad = [r for r in preds if not r.ok]
    assert len(preds) == 10 and len(bad) == 2
    assert all(("broken.png" in r.error or "empty.png" in r.error) for r in bad)


def test_predict_bytes_and_arrays(trained_run: Path, scans: Path) -> None:
    p = Predictor.from_run(trained_run)
    files = sorted(scans.iterdir())[:2]
    res = p.predict_bytes([(f.name, f.read_bytes()) for f in files] + [("x.txt", b"text")])
    assert [r.ok for r in res] == [True, True, False]
    arr = p.predict_arrays([np.zeros((50, 60), np.uint8)])
    assert len(arr) == 1 and arr[0].ok


def test_streaming_matches_list(trained_run: Path, scans: Path) -> None:
    p = Predictor.from_run(trained_run)
    files = sorted(scans.iterdir())
    a = [r.probs for r in p.predict_paths(files, batch_size=3, workers=0)]
    b = [r.probs for r in p.predict_paths(files, batch_size=64, workers=2)]
    for x, y in zip(a, b, strict=True):
        assert all(abs(x[k] - y[k]) < 1e-5 for k in x)
