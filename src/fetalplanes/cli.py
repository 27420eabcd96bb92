"""Command line: a thin Typer layer over the Python API (train/evaluate/predict/sort/...)."""

from __future__ import annotations

import csv
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from fetalplanes.errors import FetalPlanesError

# Spinning OpenMP threads make torch several times slower on a busy 2-core machine;
# set before torch is imported (commands import it lazily). Users may override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    name="fetalplanes",
    help="Classify 2D fetal ultrasound images into standard planes: train, evaluate, "
    "predict, sort, serve. Run `fetalplanes demo` to see the whole pipeline on synthetic data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect labelled data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


class Fmt(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class SynthFormat(str, Enum):
    seed = "seed"
    fpdb = "fpdb"
    folders = "folders"


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def run_cli() -> None:  # pragma: no cover - thin wrapper
    app()


def _guard(fn: Any) -> Any:
    """Turn our errors into one-line messages with exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FetalPlanesError as exc:
            _fail(str(exc))
        except FileExistsError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


PresetOpt = Annotated[str, typer.Option("--preset", help="Label preset: seed4, fpdb6 or brain3.")]
LabelsOpt = Annotated[
    Path | None, typer.Option("--labels", help="Label CSV when not auto-detected in DATA.")
]


# ------------------------------------------------------------------ synth / data


@app.command()
@_guard
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (must be new or empty).")],
    per_class: Annotated[int, typer.Option("--per-class", help="Images per plane.")] = 50,
    fmt: Annotated[
        SynthFormat, typer.Option("--format", help="Layout to write.")
    ] = SynthFormat.seed,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    preset: PresetOpt = "seed4",
) -> None:
    """Generate a SYNTHETIC labelled data set of ultrasound-like phantoms (tests, demos)."""
    from fetalplanes.data import PLANES
    from fetalplanes.synth import generate

    planes = PLANES if preset == "fpdb6" else PLANES[:4]
    s = generate(out, per_class=per_class, fmt=fmt.value, seed=seed, planes=planes)
    typer.echo(
        f"wrote {s.n_images} synthetic images of {s.n_patients} synthetic patients "
        f"to {s.out} ({s.format} layout)"
    )


@data_app.command("check")
@_guard
def data_check(
    data: Annotated[Path, typer.Argument(help="Data folder.")],
    labels: LabelsOpt = None,
    preset: PresetOpt = "seed4",
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Images per class and split, patients, and missing/unreadable/duplicate files."""
    from fetalplanes.data import load_dataset
    from fetalplanes.datacheck import check_dataset

    report = check_dataset(load_dataset(data, labels, preset), seed=seed, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_check(report)
    raise typer.Exit(0 if report.ok else 1)


def _print_check(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    d, con = report.data, Console(soft_wrap=True)
    con.print(
        f"{d.root}: layout {d.layout}, labels {d.labels_file or '(folders)'}, preset {d.preset}"
    )
    con.print(f"{len(d.samples)} images of {len(d.patients)} patients")
    t = Table("class", "train", "val", "test", "total")
    for c in d.classes:
        n = [report.counts[s][c] for s in ("train", "val", "test")]
        t.add_row(c, *map(str, n), str(sum(n)))
    t.add_row(
        "patients",
        *(str(len(report.split.of(s))) for s in ("train", "val", "test")),
        str(len(d.patients)),
    )
    con.print(t)
    problems = [
        ("dropped (planes outside the preset)", [f"{k}: {v}" for k, v in d.dropped.items()]),
        ("unknown labels", [f"{k}: {v}" for k, v in d.unknown.items()]),
        ("missing files", d.missing),
        ("duplicate rows", d.duplicate_rows),
        ("unreadable files", report.unreadable),
        ("identical files", [" = ".join(g) for g in report.duplicate_files]),
    ]
    for title, items in problems:
        if items:
            con.print(f"[yellow]{title} ({len(items)}):[/yellow]")
            for it in items[:50]:
                con.print(f"  {it}", markup=False)
            if len(items) > 50:
                con.print(f"  ... and {len(items) - 50} more")
    con.print(
        "[green]no problems found[/green]" if report.ok else "[yellow]problems found[/yellow]"
    )


@app.command("models")
def models_cmd() -> None:
    """List the registered model architectures."""
    from fetalplanes.models import list_models

    for spec in list_models():
        pp = spec.preprocess
        typer.echo(f"{spec.name:20s} {pp.size[0]}x{pp.size[1]}  {spec.description}")


# ------------------------------------------------------------------ train / evaluate


@app.command()
@_guard
def train(
    data: Annotated[
        Path,
        typer.Argument(
            help="Data folder (CSV + images, FETAL_PLANES_DB, or one sub-folder per class)."
        ),
    ],
    labels: LabelsOpt = None,
    preset: PresetOpt = "seed4",
    model: Annotated[
        str | None,
        typer.Option(help="Architecture (see `fetalplanes models`). Default efficientnet_lite0."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default 10).")] = None,
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
        Path | None, typer.Option(help="JSON config (e.g. from `tune`); flags override it.")
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
    folds: Annotated[
        int | None,
        typer.Option(
            "--folds",
            help="K-fold cross-validation by patient: OUT/fold-1..K and OUT/cv_summary.json "
            "(mean ± sd); the folds then work as one ensemble RUN.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train a model on held-out-patient splits; writes weights, sidecar, history, curves."""
    from fetalplanes.train import TrainConfig
    from fetalplanes.train import train as train_fn

    base = TrainConfig()
    if config is not None:
        try:
            base = TrainConfig.from_dict(json.loads(config.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            _fail(f"{config}: cannot read config ({exc})")
    cfg = base.updated(
        model=model,
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
    )
    if folds is not None:
        from fetalplanes.crossval import cross_validate

        if folds < 2:
            _fail(f"--folds must be at least 2, got {folds}")
        cross_validate(data, cfg, folds, out, labels=labels, preset=preset, progress=not quiet)
        return
    train_fn(data, labels=labels, preset=preset, config=cfg, out=out, progress=not quiet)


class Split_(str, Enum):
    test = "test"
    val = "val"
    all = "all"


class BackendOpt(str, Enum):
    torch = "torch"
    onnx = "onnx"
    onnx_int8 = "onnx-int8"


BackendArg = Annotated[
    BackendOpt,
    typer.Option(help="torch, onnx or onnx-int8 (ONNX Runtime on the CPU; docs/benchmarks.md)."),
]


EnsembleOpt = Annotated[
    str | None,
    typer.Option(
        "--ensemble",
        help="More runs (comma-separated run folders or folders of runs) averaged with RUN. "
        "A folder of runs (e.g. from --folds) given as RUN is an ensemble by itself.",
    ),
]


@app.command()
@_guard
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder from `train`.")],
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Data folder (default: the training "
            "data, test patients only; another folder is evaluated whole)."
        ),
    ] = None,
    split: Annotated[Split_, typer.Option(help="Which recorded patients.")] = Split_.test,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default RUN/eval-SPLIT).")
    ] = None,
    labels: LabelsOpt = None,
    backend: BackendArg = BackendOpt.torch,
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
    """Loss, accuracy, balanced accuracy, F1, per-class metrics, confusion matrix, calibration."""
    from fetalplanes.evaluate import evaluate as evaluate_fn

    predictor = None
    if ensemble:
        predictor = _predictor(run, None, None, "seed4", backend.value, tta, 0.0, ensemble)
        out = out or run / f"eval-ensemble-{split.value}"
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
    )


# ------------------------------------------------------------------ predict / sort


def _predictor(
    run: Path | None,
    model: str | None,
    weights: Path | None,
    preset: str,
    backend: str,
    tta: bool,
    min_confidence: float,
    ensemble: str | None = None,
) -> Any:
    from fetalplanes.inference import Predictor

    if ensemble:
        from fetalplanes.ensemble import ensemble_predictor

        if model is not None or backend != "torch":
            _fail("--ensemble combines run folders on the torch backend (no --model/--backend)")
        extra = [Path(p.strip()) for p in ensemble.split(",") if p.strip()]
        return ensemble_predictor([run, *extra], tta=tta, min_confidence=min_confidence)

    if model is not None:
        if weights is None:
            _fail(f"--model {model} needs --weights PATH (published weights file)")
        return Predictor.from_pretrained(
            model, weights, preset, tta=tta, min_confidence=min_confidence
        )
    assert run is not None
    return Predictor.from_run(run, backend=backend, tta=tta, min_confidence=min_confidence)


ModelOpt = Annotated[
    str | None,
    typer.Option(help="Zero-shot with published weights instead of a RUN (sononet16/32/64)."),
]
WeightsOpt = Annotated[Path | None, typer.Option(help="Weights file for --model.")]


@app.command()
@_guard
def predict(
    args: Annotated[
        list[str],
        typer.Argument(help="RUN then images/folders; with --model, only images/folders."),
    ],
    fmt: Annotated[Fmt, typer.Option("--format", help="table, json or csv.")] = Fmt.table,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    backend: BackendArg = BackendOpt.torch,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation.")] = False,
    ensemble: EnsembleOpt = None,
    min_confidence: Annotated[
        float, typer.Option("--min-confidence", help="Flag predictions below this as uncertain.")
    ] = 0.5,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Plane and every class probability for each image (class names from the checkpoint)."""
    from fetalplanes.images import list_images

    run = None if model else Path(args[0])
    inputs = [Path(a) for a in (args if model else args[1:])]
    if not inputs:
        _fail("no images given: fetalplanes predict RUN IMAGE_OR_DIR ...")
    pred = _predictor(run, model, weights, preset, backend.value, tta, min_confidence, ensemble)
    files = list_images(inputs)
    if not files:
        _fail(f"no image files found in {', '.join(map(str, inputs))}")
    results = list(pred.predict_paths(files, progress=not quiet and len(files) > 1))
    _emit(results, fmt, pred.output_classes)
    bad = [r for r in results if not r.ok]
    for r in bad:
        typer.secho(f"skipped: {r.error}", fg=typer.colors.YELLOW, err=True)
    if bad and len(bad) == len(results):
        raise typer.Exit(1)


def _emit(results: list[Any], fmt: Fmt, classes: list[str]) -> None:
    if fmt is Fmt.json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    elif fmt is Fmt.csv:
        w = csv.writer(sys.stdout)
        extra = any("model_label" in r.extra for r in results)
        w.writerow(
            [
                "path",
                "label",
                "confidence",
                "uncertain",
                "not_target",
                *(["model_label"] if extra else []),
                *classes,
                "error",
            ]
        )
        for r in results:
            w.writerow(
                [
                    r.path,
                    r.label,
                    f"{r.confidence:.6f}" if r.ok else "",
                    int(r.uncertain),
                    int(r.not_target),
                    *([r.extra.get("model_label", "")] if extra else []),
                    *(f"{r.probs.get(c, 0):.6f}" if r.ok else "" for c in classes),
                    r.error or "",
                ]
            )
    elif any(r.ok for r in results):
        _table(results, classes)


def _short(name: str) -> str:
    """Column header: 'Fetal brain' -> 'brain' (tables must fit a terminal)."""
    return name.removeprefix("Fetal ").removeprefix("Maternal ")


def _table(results: list[Any], classes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("image", "plane", "conf.", *(_short(c) for c in classes))
    t.columns[0].overflow = "fold"
    for r in results:
        if not r.ok:
            continue
        label = r.label + (f" ({r.extra['model_label']})" if "model_label" in r.extra else "")
        label += " [uncertain]" if r.uncertain else ""
        t.add_row(
            Path(r.path).name,
            label,
            f"{r.confidence:.3f}",
            *(f"{r.probs.get(c, 0):.3f}" for c in classes),
        )
    Console(width=None if sys.stdout.isatty() else 160).print(t)


@app.command("sort")
@_guard
def sort_cmd(
    args: Annotated[
        list[str], typer.Argument(help="RUN INPUT_DIR OUT_DIR (with --model: INPUT_DIR OUT_DIR).")
    ],
    min_confidence: Annotated[
        float, typer.Option("--min-confidence", help="Below this, copy to OUT_DIR/uncertain/.")
    ] = 0.5,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    backend: BackendArg = BackendOpt.torch,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation.")] = False,
    ensemble: EnsembleOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Copy images into OUT_DIR/<predicted plane>/ (inputs never modified; resumable)."""
    from fetalplanes.sorting import sort_images

    need = 2 if model else 3
    if len(args) != need:
        _fail(
            "usage: fetalplanes sort RUN INPUT_DIR OUT_DIR (or --model M --weights W "
            "INPUT_DIR OUT_DIR)"
        )
    run = None if model else Path(args[0])
    inp, out = Path(args[-2]), Path(args[-1])
    pred = _predictor(run, model, weights, preset, backend.value, tta, min_confidence, ensemble)
    s = sort_images(pred, inp, out, min_confidence, batch_size=batch_size, progress=not quiet)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(s.counts.items())) or "nothing new"
    typer.echo(
        f"sorted {s.copied} images into {out} ({counts}); "
        f"{s.skipped_done} already done, {len(s.failures)} unreadable; "
        f"log: {out / 'predictions.csv'}"
    )


@app.command()
@_guard
def download(
    name: Annotated[str, typer.Argument(help="What to fetch: sononet16.")],
    to: Annotated[Path, typer.Option("--to", help="Destination folder.")] = Path("."),
    url: Annotated[str | None, typer.Option(help="Mirror URL (checksum still enforced).")
                   ] = None,
) -> None:
    """Download published weights (needs internet; pinned URL and sha256 checked)."""
    from fetalplanes.download import ASSETS
    from fetalplanes.download import download as download_fn

    path = download_fn(name, to, url=url)
    typer.echo(f"{path} (sha256 verified; license: {ASSETS[name].license})")


# ------------------------------------------------------------------ demo


@app.command()
@_guard
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path(
        "fetalplanes-demo"
    ),
    per_class: Annotated[
        int, typer.Option("--per-class", help="Synthetic images per plane.")
    ] = 100,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 7,
    model: Annotated[str, typer.Option(help="Architecture for the demo.")] = "efficientnet_lite0",
    img_size: Annotated[int, typer.Option("--img-size", help="Input size (small = fast on CPU).")
                        ] = 128,
) -> None:
    """synth -> train -> evaluate -> predict -> sort on SYNTHETIC data, in minutes on a CPU."""
    from fetalplanes.demo import run_demo

    run_demo(out, per_class=per_class, epochs=epochs, model=model, img_size=img_size)


def _register_command_modules() -> None:
    """Commands that live beside the feature they expose (one module per concern)."""
    from fetalplanes import cli_serve, cli_speed, cli_trust

    for module in (cli_serve, cli_speed, cli_trust):
        module.register(app)


_register_command_modules()

if __name__ == "__main__":  # pragma: no cover
    app()
