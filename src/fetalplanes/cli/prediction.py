"""Prediction commands: predict (table, JSON, CSV), sort into folders, explain."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from fetalplanes.cli.common import (
    BackendArg,
    BackendOpt,
    EnsembleOpt,
    Fmt,
    ModelOpt,
    PresetOpt,
    WeightsOpt,
    build_predictor,
    fail,
)
from fetalplanes.inference.predictor import DEFAULT_MIN_CONFIDENCE as DEFAULT_MIN_CONF
from fetalplanes.inference.results import Prediction, columns


class Engine(str, Enum):
    local = "local"
    ray = "ray"


EngineOpt = Annotated[
    Engine,
    typer.Option(
        "--engine",
        help="local (this machine) or ray (a Ray cluster: decode tasks and model actors on "
        "every node; pip install 'fetalplanes[ray]'; docs/scale.md).",
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster for --engine ray: auto (the cluster this machine joined) or "
        "HOST:6379 (`ray start --head`); default a private local Ray instance.",
    ),
]


def on_engine(
    pred: Any,
    engine: Engine,
    address: str | None,
    spec: str | Path | None,
    weights: Path | None,
    preset: str,
    backend: str,
    tta: bool,
    ensemble: str | None,
    ordered: bool,
) -> Any:
    """The predictor itself (local), or the same model spread over a Ray cluster."""
    if engine is Engine.local:
        if address:
            fail("--address needs --engine ray")
        return pred
    from fetalplanes.inference.ray_engine import ModelRecipe, RayPredictor, ray_module

    ray_module()  # not installed: one line now, before any output

    def where(p: str | Path) -> str:  # actors on other nodes do not share our cwd
        return str(Path(p).resolve()) if Path(p).exists() else str(p)

    extra = tuple(where(p.strip()) for p in (ensemble or "").split(",") if p.strip())
    recipe = ModelRecipe(where(str(spec)), where(weights) if weights else None, preset,
                         backend, tta, extra)
    return RayPredictor(pred, recipe, address=address, ordered=ordered)


def predict(
    args: Annotated[
        list[str],
        typer.Argument(
            help="MODEL then images/folders. MODEL: a run folder, an .onnx file or a "
            "pretrained name (sononet16, bundled). With --model, only images/folders."
        ),
    ],
    fmt: Annotated[Fmt, typer.Option("--format", help="table, json or csv.")] = Fmt.table,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    backend: BackendArg = BackendOpt.auto,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation.")] = False,
    ensemble: EnsembleOpt = None,
    min_confidence: Annotated[
        float, typer.Option("--min-confidence", help="Flag predictions below this as uncertain.")
    ] = DEFAULT_MIN_CONF,
    engine: EngineOpt = Engine.local,
    address: AddressOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Plane and every class probability for each image (class names from the checkpoint)."""
    from fetalplanes.data.loading import list_items

    run = None if model else Path(args[0])
    inputs = [Path(a) for a in (args if model else args[1:])]
    if not inputs:
        fail("no images given: fetalplanes predict MODEL IMAGE_OR_DIR ...")
    pred = build_predictor(
        run, model, weights, preset, backend.value, tta, min_confidence, ensemble
    )
    files = list_items(inputs)
    if not files:
        fail(f"no image files found in {', '.join(map(str, inputs))}")
    pred = on_engine(pred, engine, address, model or run, weights, preset, backend.value, tta,
                     ensemble, ordered=True)
    stream = pred.predict_paths(files, progress=not quiet and len(files) > 1)
    results = emit(stream, fmt, pred.output_classes)
    bad = [r for r in results if not r.ok]
    for r in bad:
        typer.secho(f"skipped: {r.error}", fg=typer.colors.YELLOW, err=True)
    if bad and len(bad) == len(results):
        raise typer.Exit(1)


def emit(stream: Iterable[Prediction], fmt: Fmt, classes: list[str]) -> list[Prediction]:
    """Write results in the one schema: CSV rows as they come, JSON or a table at the end."""
    results: list[Prediction] = []
    if fmt is Fmt.csv:
        w = csv.DictWriter(sys.stdout, columns(classes))
        w.writeheader()
        for r in stream:
            w.writerow(r.to_row(classes))
            sys.stdout.flush()
            results.append(r)
        return results
    results = list(stream)
    if fmt is Fmt.json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    elif any(r.ok for r in results):
        _table(results, classes)
    return results


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
        label = r.label + (f" ({r.model_label})" if r.model_label else "")
        label += " (uncertain)" if r.uncertain else ""
        t.add_row(
            Text(Path(r.path).name),
            label,
            f"{r.confidence:.3f}",
            *(f"{r.probs.get(c, 0):.3f}" for c in classes),
        )
    Console(width=None if sys.stdout.isatty() else 160).print(t)


def sort_cmd(
    args: Annotated[
        list[str], typer.Argument(help="RUN INPUT_DIR OUT_DIR (with --model: INPUT_DIR OUT_DIR).")
    ],
    min_confidence: Annotated[
        float, typer.Option("--min-confidence", help="Below this, copy to OUT_DIR/uncertain/.")
    ] = DEFAULT_MIN_CONF,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    backend: BackendArg = BackendOpt.auto,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation.")] = False,
    ensemble: EnsembleOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    engine: EngineOpt = Engine.local,
    address: AddressOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Copy images into OUT_DIR/<predicted plane>/ (inputs never modified; resumable)."""
    from fetalplanes.inference.sorting import sort_images

    need = 2 if model else 3
    if len(args) != need:
        fail(
            "usage: fetalplanes sort RUN INPUT_DIR OUT_DIR (or --model M --weights W "
            "INPUT_DIR OUT_DIR)"
        )
    run = None if model else Path(args[0])
    inp, out = Path(args[-2]), Path(args[-1])
    pred = build_predictor(
        run, model, weights, preset, backend.value, tta, min_confidence, ensemble
    )
    pred = on_engine(pred, engine, address, model or run, weights, preset, backend.value, tta,
                     ensemble, ordered=False)  # the journal needs no order
    s = sort_images(pred, inp, out, min_confidence, batch_size=batch_size, progress=not quiet)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(s.counts.items())) or "nothing new"
    typer.echo(
        f"sorted {s.copied} images into {out} ({counts}); "
        f"{s.skipped_done} already done, {len(s.failures)} unreadable; "
        f"log: {out / 'predictions.csv'}"
    )
    if s.all_unreadable:
        fail(f"none of the {s.found} images in {inp} could be read", 1)


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
    from fetalplanes.inference.explain import explain_file

    need = 1 if model else 2
    if len(args) != need:
        fail("usage: fetalplanes explain MODEL IMAGE (MODEL: a run folder or sononet16)")
    image = Path(args[-1])
    run = None if model else Path(args[0])
    predictor = build_predictor(run, model, weights, preset, "torch", False, DEFAULT_MIN_CONF)
    dest = out or Path(f"{image.stem}-gradcam.png")
    made = explain_file(predictor, image, dest, target)
    pred = made.prediction
    label = pred.label + (f" ({pred.model_label})" if pred.model_label else "")
    typer.echo(
        f"{image}: {label} {pred.confidence:.3f}; Grad-CAM of {made.target} written to {made.path}"
    )
