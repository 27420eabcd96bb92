"""Shared fixtures: small synthetic data sets in every layout and one trained run.

Images are generated at reduced size so the whole suite fits a 2-core CI machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before torch loads: spinning OpenMP threads make tiny tensors ~5x slower on a busy 2-core box.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Tests never write to the user's ~/.cache (nor does anything they start): caches go to a
# temporary folder, and the session ends by checking that ~/.cache was left as it was.
_HOME_CACHE = Path.home() / ".cache"
_WATCHED = ("fetalplanes", "Microsoft", "matplotlib", "torch", "huggingface", "ray")


def _cache_snapshot() -> dict[str, float]:
    """Top-level entries of ~/.cache, and every file below the ones fetalplanes could touch."""
    if not _HOME_CACHE.is_dir():
        return {}
    seen = {p.name: 0.0 for p in _HOME_CACHE.iterdir()}
    for name in _WATCHED:
        for p in (_HOME_CACHE / name).rglob("*") if (_HOME_CACHE / name).is_dir() else ():
            seen[str(p.relative_to(_HOME_CACHE))] = p.lstat().st_mtime
    return seen


_CACHE_BEFORE = _cache_snapshot()
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # for tests that use onnxruntime directly
# Ray's workers at normal priority in the tests' own ray.init too (see ray_engine's
# WORKER_NICENESS): at Ray's nice 15 a loaded machine starved them ~20x
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fetalplanes-tests-cache-")
os.environ["MPLCONFIGDIR"] = os.path.join(os.environ["XDG_CACHE_HOME"], "matplotlib")
os.environ["FETALPLANES_CACHE"] = os.path.join(os.environ["XDG_CACHE_HOME"], "fetalplanes")

import pytest  # noqa: E402  (after the environment above)
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FETALPLANES_THREADS", min(2, os.cpu_count() or 1))))

SMALL = (180, 266)  # synthetic image size for tests (height, width)
REPO = Path(__file__).resolve().parents[1]
#: A quick but real training configuration (pretrained Lite0 at 64 px) for the tests.
FAST = dict(model="efficientnet_lite0", img_size=(96, 96), epochs=6, batch_size=32, lr=1e-3,
            seed=0, cache=True, workers=0)


def shared_dir() -> Path:
    return Path(os.environ.get("FETALPLANES_SHARED", REPO.parent / "shared"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Never touch the user's ~/.cache during tests."""
    monkeypatch.setenv("FETALPLANES_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def need_shared(path: Path) -> Path:
    """`path` inside shared/, or skip the test saying where it was looked for."""
    if not path.exists():
        pytest.skip(
            f"shared/ data not found at {path}: set FETALPLANES_SHARED to the shared folder"
        )
    return path


def make_data(tmp_path_factory: pytest.TempPathFactory, name: str, **kw) -> Path:
    """A synthetic data set (`synth.generate`, test-sized images unless `size` is given)."""
    from fetalplanes.data.synth import generate

    out = tmp_path_factory.mktemp(name) / "data"
    kw.setdefault("size", SMALL)
    generate(out, progress=False, **kw)
    return out


@pytest.fixture(scope="session")
def seed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seed layout (image_label.csv without extensions + images/), 40 per class."""
    return make_data(tmp_path_factory, "seed", per_class=40, fmt="seed", seed=0)


@pytest.fixture(scope="session")
def fpdb_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fetalplanes.data.datasets import PLANES

    return make_data(tmp_path_factory, "fpdb", per_class=12, fmt="fpdb", seed=1, planes=PLANES)


@pytest.fixture(scope="session")
def folders_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory, "folders", per_class=10, fmt="folders", seed=2)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, seed_data: Path) -> Path:
    """A small but real training run shared by evaluate/predict/sort/serve tests."""
    from fetalplanes.engine.train import TrainConfig, train

    cfg = TrainConfig(**FAST)
    out = tmp_path_factory.mktemp("run") / "run"
    train(seed_data, config=cfg, out=out, progress=False)
    return out


@pytest.fixture()
def scans(tmp_path: Path) -> Path:
    """An unlabelled folder of 8 new synthetic scans (2 per plane)."""
    import numpy as np
    from PIL import Image

    from fetalplanes.data.synth import SEED4, render_phantom

    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(123)
    for i, plane in enumerate([p for p in SEED4 for _ in range(2)]):
        Image.fromarray(render_phantom(plane, rng, size=SMALL)).save(folder / f"scan_{i}.png")
    return folder


def onnx_predictor(run: Path, backend: str = "onnx", **kw):
    """A predictor on the ONNX backend, exporting first as the CLI does (inference itself
    never writes into a run folder)."""
    from fetalplanes.inference.predictor import Predictor
    from fetalplanes.tools.export import ensure_onnx

    ensure_onnx(run, int8=backend == "onnx-int8")
    return Predictor.from_run(run, backend=backend, **kw)


#: Fixtures that train a model (or several): a test using one is in the slow lane.
TRAINING_FIXTURES = {"trained_run", "seed_run", "calib_run", "cv_out", "seed_cnn_run"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that trains (directly or through a shared fixture) as slow, so
    `pytest -m "not slow"` is the fast lane; `bash scripts/test.sh` still runs all."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if anything wrote to the user's ~/.cache."""
    after = _cache_snapshot()
    changed = sorted(k for k in after.keys() | _CACHE_BEFORE.keys()
                     if after.get(k) != _CACHE_BEFORE.get(k))
    if changed:
        print(f"\nerror: the tests wrote to {_HOME_CACHE}: {', '.join(changed[:10])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
