"""Training commands: train, crossval (K folds by patient) and tune."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from fetalplanes.cli.common import fail
from fetalplanes.cli.options import ArchAliasOpt, LabelsOpt, QuietOpt, arch_of
from fetalplanes.errors import FetalPlanesError

PresetOpt = Annotated[str, typer.Option("--preset", help="Label preset: seed4, fpdb6 or brain3.")]


def _one_voice(fn: Any) -> Any:
    """In a torchrun job only the first process to fail prints why (`JobFailed.quiet`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FetalPlanesError as exc:
            if getattr(exc, "quiet", False):
                raise typer.Exit(2) from None
            raise

    return wrapper


def _single_process(what: str) -> None:
    """Cross-validation and tuning run many trainings; under torchrun they would race."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        fail(f"{what} runs in one process: launch it with `fetalplanes`, not torchrun")


@_one_voice
def train(
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Data folder (CSV + images, FETAL_PLANES_DB, or one sub-folder per class)."
        ),
    ] = None,
    labels: LabelsOpt = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="Label preset: seed4, fpdb6 or brain3 (default: the --config recipe's, "
            "else seed4).",
        ),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option("--arch", help="Architecture (see `fetalplanes models`; any timm name). "
                                    "Default efficientnet_lite0."),
    ] = None,
    model: ArchAliasOpt = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default 10).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default runs/train/MODEL[-N]).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    pretrained: Annotated[
        bool | None,
        typer.Option(
            "--pretrained/--no-pretrained", help="Start from pretrained weights where available."
        ),
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Start weights (.safetensors/.pth).")] = None,
    augment: Annotated[str | None, typer.Option(help="none, origin or strong.")] = None,
    freeze_epochs: Annotated[
        int | None,
        typer.Option("--freeze-epochs", help="Train only the head for the first N epochs."),
    ] = None,
    label_smoothing: Annotated[float | None, typer.Option("--label-smoothing")] = None,
    balance: Annotated[str | None, typer.Option(help="sampler, loss or none.")] = None,
    early_stopping: Annotated[
        int | None,
        typer.Option(
            "--early-stopping", help="Stop after N epochs without validation improvement."
        ),
    ] = None,
    img_size: Annotated[
        int | None, typer.Option("--img-size", help="Square input size override.")
    ] = None,
    crop: Annotated[
        bool | None,
        typer.Option(
            "--crop/--no-crop", help="Crop to the ultrasound region first (model default)."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (split, init, order).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    cache: Annotated[
        bool | None,
        typer.Option("--cache/--no-cache", help="Decode-once image cache (~/.cache/fetalplanes)."),
    ] = None,
    compile_: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model (GPU).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="JSON config (e.g. from `tune`) or a shipped recipe: fpdb6-lite0, "
            "fpdb6-sononet16, brain3-lite0 (docs/results.md); flags override it."
        ),
    ] = None,
    rejection_score: Annotated[
        str | None,
        typer.Option(
            "--rejection-score",
            help="Not-target score: knn (feature distance to training images, default), "
            "energy, msp or maxlogit.",
        ),
    ] = None,
    rejection_recall: Annotated[
        float | None,
        typer.Option(
            "--rejection-recall",
            help="Share of validation images the not-target threshold keeps (default 0.95).",
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue an interrupted RUN from its last finished epoch (same data, split "
            "and options; --epochs may raise the total).",
        ),
    ] = None,
    log: Annotated[
        str | None,
        typer.Option(
            "--log",
            help="Experiment tracking in the run folder: tensorboard (RUN/tensorboard) or "
            "mlflow (RUN/mlflow.db); needs the extra of the same name.",
        ),
    ] = None,
    sync_bn: Annotated[
        bool | None,
        typer.Option(
            "--sync-bn/--no-sync-bn",
            help="Under torchrun on GPUs: BatchNorm statistics over the whole batch of all "
            "processes (SyncBatchNorm); for small per-GPU batches.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train a model on held-out-patient splits; writes weights, sidecar, history, curves.

    Several processes or machines: torchrun --nproc-per-node N -m fetalplanes train DATA
    (docs/scale.md); --batch-size stays the global batch, rank 0 writes the run folder.
    """
    if resume is not None:
        from fetalplanes.engine.train import Trainer

        if data is not None:
            fail("--resume RUN takes the data recorded in the run; give no DATA")
        Trainer.resume(resume, progress=not quiet, epochs=epochs).fit()
        return
    if data is None:
        fail("no data folder given: fetalplanes train DATA (or --resume RUN)")
    from fetalplanes.engine.train import TrainConfig
    from fetalplanes.engine.train import train as train_fn
    from fetalplanes.recipes import choose_preset, read_config

    base, recipe = TrainConfig(), None
    if config is not None:
        values, recipe = read_config(config)
        base = TrainConfig.from_dict(values)
    preset = choose_preset(preset, recipe)
    cfg = base.updated(
        model=arch_of(arch, model),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        pretrained=pretrained,
        weights=str(weights) if weights else None,
        augment=augment,
        freeze_epochs=freeze_epochs,
        label_smoothing=label_smoothing,
        balance=balance,
        early_stopping=early_stopping,
        img_size=(img_size, img_size) if img_size else None,
        crop=crop,
        seed=seed,
        device=device,
        cache=cache,
        compile=compile_,
        rejection_score=rejection_score,
        rejection_recall=rejection_recall,
        log=log,
        sync_bn=sync_bn,
    )
    train_fn(data, labels=labels, preset=preset, config=cfg, out=out, progress=not quiet)


def _base_config(config: Path | None, **changes: Any) -> Any:
    """`--config` (a JSON file or a recipe name, as for train) with the flags on top."""
    from fetalplanes.engine.train import TrainConfig
    from fetalplanes.recipes import read_config

    base = TrainConfig() if config is None else TrainConfig.from_dict(read_config(config)[0])
    size = changes.pop("img_size", None)
    return base.updated(img_size=(size, size) if size else None, **changes)


ConfigOpt = Annotated[
    Path | None, typer.Option(help="JSON training config (e.g. best_config.json); flags override.")
]
DataArg = Annotated[Path, typer.Argument(help="Labelled data folder.")]
ArchOpt = Annotated[
    str | None, typer.Option("--arch", help="Architecture (default efficientnet_lite0).")
]
EpochsOpt = Annotated[int | None, typer.Option(help="Epochs per training run.")]
SizeOpt = Annotated[int | None, typer.Option("--img-size", help="Square input size override.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed (folds, split, init).")]


def crossval(
    data: DataArg,
    folds: Annotated[int, typer.Option(help="Number of patient-grouped folds.")] = 5,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default runs/train/MODEL-cvK).")
    ] = None,
    arch: ArchOpt = None,
    model: ArchAliasOpt = None,
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
    from fetalplanes.engine.crossval import cross_validate

    _single_process("crossval")
    if folds < 2:
        fail(f"--folds must be at least 2, got {folds}")
    cfg = _base_config(config, model=arch_of(arch, model), epochs=epochs, img_size=img_size,
                       lr=lr, seed=seed)
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
    archs: Annotated[
        str | None,
        typer.Option("--archs", help="Comma-separated architectures to choose among (default "
                                     "efficientnet_lite0,seed-cnn)."),
    ] = None,
    models: Annotated[
        str | None, typer.Option("--models", hidden=True, help="Deprecated: use --archs.")
    ] = None,
    img_size: SizeOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    labels: LabelsOpt = None,
    preset: PresetOpt = "seed4",
    quiet: QuietOpt = False,
) -> None:
    """Optuna search (TPE, median pruning): OUT/best_config.json for `train --config`."""
    from fetalplanes.engine.tune import SearchSpace
    from fetalplanes.engine.tune import tune as tune_fn

    _single_process("tune")
    cfg = _base_config(config, epochs=epochs, img_size=img_size, seed=seed)
    space = SearchSpace()
    chosen = arch_of(archs, models)
    if chosen:
        names = tuple(m.strip() for m in chosen.split(",") if m.strip())
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
        fail("--archs is empty")
    for name in names:
        get_spec(name)  # one-line error for an unknown name
