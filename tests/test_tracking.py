"""`open_tracker`: what the trainer logs can be read back from the local stores.

Each back end logs one small run (params, two epochs, final metrics, a PNG and a JSON file);
the tests then read it with the store's own reader, not through our code.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest

from fetalplanes.engine import tracking
from fetalplanes.engine.tracking import Tracker, flatten_params, open_tracker
from fetalplanes.errors import FetalPlanesError

pytestmark = pytest.mark.slow  # real-frame, subprocess or timing tests: CI lane

PARAMS = {"model": {"name": "efficientnet_lite0", "img_size": (96, 96)}, "lr": 0.001,
          "epochs": 2, "augment": True, "data": Path("/data/african"), "weights": None}
EPOCHS = {1: {"train_loss": 1.5, "val_acc": 0.5, "phase": "warmup"},
          2: {"train_loss": 0.75, "val_acc": 0.625, "phase": "main"}}
FINAL = {"test_acc": 0.875, "macro_f1": 0.8125}
PNG_SIZE = (30, 20)  # width, height


def _log_run(tracker: Tracker, folder: Path) -> None:
    """What a two-epoch training run sends; the `phase` text column must be ignored."""
    from PIL import Image

    png, report = folder / "curves.png", folder / "report.json"
    Image.new("RGB", PNG_SIZE, (200, 30, 30)).save(png)
    report.write_text(json.dumps(FINAL))
    with tracker:
        tracker.log_params(PARAMS)
        for epoch, row in EPOCHS.items():
            tracker.log_epoch(epoch, row)
        tracker.log_final(FINAL)
        tracker.log_artifact(png)
        tracker.log_artifact(report)


def test_flatten_params_dots_nested_and_stringifies() -> None:
    import numpy as np

    assert flatten_params(PARAMS) == {
        "model.name": "efficientnet_lite0", "model.img_size": "(96, 96)", "lr": 0.001,
        "epochs": 2, "augment": True, "data": "/data/african", "weights": "None",
    }
    flat = flatten_params({"a": {"b": {"c": np.int64(3)}}, "d": np.float32(0.5)})
    assert flat == {"a.b.c": 3, "d": 0.5} and type(flat["a.b.c"]) is int


def test_no_tracker_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    tracker = open_tracker(None, run, "r")
    assert type(tracker) is Tracker and tracker.view_command is None
    _log_run(tracker, tmp_path)
    assert list(run.iterdir()) == []
    assert type(open_tracker("none", run, "r")) is Tracker


def test_unknown_kind_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FetalPlanesError, match="--log wandb: unknown tracker; choose "
                                               "tensorboard or mlflow"):
        open_tracker("wandb", tmp_path, "r")


def _failing_import(monkeypatch: pytest.MonkeyPatch, *prefixes: str) -> None:
    real = builtins.__import__

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith(prefixes):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


@pytest.mark.parametrize(
    ("kind", "blocked"),
    [("mlflow", ("mlflow",)), ("tensorboard", ("torch.utils.tensorboard", "tensorboardX"))],
)
def test_missing_extra_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, blocked: tuple[str, ...]
) -> None:
    _failing_import(monkeypatch, *blocked)
    with pytest.raises(FetalPlanesError) as e:
        open_tracker(kind, tmp_path / "run", "r")
    assert str(e.value) == f"train --log {kind} needs {kind}: pip install 'fetalplanes[{kind}]'"
    assert not (tmp_path / "run").exists()


# --- TensorBoard ---------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["torch", "tensorboardX"])
def test_tensorboard_run_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    pytest.importorskip("tensorboard")
    if writer == "tensorboardX":
        pytest.importorskip("tensorboardX")
        _failing_import(monkeypatch, "torch.utils.tensorboard")
    from tensorboard.plugins.hparams import plugin_data_pb2

    tracker = open_tracker("tensorboard", tmp_path / "run", "fold0")
    _log_run(tracker, tmp_path)
    assert tracker.view_command == f"tensorboard --logdir {tmp_path / 'run' / 'tensorboard'}"

    logdir = tmp_path / "run" / "tensorboard"
    acc = _events(logdir)
    assert _scalars(acc) == {"train_loss": [(1, 1.5), (2, 0.75)], "val_acc": [(1, 0.5), (2, 0.625)]}
    params_text = acc.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| model.img_size | (96, 96) |" in params_text and "fold0" in params_text
    image = acc.Images("artifacts/curves")[0]
    assert (image.width, image.height, image.step) == (*PNG_SIZE, 2)
    artifacts = acc.Tensors("artifacts/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "report.json" in artifacts

    session = _events(logdir / "hparams")  # the HParams session pairs params with final metrics
    assert _scalars(session) == {"final/test_acc": [(2, 0.875)], "final/macro_f1": [(2, 0.8125)]}
    hparams = session.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams).session_start_info
    assert start.hparams["lr"].number_value == 0.001
    assert start.hparams["model.name"].string_value == "efficientnet_lite0"
    augment = start.hparams["augment"]  # torch writes bools as numbers, tensorboardX as bools
    assert augment.bool_value or augment.number_value == 1


def _events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: Any) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --- MLflow --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """One logged run (mlflow imports and creates its database once for the module)."""
    mlflow = pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("mlflow")
    global_uri = mlflow.get_tracking_uri()
    tracker = open_tracker("mlflow", folder / "run", "fold0")
    _log_run(tracker, folder)
    assert mlflow.get_tracking_uri() == global_uri  # the process-wide default is untouched
    return tracker, folder / "run"


def test_mlflow_run_reads_back(mlflow_run: tuple[Any, Path]) -> None:
    from mlflow.tracking import MlflowClient

    tracker, run_dir = mlflow_run
    assert tracker.tracking_uri == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "fold0" and run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in flatten_params(PARAMS).items()}
    history = client.get_metric_history(tracker.run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.625)]
    assert run.data.metrics["final/test_acc"] == 0.875
    assert [m.step for m in client.get_metric_history(tracker.run_id, "final/macro_f1")] == [2]
    assert "phase" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"curves.png",
                                                                        "report.json"}
    assert run.info.artifact_uri.startswith((run_dir.resolve() / "mlruns").as_uri())
    local = Path(client.download_artifacts(tracker.run_id, "report.json", str(run_dir)))
    assert json.loads(local.read_text()) == FINAL


def test_mlflow_second_run_shares_the_experiment_and_records_failure(
    mlflow_run: tuple[Any, Path],
) -> None:
    first, run_dir = mlflow_run
    with pytest.raises(RuntimeError), open_tracker("mlflow", run_dir, "fold1") as second:
        second.log_epoch(1, {"val_acc": 0.25})
        raise RuntimeError("training crashed")
    runs = second.client.search_runs([second.client.get_experiment_by_name("fetalplanes")
                                      .experiment_id])
    assert {(r.info.run_name, r.info.status) for r in runs} == {("fold0", "FINISHED"),
                                                                ("fold1", "FAILED")}
    assert first.tracking_uri == second.tracking_uri


def test_missing_artifact_is_one_line(mlflow_run: tuple[Any, Path], tmp_path: Path) -> None:
    tracker, _ = mlflow_run
    with pytest.raises(FetalPlanesError, match=r"nope\.png: artifact not found; not logged to "
                                               r"mlflow"):
        tracker.log_artifact(tmp_path / "nope.png")
    assert tracking.KINDS == ("tensorboard", "mlflow")
