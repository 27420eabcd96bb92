"""Sweep commands: scan a video or DICOM cine for planes; de-identify DICOM files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from fetalplanes.cli.common import fail, printable, warn_notes
from fetalplanes.cli.options import (
    MODEL_HELP,
    BackendChoice,
    BackendOpt,
    BatchSizeOpt,
    EveryOpt,
    FpsOpt,
    MinConfidenceOpt,
    ModelOpt,
    PresetOpt,
    QuietOpt,
    WeightsOpt,
    WorkersOpt,
    load_model,
    model_ref,
    out_option,
    split_model,
)
from fetalplanes.data.sources import mark_output, open_source
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.predictor import DEFAULT_MIN_CONFIDENCE as DEFAULT_MIN_CONF
from fetalplanes.workflows import scan as timeline
from fetalplanes.workflows.scan import DEFAULT_BATCH, DEFAULT_WINDOW

#: Default OUT is SCANS_DIR/<input stem>, then -1, -2, ... : never an existing folder, and
#: never beside the input (where a later `predict` of that folder would take it for scans).
SCANS_DIR = Path("runs") / "scan"


def _check_out(out: Path, source: Path) -> None:
    """An explicit --out may be new or an empty folder (a scan never overwrites), and never
    inside the folder being scanned."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out}: already exists and is not an empty folder; scan never overwrites, "
             "choose another --out")
    if source.is_dir() and source.resolve() in out.resolve().parents:
        fail(f"{out}: inside the folder being scanned; choose an --out outside {source}")


def _make_out(out: Path | None, source: Path) -> Path:
    """Create the output folder: --out, or runs/scan/<input stem>[-N] that does not exist
    yet; marked as fetalplanes output (input listings skip it)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "scan")
        return out
    stem = source.resolve().stem or "scan"
    SCANS_DIR.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = SCANS_DIR / (stem if n == 0 else f"{stem}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        mark_output(candidate, "scan")
        return candidate
    raise FetalPlanesError(f"{SCANS_DIR}: too many scans named {stem}; give --out")


def scan(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="MODEL INPUT; with --model, INPUT only; with --live, MODEL only. "
                            "INPUT: a video (MP4, AVI, MOV, MKV ...), a DICOM cine, or a folder "
                            f"of frames. {MODEL_HELP}"),
    ] = None,
    out: Annotated[Path | None, out_option("runs/scan/<input stem>, -1, -2 ... if taken")] = None,
    every: EveryOpt = 1,
    window: Annotated[
        int, typer.Option(min=1, help="Frames in the centred smoothing window (odd; 1: none).")
    ] = DEFAULT_WINDOW,
    fps: FpsOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    backend: BackendOpt = BackendChoice.auto,
    min_confidence: MinConfidenceOpt = DEFAULT_MIN_CONF,
    batch_size: BatchSizeOpt = DEFAULT_BATCH,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
    live: Annotated[
        str | None,
        typer.Option("--live", metavar="SOURCE",
                     help="Scan live video instead of a file, until Ctrl-C: a capture card or "
                          "camera (/dev/video0, or its index 0) or a stream URL (rtsp://, "
                          "udp://, rtp://, srt://, tcp://, http(s):// MJPEG). Frames the model "
                          "cannot keep up with are dropped, newest kept (docs/live.md)."),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option("--duration", callback=_positive_seconds, metavar="SECONDS",
                     help="With --live: stop after this many seconds (default: Ctrl-C, "
                          "SIGTERM or the end of the stream)."),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option("--timeout", callback=_positive_seconds, metavar="SECONDS",
                     help="With --live: how long to wait for the source to open, and for a "
                          "frame before the stream counts as ended."),
    ] = 10.0,
) -> None:
    """Find the standard planes in a sweep: timeline.csv, timeline.png, best/<plane>.png.

    With --live SOURCE: name the plane live on the terminal and write timeline.csv and
    best/<plane>.png when stopped."""
    if live is not None:
        _scan_live(args or [], model, live, out, window, weights, preset, backend,
                   min_confidence, duration, timeout, quiet)
        return
    if duration is not None:
        fail("--duration goes with --live SOURCE")
    first, rest = split_model(args or [], model, 1, "fetalplanes scan MODEL INPUT")
    source_path = Path(rest[0])
    timeline.check_options(every, window, batch_size)
    if out is not None:
        _check_out(out, source_path)
    source = open_source(source_path, fps)  # fails fast on an unreadable input
    pred = load_model(model_ref(first, weights, preset, backend, min_confidence=min_confidence))
    result = timeline.scan(pred, source, every=every, window=window, batch_size=batch_size,
                           progress=not quiet, workers=workers)
    folder = _make_out(out, source_path)
    timeline.write_scan(result, folder)
    for message in result.skipped:
        typer.secho(f"skipped: {message}", fg=typer.colors.YELLOW, err=True)
    warn_notes(r.prediction for r in result.rows)
    for line in result.summary_lines():
        typer.echo(line)
    if result.found:
        typer.echo(f"best frames: {folder / 'best'}")
    typer.echo(f"timeline: {folder / 'timeline.csv'}, {folder / 'timeline.png'}")


def _positive_seconds(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a number of seconds above 0 (got {value})")
    return value


def _scan_live(args: list[str], model: str | None, live: str, out: Path | None, window: int,
               weights: Path | None, preset: str, backend: BackendChoice,
               min_confidence: float, duration: float | None, timeout: float,
               quiet: bool) -> None:
    """`scan --live SOURCE`: see cli/live.py."""
    from fetalplanes.cli.live import run_live
    from fetalplanes.data.video import stream_target

    first, _ = split_model(args, model, 0, "fetalplanes scan MODEL --live SOURCE")
    timeline.check_options(1, window)
    stream_target(live)  # a refused source is one line before the model loads
    if out is not None:
        _check_out(out, Path(live))
    pred = load_model(model_ref(first, weights, preset, backend, min_confidence=min_confidence))
    run_live(pred, live, lambda: _make_out(out, Path("live")), window=window,
             duration_s=duration, timeout_s=timeout, quiet=quiet)


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
    """De-identify ultrasound DICOM files: PS3.15 Table E.1-1 basic profile on the header
    (plus a safety net for text no table lists), pixels outside the ultrasound regions zeroed.

    Prints one line per skipped, failed or non-DICOM file on stderr, a summary on stdout.

    Exit 1: no DICOM to work on (a FIFO, a device, a folder without DICOM) or all failed.

    Exit 2: the output cannot be written or lies inside the input.
    """
    from fetalplanes.tools.deid import NothingToDeidentify, deidentify

    if top_band < 0:
        fail(f"--top-band must not be negative (got {top_band:g})")
    try:
        report = deidentify(src, dst, mask_outside_regions=not no_mask, top_band=top_band,
                            uid_map=uid_map, rename=rename)
    except NothingToDeidentify as exc:
        fail(str(exc), 1)
    for msg in report.skipped:
        typer.secho(f"skipped: {printable(msg)}", fg=typer.colors.YELLOW, err=True)
    for path in report.not_dicom:
        typer.secho(f"not DICOM, skipped: {printable(str(path))}", fg=typer.colors.YELLOW,
                    err=True)
    for msg in report.failed:
        typer.secho(f"failed: {printable(msg)}", fg=typer.colors.RED, err=True)
    for path in report.unmasked:
        typer.secho(f"not masked (no regions declared; review it): {printable(str(path))}",
                    fg=typer.colors.YELLOW, err=True)
    typer.echo(report.summary())
    if report.failed and not report.written and not report.skipped:
        raise typer.Exit(1)
