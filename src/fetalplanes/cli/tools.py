"""Tool commands: models, export, bench, cache, download, demo."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fetalplanes.cli.common import fail
from fetalplanes.cli.options import (
    MODEL_HELP,
    ArchAliasOpt,
    ArchOpt,
    LabelsOpt,
    ModelOpt,
    PresetOpt,
    WeightsOpt,
    arch_of,
    model_ref,
    split_model,
)


def models_cmd(
    card: Annotated[
        str | None,
        typer.Option("--card", metavar="NAME", help="Print the model card of a bundled model "
                     "(sononet16) or a run folder instead of the list."),
    ] = None,
) -> None:
    """List the registered architectures; `ready` ones classify real scans out of the box
    (bundled weights: `fetalplanes predict sononet16 SCANS`)."""
    from fetalplanes.models import list_models

    if card is not None:
        typer.echo(_model_card_text(card), nl=False)
        return
    typer.echo(f"{'name':20s} {'input':9s} {'weights':8s} description")
    for spec in list_models():
        pp = spec.preprocess
        ready = "ready" if spec.bundled_weights() else "-"
        typer.echo(f"{spec.name:20s} {pp.size[0]}x{pp.size[1]:<5d} {ready:8s} {spec.description}")
    typer.echo("(also any timm architecture name, trained with `fetalplanes train`)")


def _model_card_text(name: str) -> str:
    """The card of a bundled model, or a run folder's MODEL_CARD.md (built from its sidecar
    when the run predates model cards)."""
    from fetalplanes.models.card import load_card
    from fetalplanes.models.model_card import (
        BUNDLED_CARDS,
        MODEL_CARD_MD,
        bundled_card,
        render_markdown,
        run_card,
    )

    shipped = bundled_card(name)
    if shipped is not None:
        return render_markdown(shipped)
    path = Path(name)
    if path.is_dir():
        if (path / MODEL_CARD_MD).is_file():
            return (path / MODEL_CARD_MD).read_text(encoding="utf-8")
        return render_markdown(run_card(load_card(path), path.name))
    fail(f"{name}: no model card (bundled: {', '.join(BUNDLED_CARDS)}; or a run folder)")
    return ""




def download(
    name: Annotated[str, typer.Argument(help="What to fetch: sononet16, fpdb or african.")],
    to: Annotated[Path, typer.Option("--to", help="Destination folder.")] = Path("."),
    url: Annotated[
        str | None, typer.Option(help="Mirror URL (size and checksum still enforced).")
    ] = None,
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Pin the file's sha256 (printed on download).")
    ] = None,
    keep_archive: Annotated[
        bool, typer.Option("--keep-archive", help="Keep a data set's archive after extraction.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Download published weights or a public data set (needs internet): resumable, checked
    against the published size and checksum, extracted safely, never overwriting."""
    from fetalplanes.tools.download import ASSETS, DATASETS, next_command
    from fetalplanes.tools.download import download as download_fn

    path = download_fn(name, to, url=url, sha256=sha256, keep_archive=keep_archive,
                       progress=not quiet)
    if name in ASSETS:
        typer.echo(f"{path} (sha256 verified; license: {ASSETS[name].license})")
        return
    typer.echo(f"{path} ({DATASETS[name].license}); next: {next_command(path)}")


def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path(
        "fetalplanes-demo"
    ),
    per_class: Annotated[
        int, typer.Option("--per-class", help="Synthetic images per plane.")
    ] = 100,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 7,
    arch: Annotated[
        str | None, typer.Option("--arch", help="Architecture (default efficientnet_lite0).")
    ] = None,
    model: ArchAliasOpt = None,
    img_size: Annotated[int, typer.Option("--img-size", help="Input size (small = fast on CPU).")
                        ] = 128,
) -> None:
    """synth -> train -> evaluate -> predict -> sort on SYNTHETIC data, in minutes on a CPU."""
    from fetalplanes.tools.demo import run_demo

    run_demo(out, per_class=per_class, epochs=epochs,
             model=arch_of(arch, model, "efficientnet_lite0"), img_size=img_size)


class ExportFormat(str, Enum):
    onnx = "onnx"


class BenchDevice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def export_cmd(
    args: Annotated[
        list[str] | None, typer.Argument(help=f"MODEL (with --model: nothing). {MODEL_HELP}")
    ] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    fmt: Annotated[
        ExportFormat, typer.Option("--format", help="Export format.")
    ] = ExportFormat.onnx,
    opset: Annotated[int, typer.Option(min=7, help="ONNX opset version.")] = 17,
    out: Annotated[
        Path | None,
        typer.Option(help="Output file (default RUN/model.onnx and RUN/model.int8.onnx for a "
                          "run, ./NAME.onnx and ./NAME.int8.onnx for a pretrained name)."),
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
        typer.Option(help="Folder of typical scans for --int8 of a run (default: its data)."),
    ] = None,
) -> None:
    """Export a model to ONNX (normalisation inside; input N x 1 x H x W pixels 0-255): a run
    folder or a pretrained name such as sononet16."""
    from fetalplanes.tools.export import export_model

    first, _ = split_model(list(args or []), model, 0, "fetalplanes export MODEL")
    spec = model_ref(first, weights)
    for path in export_model(spec, out, opset, int8, calibration):
        kind = "int8 convolutions; use it with --backend onnx-int8" if ".int8." in path.name \
            else f"opset {opset}, dynamic batch; use it with --backend onnx"
        typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {kind})")


def bench_cmd(
    device: Annotated[BenchDevice, typer.Option(help="cpu or cuda.")] = BenchDevice.cpu,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the results to this JSON file.")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Few images and steps: about a minute on 2 cores "
                                           "instead of a quarter of an hour.")
    ] = False,
    compile_: Annotated[
        bool, typer.Option("--compile", help="torch.compile the training model.")
    ] = False,
    arch: ArchOpt = None,
    model: ArchAliasOpt = None,
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
    only: Annotated[
        str | None,
        typer.Option(
            "--only",
            help="zero-shot: only the bundled SonoNet-16 rows (end to end per backend, one "
            "image, peak memory, and a plain batch-1 loop as the baseline). network: the "
            "DICOM node (storescu -> listen over loopback: frames/s, memory, SR latency; "
            "needs dcmtk). live: the WebSocket /api/v1/live of `serve` (800x600 JPEG frames "
            "at 15 and 60 frames/s and closed loop: latency, answers/s, drops, memory).",
        ),
    ] = None,
    seconds: Annotated[
        float | None,
        typer.Option("--seconds", min=1, help="--only live: length of the 15 frames/s "
                                              "session (default 60, quick 10)."),
    ] = None,
    frames: Annotated[
        Path | None,
        typer.Option("--frames", help="--only live: images to send (real scans, resized to "
                                      "800x600; default: rendered phantoms)."),
    ] = None,
    live_backend: Annotated[
        list[str] | None,
        typer.Option("--backend", help="--only live: onnx and/or onnx-int8 (repeatable; "
                                       "default both)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Measure decode, inference (torch, onnx), latency, training and peak memory here; then
    the bundled SonoNet-16 end to end against a plain loop (`--only zero-shot` for just that)."""
    from fetalplanes.tools.bench import BenchOptions, print_report, run_bench, write_json
    from fetalplanes.tools.zero_shot_bench import run_zero_shot, zero_shot_rows

    opts = BenchOptions(
        device=device.value,
        quick=quick,
        compile=compile_,
        model=arch_of(arch, model, "efficientnet_lite0"),
        img_size=img_size,
        images=images,
        rss_images=rss_images,
        workers=workers,
    )
    if only not in (None, "zero-shot", "network", "live"):
        fail(f"--only {only}: choose zero-shot, network or live")
    if only != "live" and (seconds or frames or live_backend):
        fail("--seconds, --frames and --backend go with --only live")
    if any(b not in ("onnx", "onnx-int8") for b in live_backend or ()):
        fail("--backend: choose onnx or onnx-int8 (the bundled SonoNet-16's ONNX files)")
    started = time.perf_counter()
    if only == "zero-shot":
        report = run_zero_shot(opts, progress=not quiet)
    elif only == "network":
        from fetalplanes.tools.network_bench import run_network

        report = run_network(opts, progress=not quiet)
    elif only == "live":
        from fetalplanes.tools.live_bench import BACKENDS, run_live_bench

        report = run_live_bench(opts, progress=not quiet, seconds=seconds, frames_dir=frames,
                                backends=tuple(live_backend or BACKENDS))
    else:
        report = run_bench(opts, progress=not quiet)
        if device is BenchDevice.cpu:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="fetalplanes-bench-") as tmp:
                n = opts.images or (16 if quick else 1310)
                report.rows += zero_shot_rows(Path(tmp), n, progress=not quiet)
    report.seconds = time.perf_counter() - started  # every part, as "finished in" says
    print_report(report)
    if json_file is not None:
        write_json(report, json_file)
        typer.echo(f"results written to {json_file}")


def cache_cmd(
    data: Annotated[Path, typer.Argument(help="Data folder (any layout `train` accepts).")],
    labels: LabelsOpt = None,
    preset: PresetOpt = "seed4",
    arch: Annotated[
        str | None, typer.Option("--arch", help="Architecture whose preprocessing to cache "
                                                "(default efficientnet_lite0).")
    ] = None,
    model: ArchAliasOpt = None,
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
    from fetalplanes.console import report_failures
    from fetalplanes.data.cache import ArrayCache, default_cache_dir, load_arrays
    from fetalplanes.data.datasets import load_dataset
    from fetalplanes.engine.train import TrainConfig, resolve_preprocess

    model = arch_of(arch, model, "efficientnet_lite0")
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
