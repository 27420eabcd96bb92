"""Evaluation command: metrics, figures and report on held-out patients or other data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fetalplanes.cli.common import Split_, fail
from fetalplanes.cli.options import (
    MODEL_HELP,
    BackendChoice,
    BackendOpt,
    EnsembleOpt,
    LabelsOpt,
    TtaOpt,
    load_model,
    model_ref,
)


def evaluate(
    run: Annotated[
        Path,
        typer.Argument(help=f"{MODEL_HELP} A run is evaluated on its own test patients "
                            "unless DATA is given; other models need DATA."),
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
    backend: BackendOpt = BackendChoice.auto,
    tta: TtaOpt = False,
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

    if data is not None and data.is_dir():
        from fetalplanes.data.images import list_images

        if not list_images([data], errors=[]):
            fail(f"{data}: no images to evaluate in this folder", 1)
    predictor = None
    if ensemble:
        spec = model_ref(str(run), None, "seed4", backend, tta, ensemble, 0.0)
        predictor = load_model(spec)
        out = out or run / f"eval-ensemble-{split.value}"
    elif not run.is_dir():  # a pretrained name or an .onnx file
        predictor = load_model(model_ref(str(run), None, preset or "seed4", backend, tta,
                                          min_confidence=DEFAULT_MIN_CONFIDENCE))
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

