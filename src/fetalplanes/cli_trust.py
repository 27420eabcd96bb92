"""Trust commands: explain (Grad-CAM), crossval (K folds + ensemble), tune (Optuna).

Registered on the main Typer app by `fetalplanes.cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    # imported here: fetalplanes.cli imports this module while it is being defined
    from fetalplanes.cli import _guard

    app.command("explain")(_guard(explain))
    app.command("crossval")(_guard(crossval))
    app.command("tune")(_guard(tune))


def _fail(msg: str) -> None:
    from fetalplanes.cli import _fail as fail

    fail(msg)


# ------------------------------------------------------------------ explain


def explain(
    args: Annotated[list[str], typer.Argument(help="RUN IMAGE (with --model: IMAGE only).")],
    out: Annotated[
        Path | None, typer.Option(help="Overlay PNG to write (default IMAGE_STEM-gradcam.png).")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(help="Class to explain (name or index); default the predicted one."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Zero-shot with published weights (sononet16/32/64).")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Weights file for --model.")] = None,
    preset: Annotated[str, typer.Option(help="Label preset for --model.")] = "seed4",
) -> None:
    """Grad-CAM heatmap over the image the network sees: where it looked for its answer."""
    from fetalplanes.explain import explain_file
    from fetalplanes.inference import Predictor

    need = 1 if model else 2
    if len(args) != need:
        _fail("usage: fetalplanes explain RUN IMAGE (or --model M --weights W IMAGE)")
    image = Path(args[-1])
    if model is not None:
        if weights is None:
            _fail(f"--model {model} needs --weights PATH (published weights file)")
        predictor = Predictor.from_pretrained(model, weights, preset)
    else:
        predictor = _run_predictor(Path(args[0]))
    dest = out or Path(f"{image.stem}-gradcam.png")
    pred = predictor.predict([image])[0]
    if not pred.ok:
        _fail(pred.error or f"{image}: unreadable")
    path = explain_file(predictor, image, dest, target)
    own = pred.extra.get("model_label")
    label = f"{pred.label}" + (f" ({own})" if own else "")
    typer.echo(
        f"{image}: {label} {pred.confidence:.3f}; Grad-CAM of "
        f"{target or 'the predicted class'} written to {path}"
    )


def _run_predictor(run: Path) -> Any:
    """A run folder, or a folder of runs (crossval OUT) as an ensemble."""
    from fetalplanes.ensemble import ensemble_predictor, is_ensemble_dir
    from fetalplanes.inference import Predictor

    if is_ensemble_dir(run):
        return ensemble_predictor([run])
    return Predictor.from_run(run)


# ------------------------------------------------------------------ crossval / tune


def _base_config(config: Path | None, **changes: Any) -> Any:
    import json

    from fetalplanes.train import TrainConfig

    base = TrainConfig()
    if config is not None:
        try:
            base = TrainConfig.from_dict(json.loads(config.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            _fail(f"{config}: cannot read config ({exc})")
    size = changes.pop("img_size", None)
    return base.updated(img_size=(size, size) if size else None, **changes)


ConfigOpt = Annotated[
    Path | None, typer.Option(help="JSON training config (e.g. best_config.json); flags override.")
]
DataArg = Annotated[Path, typer.Argument(help="Labelled data folder.")]
LabelsOpt = Annotated[Path | None, typer.Option(help="Label CSV when not auto-detected.")]
PresetOpt = Annotated[str, typer.Option(help="Label preset: seed4, fpdb6 or brain3.")]
ModelOpt = Annotated[str | None, typer.Option(help="Architecture (default efficientnet_lite0).")]
EpochsOpt = Annotated[int | None, typer.Option(help="Epochs per training run.")]
SizeOpt = Annotated[int | None, typer.Option("--img-size", help="Square input size override.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed (folds, split, init).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def crossval(
    data: DataArg,
    folds: Annotated[int, typer.Option(help="Number of patient-grouped folds.")] = 5,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default runs/train/MODEL-cvK).")
    ] = None,
    model: ModelOpt = None,
    epochs: EpochsOpt = None,
    img_size: SizeOpt = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    labels: LabelsOpt = None,
    preset: PresetOpt = "seed4",
    quiet: QuietOpt = False,
) -> None:
    """K-fold cross-validation by patient: OUT/fold-1..K, mean ± sd in OUT/cv_summary.json."""
    from fetalplanes.crossval import cross_validate

    if folds < 2:
        _fail(f"--folds must be at least 2, got {folds}")
    cfg = _base_config(config, model=model, epochs=epochs, img_size=img_size, lr=lr, seed=seed)
    res = cross_validate(data, cfg, folds, out, labels=labels, preset=preset, progress=not quiet)
    typer.echo(
        f"{folds}-fold results in {res.out}; the folds form an ensemble: "
        f"fetalplanes evaluate {res.out} OTHER_DATA"
    )


def tune(
    data: DataArg,
    trials: Annotated[int, typer.Option(help="Number of trials.")] = 20,
    epochs: EpochsOpt = None,
    timeout: Annotated[
        float | None, typer.Option(help="Stop starting trials after S seconds.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Study folder (default runs/tune/study).")
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated models to choose among (default efficientnet_lite0,seed-cnn)."
        ),
    ] = None,
    img_size: SizeOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    labels: LabelsOpt = None,
    preset: PresetOpt = "seed4",
    quiet: QuietOpt = False,
) -> None:
    """Optuna search (TPE, median pruning): OUT/best_config.json for `train --config`."""
    from fetalplanes.tune import SearchSpace
    from fetalplanes.tune import tune as tune_fn

    cfg = _base_config(config, epochs=epochs, img_size=img_size, seed=seed)
    space = SearchSpace()
    if models:
        names = tuple(m.strip() for m in models.split(",") if m.strip())
        _check_models(names)
        space = SearchSpace(models=names)
    res = tune_fn(
        data,
        base=cfg,
        trials=trials,
        timeout=timeout,
        out=out,
        space=space,
        labels=labels,
        preset=preset,
        progress=not quiet,
    )
    typer.echo(
        f"best calibrated validation loss {res.best_value:.4f}; "
        f"train with: fetalplanes train {data} --config {res.out / 'best_config.json'}"
    )


def _check_models(names: tuple[str, ...]) -> None:
    from fetalplanes.models import get_spec

    if not names:
        _fail("--models is empty")
    for name in names:
        get_spec(name)  # one-line error for an unknown name
