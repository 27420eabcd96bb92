"""The Ray engine: the same predictions and sort as the local engine, surviving a dead actor,
resuming from the sort journal (docs/scale.md).

One local Ray instance (2 CPUs, no dashboard) serves the module. The model is a tiny
seed-cnn at 32 px with a kNN feature bank, so the rejection score crosses the pipeline too.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference import ray_engine
from fetalplanes.inference.ray_engine import ModelRecipe, RayPredictor, block_rows, plan_actors

N_SCANS = 24


def test_without_ray_the_engine_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from fetalplanes.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(FetalPlanesError, match=r"pip install 'fetalplanes\[ray\]'"):
        ray_engine.ray_module()
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "scan.png")
    result = CliRunner().invoke(app, ["predict", "sononet16", str(tmp_path / "scan.png"),
                                      "--engine", "ray", "--format", "csv"])
    assert result.exit_code == 2 and result.stdout == ""  # refused before any output
    assert "pip install 'fetalplanes[ray]'" in result.output


def test_a_local_instance_runs_its_workers_at_normal_priority(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray's default worker nice 15 starved the workers beside any busy process; a local
    instance started by fetalplanes asks for 0, a user's own setting and a cluster's win."""
    calls: list[str | None] = []

    class FakeRay:
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**kw: Any) -> None:
            calls.append(ray_engine.os.environ.get("RAY_worker_niceness"))

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    assert ray_engine._connect(FakeRay, None) is True
    monkeypatch.setenv("RAY_worker_niceness", "5")
    ray_engine._connect(FakeRay, None)
    monkeypatch.delenv("RAY_worker_niceness")
    ray_engine._connect(FakeRay, "10.0.0.1:6379")
    assert calls == ["0", "5", None]


def test_actor_plan() -> None:
    assert plan_actors({"CPU": 16, "GPU": 4}, True) == ray_engine.Plan(4, 1.0, 1.0)
    assert plan_actors({"CPU": 16, "GPU": 4}, False) == ray_engine.Plan(16, 1.0, 0.0)
    assert plan_actors({"CPU": 1}, True) == ray_engine.Plan(1, 1.0, 0.0)
    assert plan_actors({"CPU": 8}, False, actors=3).actors == 3
    assert block_rows(2000, 2, 64) == 250 and block_rows(10, 2, 64) == 64
    assert block_rows(10_000_000, 512, 64) == ray_engine.MAX_BLOCK_ROWS


# ----------------------------------------------------------------- on a Ray instance
@pytest.fixture(scope="module")
def fault_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exists (fault disarmed) until a test removes it; the actor fault recreates it."""
    marker = tmp_path_factory.mktemp("fault") / "fired"
    marker.touch()
    return marker


@pytest.fixture(scope="module")
def ray_instance(fault_marker: Path) -> Iterator[Any]:
    ray = pytest.importorskip(
        "ray", reason="the Ray engine needs ray[data]: pip install 'fetalplanes[ray]'"
    )
    pytest.importorskip("ray.data", reason="the Ray engine needs ray[data]")
    env = {ray_engine.FAULT_ENV: f"2:{fault_marker}", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained seed-cnn (sharpened logits, so the scans spread over folders) with a
    kNN feature bank and its rejection rule, as `train` would leave them."""
    import torch

    from fetalplanes.data.preprocess import Preprocess
    from fetalplanes.data.synth import SEED4, render_phantom
    from fetalplanes.engine.train import (
        ArrayData,
        TrainConfig,
        fit_rejection_rule,
        in_order,
        make_loop,
    )
    from fetalplanes.inference.rejection import collect_features
    from fetalplanes.models import create_model
    from fetalplanes.models.card import ModelCard
    from fetalplanes.models.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("tiny") / "run"
    folder.mkdir()
    torch.manual_seed(4)
    pp = Preprocess(size=(32, 32), crop=False)
    net = create_model("seed-cnn", len(SEED4), pretrained=False, input_size=pp.size)
    with torch.no_grad():
        net.classifier[-1].weight.mul_(40)
    net, loop = make_loop(net, pp, torch.device("cpu"), channels_last=False)
    rng = np.random.default_rng(0)

    def phantoms(n: int) -> ArrayData:
        arrays = [pp.prepare_array(render_phantom(SEED4[i % 4], rng, size=(48, 64)))
                  for i in range(n)]
        return ArrayData(np.stack(arrays), np.arange(n) % len(SEED4), torch.device("cpu"))

    data, val = phantoms(16), phantoms(16)
    logits, feats = collect_features(net, lambda: in_order(val), loop.forward)
    card = ModelCard("seed-cnn", list(SEED4), pp)
    cfg = TrainConfig(model="seed-cnn", rejection_score="knn", rejection_recall=0.9)
    card.rejection = fit_rejection_rule(folder, net, loop, data, logits, feats, card, cfg)
    save_checkpoint(folder, net, card)
    return folder


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small phantoms, a name shared by two sub-folders, and one corrupt file."""
    from PIL import Image

    from fetalplanes.data.synth import SEED4, render_phantom

    folder = tmp_path_factory.mktemp("scans") / "in"
    rng = np.random.default_rng(7)
    for i in range(N_SCANS):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        name = "same.png" if i < 2 else f"scan_{i:02d}.png"
        Image.fromarray(render_phantom(SEED4[i % 4], rng, size=(48, 64))).save(sub / name)
    (folder / "b" / "corrupt.png").write_bytes(b"not a png")
    return folder


def predictors(run: Path, backend: str) -> tuple[Any, RayPredictor]:
    from fetalplanes.inference.predictor import Predictor

    if backend != "torch":
        from fetalplanes.tools.export import ensure_onnx

        ensure_onnx(run)  # as the CLI does before an ONNX predictor (inference never writes)
    local = Predictor.from_run(run, backend=backend)
    remote = Predictor.from_run(run, backend=backend)
    return local, RayPredictor(remote, ModelRecipe(str(run), backend=backend))


def files_of(folder: Path) -> list[Path]:
    from fetalplanes.data.images import list_images

    return list_images([folder])


def journal(out: Path) -> dict[str, dict[str, str]]:
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "a source journalled twice"
    return by_path


def assert_same(a: dict[str, str], b: dict[str, str]) -> None:
    for key in a:
        if key.startswith("p_") or key in ("confidence", "rejection_score"):
            assert abs(float(a[key] or 0) - float(b[key] or 0)) <= 1e-5, key
        else:
            assert a[key] == b[key], key


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_ray_predicts_what_the_local_engine_predicts(
    ray_instance: Any, run: Path, scans: Path, backend: str
) -> None:
    local, remote = predictors(run, backend)
    files = files_of(scans)
    want = list(local.predict_paths(files, batch_size=8, workers=0))
    got = list(remote.predict_paths(files, batch_size=8))
    assert [p.path for p in got] == [p.path for p in want]  # input order
    assert [p.error for p in got] == [p.error for p in want]
    assert sum(not p.ok for p in got) == 1
    for a, b in zip(want, got, strict=True):
        assert (a.label, a.not_target, a.uncertain) == (b.label, b.not_target, b.uncertain)
        assert a.probs.keys() == b.probs.keys()
        assert all(abs(a.probs[c] - b.probs[c]) <= 1e-5 for c in a.probs)
        assert (a.rejection_score is None) == (b.rejection_score is None)
        if a.rejection_score is not None:
            assert abs(a.rejection_score - b.rejection_score) <= 1e-5  # type: ignore[operator]
    assert len({p.label for p in got if p.ok}) >= 2  # not a constant model


@pytest.mark.slow
def test_sort_on_ray_copies_and_journals_like_the_local_sort(
    ray_instance: Any, run: Path, scans: Path, tmp_path: Path
) -> None:
    from fetalplanes.workflows.sorting import sort_images

    local, remote = predictors(run, "torch")
    a = sort_images(local, scans, tmp_path / "local", batch_size=8, workers=0, progress=False)
    b = sort_images(remote, scans, tmp_path / "ray", batch_size=8, progress=False)
    assert (a.copied, a.counts, len(a.failures)) == (b.copied, b.counts, len(b.failures))
    ja, jb = journal(tmp_path / "local"), journal(tmp_path / "ray")
    assert ja.keys() == jb.keys()
    for path in ja:
        assert_same(ja[path], jb[path])
    copies = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*.png"))
    assert copies == sorted(p.relative_to(tmp_path / "local")
                            for p in (tmp_path / "local").rglob("*.png"))


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_nothing_is_lost_or_duplicated(
    ray_instance: Any, run: Path, scans: Path, tmp_path: Path, fault_marker: Path
) -> None:
    from fetalplanes.workflows.sorting import sort_images

    _, remote = predictors(run, "torch")
    fault_marker.unlink()  # arm: the first actor to reach its 2nd batch exits hard, once
    summary = sort_images(remote, scans, tmp_path / "out", batch_size=4, progress=False)
    assert fault_marker.exists(), "the actor fault never fired"
    rows = journal(tmp_path / "out")
    sources = {str(p.resolve()) for p in files_of(scans)}
    assert rows.keys() == sources  # every image once, the retried batch not twice
    assert summary.copied == N_SCANS and len(summary.failures) == 1
    copies = list((tmp_path / "out").rglob("*.png"))
    assert len(copies) == N_SCANS  # two `same.png`: one renamed, no extra copy
    assert {r["destination"] for r in rows.values() if r["destination"]} == {
        str(p.relative_to(tmp_path / "out")) for p in copies
    }


class StopAfter(RayPredictor):
    """A Ray sort interrupted (Ctrl-C) after `limit` results; records what it was given."""

    limit = 10**9
    given: ClassVar[list[int]] = []

    def stream(self, items: Any, **kw: Any) -> Iterator[Any]:
        items = list(items)
        StopAfter.given.append(len(items))
        for n, result in enumerate(super().stream(items, **kw)):
            if n == self.limit:
                raise KeyboardInterrupt
            yield result


@pytest.mark.slow
def test_an_interrupted_ray_sort_resumes_from_its_journal(
    ray_instance: Any, run: Path, scans: Path, tmp_path: Path
) -> None:
    from fetalplanes.inference.predictor import Predictor
    from fetalplanes.workflows.sorting import sort_images

    out = tmp_path / "out"
    first = StopAfter(Predictor.from_run(run), ModelRecipe(str(run)))
    first.limit = 9
    with pytest.raises(KeyboardInterrupt):
        sort_images(first, scans, out, batch_size=4, progress=False)
    assert len(journal(out)) == 9
    again = StopAfter(Predictor.from_run(run), ModelRecipe(str(run)))
    summary = sort_images(again, scans, out, batch_size=4, progress=False)
    assert summary.skipped_done == 9 and StopAfter.given[-1] == N_SCANS + 1 - 9
    assert len(journal(out)) == N_SCANS + 1
    assert len(list(out.rglob("*.png"))) == N_SCANS  # nothing copied twice


@pytest.mark.slow
def test_cli_sort_and_predict_run_on_ray(
    ray_instance: Any, run: Path, scans: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from fetalplanes.cli import app

    runner = CliRunner()
    out = tmp_path / "sorted"
    result = runner.invoke(app, ["sort", str(run), str(scans), str(out), "--engine", "ray",
                                 "--batch-size", "8", "-q"])
    assert result.exit_code == 0, result.output
    assert f"sorted {N_SCANS} images" in result.output and len(journal(out)) == N_SCANS + 1
    result = runner.invoke(app, ["predict", str(run), str(scans), "--engine", "ray",
                                 "--format", "csv", "-q"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(result.stdout.splitlines()))
    assert [r["path"] for r in rows] == [str(p) for p in files_of(scans)]  # input order
    result = runner.invoke(app, ["predict", str(run), str(scans), "--address", "auto"])
    assert result.exit_code == 2 and "--address needs --engine ray" in result.output
