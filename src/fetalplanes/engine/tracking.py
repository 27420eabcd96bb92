"""Experiment tracking for `train --log tensorboard|mlflow`, into stores inside the run folder.

Both back ends are optional extras and write locally (no server, no global settings touched),
so a run folder stays self-contained: `run/tensorboard/` or `run/mlflow.db` + `run/mlruns/`.
The trainer calls one small interface; `kind=None` gives a tracker that does nothing.
"""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from fetalplanes.errors import FetalPlanesError

KINDS = ("tensorboard", "mlflow")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
Scalar = str | int | float | bool


def open_tracker(kind: str | None, run_dir: Path, run_name: str) -> Tracker:
    """The tracker for `train --log KIND`; None (or "none") logs nothing."""
    if kind is None or kind.lower() in ("", "none"):
        return Tracker()
    kind = kind.lower()
    if kind == "tensorboard":
        return TensorBoardTracker(Path(run_dir), run_name)
    if kind == "mlflow":
        return MlflowTracker(Path(run_dir), run_name)
    raise FetalPlanesError(f"--log {kind}: unknown tracker; choose {' or '.join(KINDS)}")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Nested dicts become dotted keys; values that are not str/int/float/bool become strings.

    Both stores accept only flat scalar parameters; `str()` keeps paths and lists readable.
    """
    flat: dict[str, Scalar] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, str | bool):
            flat[name] = value
        elif isinstance(value, numbers.Integral):  # numpy ints too, which HParams refuses
            flat[name] = int(value)
        elif isinstance(value, numbers.Real):
            flat[name] = float(value)
        else:
            flat[name] = str(value)
    return flat


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The real-valued entries as floats, so a history row with text columns can be passed."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


class Tracker:
    """The interface the trainer calls; this base class is the no-op tracker (`kind=None`)."""

    kind: str | None = None
    view_command: str | None = None  # how to look at the logs, for the CLI to print

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Hyper-parameters and settings, once at the start (nested dicts allowed)."""

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Per-epoch metrics, with the epoch as the step."""

    def log_final(self, metrics: Mapping[str, float]) -> None:
        """Test/best metrics, once at the end, logged as `final/<name>`."""

    def log_artifact(self, path: Path) -> None:
        """A file of the run (curves.png, confusion matrices, reports)."""

    def close(self, failed: bool = False) -> None:
        """Flush and mark the run finished (or failed)."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc_type is not None)


def _existing(path: Path, kind: str | None) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FetalPlanesError(f"{path}: artifact not found; not logged to {kind}")
    return path


def _missing(kind: str, package: str) -> FetalPlanesError:
    return FetalPlanesError(
        f"train --log {kind} needs {package}: pip install 'fetalplanes[{kind}]'"
    )


# --- TensorBoard -----------------------------------------------------------------------------


def _summary_writer() -> tuple[type, str]:
    """torch's SummaryWriter (needs the tensorboard package), else tensorboardX's."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter, "run_name"
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter, "name"
    except ImportError:
        raise _missing("tensorboard", "tensorboard") from None


class TensorBoardTracker(Tracker):
    """Scalars per epoch, params as text and as HParams with the final metrics, PNGs as images."""

    kind = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str) -> None:
        writer_cls, self._hparams_run_arg = _summary_writer()
        self.logdir = run_dir / "tensorboard"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = writer_cls(str(self.logdir))
        self._params: dict[str, Scalar] = {}
        self._step = 0
        self.run_name = run_name
        self.view_command = f"tensorboard --logdir {self.logdir}"

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._params.update(flatten_params(params))
        rows = "\n".join(f"| {k} | {v} |" for k, v in self._params.items())
        self._writer.add_text("params", f"run **{self.run_name}**\n\n| param | value |\n"
                                        f"|---|---|\n{rows}", 0)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self._step = epoch
        for name, value in numeric_metrics(metrics).items():
            self._writer.add_scalar(name, value, epoch)

    def log_final(self, metrics: Mapping[str, float]) -> None:
        """Params and final metrics as one HParams session in the sub-run `hparams/`.

        A sub-run, not this run's folder: tensorboardX names event files by the second, so a
        second writer in the same folder would overwrite the first one's file.
        """
        final = {f"final/{k}": v for k, v in numeric_metrics(metrics).items()}
        if not final:
            return
        options = {self._hparams_run_arg: "hparams", "global_step": self._step}
        self._writer.add_hparams(self._params or {"run": self.run_name}, final, **options)

    def log_artifact(self, path: Path) -> None:
        path = _existing(path, self.kind)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            self._writer.add_image(f"artifacts/{path.stem}", _rgb(path), self._step,
                                   dataformats="HWC")
        else:
            self._writer.add_text("artifacts", f"`{path}`", self._step)

    def close(self, failed: bool = False) -> None:
        self._writer.flush()
        self._writer.close()


def _rgb(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise FetalPlanesError(f"{path}: cannot log as an image ({exc})") from None


# --- MLflow ----------------------------------------------------------------------------------


def _mlflow() -> tuple[type, type, type]:
    """MlflowClient, Param and Metric; the sqlite store also needs sqlalchemy and alembic."""
    try:
        import alembic  # noqa: F401
        import sqlalchemy  # noqa: F401
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise _missing("mlflow", "mlflow") from None
    return MlflowClient, Param, Metric


class MlflowTracker(Tracker):
    """One MLflow run in `run_dir/mlflow.db` (sqlite) with artifacts in `run_dir/mlruns/`.

    The client gets its tracking URI explicitly: the user's MLFLOW_TRACKING_URI and
    mlflow's process-wide default are left alone. sqlite is used because recent MLflow
    refuses the plain-file store without an opt-out variable.
    """

    kind = "mlflow"
    experiment = "fetalplanes"
    _BATCH = 100  # MLflow's limit of params per log_batch call

    def __init__(self, run_dir: Path, run_name: str) -> None:
        client_cls, self._param, self._metric = _mlflow()
        run_dir = run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = f"sqlite:///{(run_dir / 'mlflow.db').as_posix()}"
        with _quiet("mlflow.store.db.utils"):  # "Creating initial MLflow database tables..."
            self.client = client_cls(tracking_uri=self.tracking_uri)
            experiment = self._experiment_id(run_dir / "mlruns")
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        self._step = 0
        self._closed = False
        self.view_command = f"mlflow ui --backend-store-uri {self.tracking_uri}"

    def _experiment_id(self, artifacts: Path) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        # Without an explicit location mlflow puts artifacts under ./mlruns of the cwd.
        return str(self.client.create_experiment(self.experiment,
                                                 artifact_location=artifacts.as_uri()))

    def log_params(self, params: Mapping[str, Any]) -> None:
        entries = [self._param(k, str(v)) for k, v in flatten_params(params).items()]
        for chunk in _chunks(entries, self._BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self._step = epoch
        self._log_metrics(numeric_metrics(metrics), epoch)

    def log_final(self, metrics: Mapping[str, float]) -> None:
        self._log_metrics({f"final/{k}": v for k, v in numeric_metrics(metrics).items()},
                          self._step)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        entries = [self._metric(k, v, now, step) for k, v in metrics.items()]
        for chunk in _chunks(entries, self._BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(_existing(path, self.kind)))

    def close(self, failed: bool = False) -> None:
        if not self._closed:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
            self._closed = True


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Hide a library's INFO chatter from the training console for a moment; level restored."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]

