"""Prediction commands: predict (table, JSON, CSV), sort into folders, explain."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from fetalplanes.cli.common import fail, printable, warn_notes
from fetalplanes.cli.options import (
    MODEL_HELP,
    AddressOpt,
    BackendChoice,
    BackendOpt,
    BatchSizeOpt,
    Engine,
    EngineOpt,
    EnsembleOpt,
    Fmt,
    FormatOpt,
    MinConfidenceOpt,
    ModelOpt,
    PresetOpt,
    QuietOpt,
    TtaOpt,
    WeightsOpt,
    WorkersOpt,
    load_model,
    model_ref,
    split_model,
)
from fetalplanes.inference.model_ref import ModelRef
from fetalplanes.inference.predictor import DEFAULT_MIN_CONFIDENCE as DEFAULT_MIN_CONF
from fetalplanes.inference.results import Prediction, columns


def on_engine(pred: Any, engine: Engine, address: str | None, spec: ModelRef,
              ordered: bool) -> Any:
    """The predictor itself (local), or the same model spread over a Ray cluster."""
    if engine is Engine.local:
        if address:
            fail("--address needs --engine ray")
        return pred
    from fetalplanes.inference.ray_engine import RayPredictor, check_address, ray_module

    ray_module()  # not installed: one line now, before any output
    if address:
        check_address(address)
    return RayPredictor(pred, spec, address=address, ordered=ordered)


def predict(
    args: Annotated[
        list[str],
        typer.Argument(help="MODEL then images, DICOM files, videos or folders (every frame "
                            f"of a cine or video is an item). {MODEL_HELP} With --model, "
                            "only the inputs."),
    ],
    fmt: FormatOpt = Fmt.table,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    backend: BackendOpt = BackendChoice.auto,
    tta: TtaOpt = False,
    ensemble: EnsembleOpt = None,
    min_confidence: MinConfidenceOpt = DEFAULT_MIN_CONF,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = None,
    engine: EngineOpt = Engine.local,
    address: AddressOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Plane and every class probability for each image (class names from the checkpoint)."""
    from fetalplanes.data.sources import collect, count_items, iter_items

    first, inputs = split_model(args, model, None, "fetalplanes predict MODEL INPUT...")
    spec = model_ref(first, weights, preset, backend, tta, ensemble, min_confidence)
    pred = load_model(spec)
    sources = collect([Path(a) for a in inputs])
    if not sources:
        fail(f"no images, DICOM files or videos found in {', '.join(inputs)}", 1)
    pred = on_engine(pred, engine, address, spec, ordered=True)
    expected = count_items(sources)
    stream = pred.predict_items(iter_items(sources), batch_size=batch_size, workers=workers,
                                expected=expected, progress=not quiet and expected != 1)
    results = emit(stream, fmt, pred.output_classes)
    bad = [r for r in results if not r.ok]
    for r in bad:
        typer.secho(f"skipped: {printable(r.error or '')}", fg=typer.colors.YELLOW, err=True)
    warn_notes(results)
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
            Text(printable(Path(r.path).name)),
            label,
            f"{r.confidence:.3f}",
            *(f"{r.probs.get(c, 0):.3f}" for c in classes),
        )
    Console(width=None if sys.stdout.isatty() else 160).print(t)


def sort_cmd(
    args: Annotated[
        list[str], typer.Argument(help=f"MODEL INPUT_DIR OUT_DIR (with --model: INPUT_DIR "
                                       f"OUT_DIR). {MODEL_HELP}")
    ],
    min_confidence: MinConfidenceOpt = DEFAULT_MIN_CONF,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    backend: BackendOpt = BackendChoice.auto,
    tta: TtaOpt = False,
    ensemble: EnsembleOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = None,
    engine: EngineOpt = Engine.local,
    address: AddressOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Copy images into OUT_DIR/<predicted plane>/ (inputs never modified; resumable); every
    frame of a DICOM cine or video is written as a lossless PNG."""
    from fetalplanes.workflows.sorting import sort_images

    first, rest = split_model(args, model, 2, "fetalplanes sort MODEL INPUT_DIR OUT_DIR")
    inp, out = Path(rest[0]), Path(rest[1])
    spec = model_ref(first, weights, preset, backend, tta, ensemble, min_confidence)
    pred = on_engine(load_model(spec), engine, address, spec, ordered=False)  # journal: any order
    s = sort_images(pred, inp, out, min_confidence, batch_size=batch_size, workers=workers,
                    progress=not quiet, model=spec.describe())
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(s.counts.items())) or "nothing new"
    typer.echo(
        f"sorted {s.copied} images into {out} ({counts}); "
        f"{s.skipped_done} already done, {len(s.failures)} unreadable; "
        f"log: {out / 'predictions.csv'}"
    )
    if s.all_unreadable:
        fail(f"none of the {s.found} images in {inp} could be read", 1)


def explain(
    args: Annotated[list[str], typer.Argument(help=f"MODEL IMAGE (with --model: IMAGE only). "
                                                   f"{MODEL_HELP}")],
    out: Annotated[
        Path | None, typer.Option(help="Overlay PNG to write (default IMAGE_STEM-gradcam.png).")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(help="Class to explain (name or index); default the predicted one."),
    ] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
) -> None:
    """Grad-CAM heatmap over the image the network sees: where it looked for its answer."""
    from fetalplanes.inference.explain import explain_file

    first, rest = split_model(args, model, 1, "fetalplanes explain MODEL IMAGE")
    image = Path(rest[0])
    predictor = load_model(model_ref(first, weights, preset, BackendChoice.torch))
    dest = out or Path(f"{image.stem}-gradcam.png")
    made = explain_file(predictor, image, dest, target)
    pred = made.prediction
    label = pred.label + (f" ({pred.model_label})" if pred.model_label else "")
    typer.echo(
        f"{image}: {label} {pred.confidence:.3f}; Grad-CAM of {made.target} written to {made.path}"
    )
