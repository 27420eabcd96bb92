"""Decode-once cache: hits, invalidation on content and preprocessing changes, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fetalplanes.data.cache import load_arrays
from fetalplanes.data.preprocess import Preprocess


def _write(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_cache_hits_and_matches_decoding(tmp_path: Path) -> None:
    paths = _write(tmp_path / "imgs", 5)
    pp = Preprocess(size=(16, 16), crop=False)
    plain = load_arrays(paths, pp, cache_dir=None, workers=0, progress=False)
    first = load_arrays(paths, pp, tmp_path / "c", workers=0, progress=False)
    second = load_arrays(paths, pp, tmp_path / "c", workers=0, progress=False)
    assert first.decoded == 5 and first.hits == 0
    assert second.decoded == 0 and second.hits == 5
    assert np.array_equal(plain.arrays, second.arrays)


def test_cache_invalidates_on_change(tmp_path: Path) -> None:
    paths = _write(tmp_path / "imgs", 3)
    pp = Preprocess(size=(16, 16), crop=False)
    load_arrays(paths, pp, tmp_path / "c", workers=0, progress=False)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(paths[1])
    again = load_arrays(paths, pp, tmp_path / "c", workers=0, progress=False)
    assert again.decoded == 1 and again.hits == 2
    assert again.arrays[1].max() == 0
    other = load_arrays(paths, pp.with_(size=(8, 8)), tmp_path / "c", workers=0, progress=False)
    assert other.decoded == 3 and other.arrays.shape == (3, 8, 8)


def test_failures_listed_not_raised(tmp_path: Path) -> None:
    paths = _write(tmp_path / "imgs", 2)
    bad = tmp_path / "imgs" / "bad.png"
    bad.write_bytes(b"nope")
    res = load_arrays([paths[0], bad, paths[1]], Preprocess(size=(8, 8), crop=False),
                      tmp_path / "c", workers=0, progress=False)
    assert res.ok == [0, 2] and len(res.failures) == 1
    assert "bad.png" in res.failures[0][1]


def test_workers_give_same_result(tmp_path: Path) -> None:
    paths = _write(tmp_path / "imgs", 40)
    pp = Preprocess(size=(16, 16), crop=False)
    a = load_arrays(paths, pp, None, workers=0, progress=False)
    b = load_arrays(paths, pp, None, workers=2, progress=False)
    assert np.array_equal(a.arrays, b.arrays)
