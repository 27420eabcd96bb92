"""Speed commands: `export` (ONNX), `bench` (measured speed) and `cache` (decode once).

Registered on the main Typer app by `fetalplanes.cli`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

# Not imported from fetalplanes.cli: this module is imported while cli.py is still loading.
PresetOpt = Annotated[str, typer.Option("--preset", help="Label preset: seed4, fpdb6 or brain3.")]
LabelsOpt = Annotated[
    Path | None, typer.Option("--labels", help="Label CSV when not auto-detected in DATA.")
]


class ExportFormat(str, Enum):
    onnx = "onnx"


class BenchDevice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder from `train`.")],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", help="Export format.")
    ] = ExportFormat.onnx,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 17,
    out: Annotated[
        Path | None,
        typer.Option(help="Output file (default RUN/model.onnx, RUN/model.int8.onnx)."),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Also quantise the convolutions to int8 (about 2x faster on a CPU; "
            "check accuracy with `evaluate --backend onnx-int8`).",
        ),
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Folder of typical scans for --int8 (default: the run's data)."),
    ] = None,
) -> None:
    """Export a run to ONNX (normalisation inside; input N x 1 x H x W pixels 0-255)."""
    from fetalplanes.export import export_int8, export_onnx

    fp32_out = None if int8 else out
    path = export_onnx(run, fp32_out, opset)
    size_mb = path.stat().st_size / 1e6
    typer.echo(
        f"wrote {path} ({size_mb:.1f} MB, opset {opset}, dynamic batch); use it with --backend onnx"
    )
    if int8:
        q = export_int8(run, calibration, out)
        typer.echo(
            f"wrote {q} ({q.stat().st_size / 1e6:.1f} MB, int8 convolutions); "
            "use it with --backend onnx-int8"
        )


def bench_cmd(
    device: Annotated[BenchDevice, typer.Option(help="cpu or cuda.")] = BenchDevice.cpu,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the results to this JSON file.")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Few images and steps: seconds, not minutes.")
    ] = False,
    compile_: Annotated[
        bool, typer.Option("--compile", help="torch.compile the training model.")
    ] = False,
    model: Annotated[str, typer.Option(help="Architecture to benchmark.")] = "efficientnet_lite0",
    img_size: Annotated[
        int | None, typer.Option("--img-size", help="Square input size (default: the model's).")
    ] = None,
    images: Annotated[
        int | None, typer.Option(help="Scans for the end-to-end rows (default 2000, quick 48).")
    ] = None,
    rss_images: Annotated[
        int | None,
        typer.Option("--rss-images", help="Scans sorted by the memory run (default: --images)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Decode worker processes (default: automatic).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Measure decode, inference (torch, onnx), latency, training and peak memory here."""
    from fetalplanes.bench import BenchOptions, print_report, run_bench, write_json

    opts = BenchOptions(
        device=device.value,
        quick=quick,
        compile=compile_,
        model=model,
        img_size=img_size,
        images=images,
        rss_images=rss_images,
        workers=workers,
    )
    report = run_bench(opts, progress=not quiet)
    print_report(report)
    if json_file is not None:
        write_json(report, json_file)
        typer.echo(f"results written to {json_file}")


def cache_cmd(
    data: Annotated[Path, typer.Argument(help="Data folder (any layout `train` accepts).")],
    labels: LabelsOpt = None,
    preset: PresetOpt = "seed4",
    model: Annotated[
        str, typer.Option(help="Architecture whose preprocessing to cache.")
    ] = "efficientnet_lite0",
    img_size: Annotated[
        int | None, typer.Option("--img-size", help="Square input size override.")
    ] = None,
    crop: Annotated[
        bool | None,
        typer.Option("--crop/--no-crop", help="Crop to the ultrasound region (model default)."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="Cache folder (default $FETALPLANES_CACHE or ~/.cache/fetalplanes)."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Decode worker processes (default: automatic).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Decode, crop and resize every image once into the cache that `train` reads."""
    from fetalplanes.cache import ArrayCache, default_cache_dir, load_arrays
    from fetalplanes.console import report_failures
    from fetalplanes.data import load_dataset
    from fetalplanes.train import TrainConfig, resolve_preprocess

    ds = load_dataset(data, labels, preset)
    size = (img_size, img_size) if img_size else None
    pp = resolve_preprocess(TrainConfig(model=model, img_size=size, crop=crop))
    root = cache_dir or default_cache_dir()
    paths = [s.path for s in ds.samples]
    loaded = load_arrays(paths, pp, root, workers, progress=not quiet, desc="filling cache")
    if loaded.failures:
        report_failures(loaded.failures)
    folder = ArrayCache(root, pp).dir
    typer.echo(
        f"{len(paths)} images for {model} at {pp.size[0]}x{pp.size[1]} "
        f"(crop {'on' if pp.crop else 'off'}): {loaded.hits} cache hits, "
        f"{loaded.decoded} decoded, {len(loaded.failures)} unreadable; cache {folder}"
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    # cli.py calls register() after defining _guard, so this import is not circular
    from fetalplanes.cli import _guard

    app.command("export")(_guard(export_cmd))
    app.command("bench")(_guard(bench_cmd))
    app.command("cache")(_guard(cache_cmd))
