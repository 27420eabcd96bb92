"""Sweep commands: scan a video or DICOM cine for planes; de-identify DICOM files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fetalplanes.cli.common import (
    BackendArg,
    BackendOpt,
    ModelOpt,
    PresetOpt,
    QuietOpt,
    WeightsOpt,
    build_predictor,
    fail,
)
from fetalplanes.data.video import open_source
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference import timeline
from fetalplanes.inference.predictor import DEFAULT_MIN_CONFIDENCE as DEFAULT_MIN_CONF
from fetalplanes.inference.timeline import DEFAULT_BATCH, DEFAULT_WINDOW

#: Default OUT is SCANS_DIR/<input stem>, then -1, -2, ... : never an existing folder.
SCANS_DIR = Path("scans")


def _check_out(out: Path) -> None:
    """An explicit --out may be new or an empty folder: a scan never overwrites."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out}: already exists and is not an empty folder; scan never overwrites, "
             "choose another --out")


def _make_out(out: Path | None, source: Path) -> Path:
    """Create the output folder: --out, or scans/<input stem>[-N] that does not exist yet."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        return out
    stem = source.resolve().stem or "scan"
    SCANS_DIR.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = SCANS_DIR / (stem if n == 0 else f"{stem}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FetalPlanesError(f"{SCANS_DIR}: too many scans named {stem}; give --out")


def scan(
    args: Annotated[
        list[str],
        typer.Argument(help="MODEL INPUT (MODEL: a run folder, an .onnx file or a pretrained "
                            "name such as sononet16); with --model, INPUT only. INPUT: a video "
                            "(MP4, AVI, MOV), a DICOM cine, or a folder of frames."),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default scans/<input stem>, -1, -2... if taken)."),
    ] = None,
    every: Annotated[int, typer.Option(help="Classify every K-th frame (1: all).")] = 1,
    window: Annotated[
        int, typer.Option(help="Frames in the centred smoothing window (odd; 1: none).")
    ] = DEFAULT_WINDOW,
    fps: Annotated[
        float | None,
        typer.Option(help="Frame rate of a folder of frames (default 25), or of a file that "
                          "declares none."),
    ] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    backend: BackendArg = BackendOpt.auto,
    min_confidence: Annotated[
        float, typer.Option("--min-confidence", help="Below this (smoothed), a frame is uncertain.")
    ] = DEFAULT_MIN_CONF,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Frames per model call.")] = (
        DEFAULT_BATCH
    ),
    quiet: QuietOpt = False,
) -> None:
    """Find the standard planes in a sweep: timeline.csv, timeline.png, best/<plane>.png."""
    need = 1 if model else 2
    if len(args) != need:
        fail("usage: fetalplanes scan MODEL INPUT (or --model M [--weights W] INPUT)")
    run = None if model else Path(args[0])
    source_path = Path(args[-1])
    timeline.check_options(every, window, batch_size)
    if out is not None:
        _check_out(out)
    source = open_source(source_path, fps)  # fails fast on an unreadable input
    pred = build_predictor(run, model, weights, preset, backend.value, False, min_confidence)
    result = timeline.scan(pred, source, every=every, window=window, batch_size=batch_size,
                         progress=not quiet)
    folder = _make_out(out, source_path)
    timeline.write_scan(result, folder)
    for line in result.summary_lines():
        typer.echo(line)
    if result.found:
        typer.echo(f"best frames: {folder / 'best'}")
    typer.echo(f"timeline: {folder / 'timeline.csv'}, {folder / 'timeline.png'}")


def deid(
    src: Annotated[Path, typer.Argument(help="DICOM file or folder (searched recursively).")],
    dst: Annotated[Path, typer.Argument(help="Output folder (never inside SRC).")],
    no_mask: Annotated[
        bool, typer.Option("--no-mask", help="Keep pixels outside the ultrasound regions.")
    ] = False,
    top_band: Annotated[
        float,
        typer.Option("--top-band", help="Zero this many rows at the top (a fraction if < 1)."),
    ] = 0,
    uid_map: Annotated[
        Path | None,
        typer.Option("--uid-map", help="Write old -> new UIDs to this CSV (keep it private)."),
    ] = None,
    rename: Annotated[
        bool, typer.Option("--rename", help="Name outputs <new SOP Instance UID>.dcm, flat.")
    ] = False,
) -> None:
    """De-identify ultrasound DICOM files (PS3.15 basic profile, burned-in UI masked)."""
    from fetalplanes.tools.deid import deidentify

    if top_band < 0:
        fail(f"--top-band must not be negative (got {top_band:g})")
    report = deidentify(src, dst, mask_outside_regions=not no_mask, top_band=top_band,
                        uid_map=uid_map, rename=rename)
    for msg in report.skipped:
        typer.secho(f"skipped: {msg}", fg=typer.colors.YELLOW, err=True)
    for msg in report.failed:
        typer.secho(f"failed: {msg}", fg=typer.colors.RED, err=True)
    for path in report.unmasked:
        typer.secho(f"not masked (no regions declared; review it): {path}",
                    fg=typer.colors.YELLOW, err=True)
    typer.echo(report.summary())
    if report.failed and not report.written and not report.skipped:
        raise typer.Exit(1)
