"""Serving command: the web page and HTTP API (loopback by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fetalplanes.cli.common import (
    BackendArg,
    BackendOpt,
    ModelOpt,
    PresetOpt,
    WeightsOpt,
    build_predictor,
    fail,
)


def serve(
    run: Annotated[
        Path | None, typer.Argument(help="Run folder from `train` (omit with --model).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback prints a warning.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    backend: BackendArg = BackendOpt.auto,
    max_file_mb: Annotated[
        float, typer.Option("--max-file-mb", min=0.001, help="Largest accepted file (MiB).")
    ] = 20,
    max_request_mb: Annotated[
        float,
        typer.Option("--max-request-mb", min=0.001, help="Largest accepted request (MiB)."),
    ] = 200,
    max_concurrency: Annotated[
        int,
        typer.Option(
            "--max-concurrency", min=1, help="Model jobs (batches, heat maps) run at once."
        ),
    ] = 2,
    max_batch: Annotated[
        int,
        typer.Option("--max-batch", min=1, help="Images gathered into one model call."),
    ] = 8,
    min_confidence: Annotated[
        float,
        typer.Option("--min-confidence", help="Flag predictions below this as uncertain."),
    ] = 0.5,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log/--no-access-log", help="Log each request (client addresses)."
        ),
    ] = False,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="Also answer requests for this Host name (repeatable); loopback names "
            "and the --host address are always allowed. Others get 400 (DNS rebinding).",
        ),
    ] = None,
) -> None:
    """Web page and HTTP API for classifying uploaded images (loopback by default)."""
    from fetalplanes.serving import ServeSettings, create_app, exposure_warning, run_server

    if (run is None) == (model is None):
        fail("give either a RUN folder or --model NAME --weights PATH (not both)")
    settings = ServeSettings.from_mb(
        max_file_mb,
        max_request_mb,
        host=host,
        port=port,
        max_concurrency=max_concurrency,
        max_batch=max_batch,
        access_log=access_log,
        allowed_hosts=tuple(allow_host or ()),
    )
    try:
        predictor = build_predictor(
            run, model, weights, preset, backend.value, False, min_confidence
        )
    except ModuleNotFoundError as exc:  # e.g. --backend onnx without onnxruntime
        hint = " (pip install 'fetalplanes[onnx]')" if backend.value.startswith("onnx") else ""
        fail(f"cannot load the model: module {exc.name} is missing{hint}")
    warning = exposure_warning(host)
    if warning:
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)
    shown = f"[{host}]" if ":" in host else host  # IPv6 literal in a URL
    typer.echo(f"fetalplanes: serving {predictor.card.architecture} on http://{shown}:{port}/")
    run_server(create_app(predictor, settings), settings)
