"""Evaluation command: metrics, figures and report on held-out patients or other data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fetalplanes.cli.common import (
    BackendArg,
    BackendOpt,
    EnsembleOpt,
    LabelsOpt,
    Split_,
    build_predictor,
)


def evaluate(
    run: Annotated[
        Path,
        typer.Argument(
            help="Model: a run folder from `train`, an .onnx file or a pretrained name "
            "(sononet16; then DATA is required)."
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Data folder (default: the training data, test patients only; another "
            "folder is evaluated whole, on its own classes matched to the model's by name)."
        ),
    ] = None,
    split: Annotated[Split_, typer.Option(help="Which recorded patients.")] = Split_.test,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default RUN/eval-SPLIT, runs/eval/... for others)."),
    ] = None,
    labels: LabelsOpt = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="Read DATA under this preset instead of the run's (its classes must be "
            "among the model's).",
        ),
    ] = None,
    backend: BackendArg = BackendOpt.auto,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation.")] = False,
    ensemble: EnsembleOpt = None,
    ood: Annotated[
        Path | None,
        typer.Option(
            "--ood",
            help="Folder of images that are none of the planes: AUROC and false-accept rate "
            "of the not-target rule (metrics.json `ood`).",
        ),
    ] = None,
) -> None:
    """Loss, accuracy, balanced accuracy, F1, per-class metrics, confusion matrix, calibration;
    per site/machine/operator when the label file records them."""
    from fetalplanes.engine.evaluate import evaluate as evaluate_fn
    from fetalplanes.inference.predictor import DEFAULT_MIN_CONFIDENCE

    predictor = None
    if ensemble:
        predictor = build_predictor(run, None, None, "seed4", backend.value, tta, 0.0, ensemble)
        out = out or run / f"eval-ensemble-{split.value}"
    elif not run.is_dir():  # a pretrained name or an .onnx file
        predictor = build_predictor(run, None, None, preset or "seed4", backend.value, tta,
                                    DEFAULT_MIN_CONFIDENCE)
    evaluate_fn(
        run,
        data,
        split=split.value,
        out=out,
        labels=labels,
        backend=backend.value,
        tta=tta,
        predictor=predictor,
        ood=ood,
        preset=preset,
    )

