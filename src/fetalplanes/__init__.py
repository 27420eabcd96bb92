"""fetalplanes: classify 2D fetal ultrasound images into standard anatomical planes.

The command line (`fetalplanes ...`) is a thin layer over this Python API:

    import fetalplanes as fp
    result = fp.train("data/", config=fp.TrainConfig(epochs=10, img_size=96))
    fp.evaluate(result.run)
    predictor = fp.Predictor.from_run(result.run)
    predictor.predict(["scan.png"])
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from fetalplanes._version import __version__

# ONNX Runtime's telemetry writes a device id and a database under ~/.cache/Microsoft and
# $HOME/.ses at the first session; it reads this switch only when it is imported, so it is
# set before any module of ours can import it (a user may still set it to 0).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

#: Public name -> (module, attribute). Loaded on first use so `--help` stays fast
#: (torch is imported only when a name that needs it is touched).
_LAZY: dict[str, tuple[str, str]] = {
    "load_dataset": ("fetalplanes.data.datasets", "load_dataset"),
    "split_by_patient": ("fetalplanes.data.datasets", "split_by_patient"),
    "PRESETS": ("fetalplanes.data.datasets", "PRESETS"),
    "generate_synthetic": ("fetalplanes.data.synth", "generate"),
    "Preprocess": ("fetalplanes.data.preprocess", "Preprocess"),
    "create_model": ("fetalplanes.models.registry", "create_model"),
    "list_models": ("fetalplanes.models.registry", "list_models"),
    "train": ("fetalplanes.engine.train", "train"),
    "TrainConfig": ("fetalplanes.engine.train", "TrainConfig"),
    "Trainer": ("fetalplanes.engine.train", "Trainer"),
    "evaluate": ("fetalplanes.engine.evaluate", "evaluate"),
    "Predictor": ("fetalplanes.inference.predictor", "Predictor"),
    "Prediction": ("fetalplanes.inference.results", "Prediction"),
    "sort_images": ("fetalplanes.workflows.sorting", "sort_images"),
    "export": ("fetalplanes.tools.export", "export_onnx"),
}

if TYPE_CHECKING:  # pragma: no cover
    # ruff: noqa: F401 (re-exported lazily)
    from fetalplanes.data.datasets import PRESETS, load_dataset, split_by_patient
    from fetalplanes.data.preprocess import Preprocess
    from fetalplanes.data.synth import generate as generate_synthetic
    from fetalplanes.engine.evaluate import evaluate
    from fetalplanes.engine.train import TrainConfig, Trainer, train
    from fetalplanes.inference.predictor import Predictor
    from fetalplanes.inference.results import Prediction
    from fetalplanes.models.registry import create_model, list_models
    from fetalplanes.tools.export import export_onnx as export
    from fetalplanes.workflows.sorting import sort_images


def __getattr__(name: str) -> Any:
    """Resolve a public name once and keep it, so it stays the function (never a module)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'fetalplanes' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted([*_LAZY, "__version__"])
