"""fetalplanes: classify 2D fetal ultrasound images into standard anatomical planes.

The command line (`fetalplanes ...`) is a thin layer over this Python API:

    from fetalplanes import load_dataset, train, TrainConfig, evaluate, Predictor, sort_images
    result = train("data/", config=TrainConfig(model="efficientnet_lite0", epochs=10))
    evaluate(result.run)
    predictor = Predictor.from_run(result.run)
    predictor.predict(["scan.png"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_dataset": "fetalplanes.data",
    "split_by_patient": "fetalplanes.data",
    "PRESETS": "fetalplanes.data",
    "train": "fetalplanes.train",
    "TrainConfig": "fetalplanes.train",
    "evaluate": "fetalplanes.evaluate",
    "Predictor": "fetalplanes.inference",
    "sort_images": "fetalplanes.sorting",
    "create_model": "fetalplanes.models",
    "list_models": "fetalplanes.models",
    "generate_synthetic": "fetalplanes.synth",
    "Preprocess": "fetalplanes.transforms",
}

if TYPE_CHECKING:  # pragma: no cover
    # ruff: noqa: F401 (re-exported lazily)
    from fetalplanes.data import PRESETS, load_dataset, split_by_patient
    from fetalplanes.evaluate import evaluate
    from fetalplanes.inference import Predictor
    from fetalplanes.models import create_model, list_models
    from fetalplanes.sorting import sort_images
    from fetalplanes.train import TrainConfig, train
    from fetalplanes.transforms import Preprocess


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch) only when used, so `--help` stays fast."""
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return getattr(module, "generate" if name == "generate_synthetic" else name)
    raise AttributeError(f"module 'fetalplanes' has no attribute {name!r}")


__all__ = sorted(_LAZY)
