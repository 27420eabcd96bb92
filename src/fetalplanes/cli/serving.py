"""Serving command: the web page and HTTP API (loopback by default)."""

from __future__ import annotations

from typing import Annotated

import typer

from fetalplanes.cli.common import fail
from fetalplanes.cli.options import (
    MODEL_HELP,
    BackendChoice,
    BackendOpt,
    MinConfidenceOpt,
    ModelOpt,
    PresetOpt,
    WeightsOpt,
    load_model,
    model_ref,
)


def serve(
    run: Annotated[
        str | None, typer.Argument(help="The model (omit with --model). " + MODEL_HELP)
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback prints a warning.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    backend: BackendOpt = BackendChoice.auto,
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
    live_max_fps: Annotated[
        float,
        typer.Option("--live-max-fps", min=0.1, max=1000,
                     help="Frames per second one live connection may send; more are dropped "
                     "unread and counted."),
    ] = 60.0,
    live_max_frame_mb: Annotated[
        float,
        typer.Option("--live-max-frame-mb", min=0.01, max=256,
                     help="Largest live frame (MiB); a bigger one closes the connection."),
    ] = 8.0,
    live_max_connections: Annotated[
        int,
        typer.Option("--live-max-connections", min=1, max=64,
                     help="Live connections at once; more are refused as busy."),
    ] = 4,
    min_confidence: MinConfidenceOpt = 0.5,
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
    from fetalplanes.serving.server import bind

    if (run is None) == (model is None):
        fail("give the model either as the first argument or with --model (not both)")
    settings = ServeSettings.from_mb(
        max_file_mb,
        max_request_mb,
        host=host,
        port=port,
        max_concurrency=max_concurrency,
        max_batch=max_batch,
        access_log=access_log,
        allowed_hosts=tuple(allow_host or ()),
        max_live_fps=live_max_fps,
        max_live_frame_bytes=int(live_max_frame_mb * 1024 * 1024),
        max_live_connections=live_max_connections,
    )
    sock = bind(settings)  # a busy port is one line now, before the model is loaded
    try:
        predictor = load_model(model_ref(str(run or model), weights, preset, backend,
                                          min_confidence=min_confidence))
    except BaseException:
        sock.close()
        raise
    warning = exposure_warning(host)
    if warning:
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)
    shown = f"[{host}]" if ":" in host else host  # IPv6 literal in a URL
    typer.echo(f"fetalplanes: serving {predictor.card.architecture} on "
               f"http://{shown}:{sock.getsockname()[1]}/")
    run_server(create_app(predictor, settings), settings, sock)
