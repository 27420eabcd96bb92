"""The options commands share, declared once: their names, help texts and checks.

Every command that takes a model takes it the same way (`MODEL` first, or `--model`), with
the same `--weights`, `--preset`, `--backend`, `--tta`, `--ensemble` and
`--min-confidence`; `model_ref` turns them into the one `ModelRef`, and `load_model`
builds the predictor. Where an option names an architecture to train it is `--arch`.
Values are checked by Typer before a command runs (ranges, finite numbers), so a bad value
is one line and exit 2, never a traceback or a silently empty run.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from fetalplanes.inference.model_ref import GRAMMAR, ModelRef
from fetalplanes.inference.predictor import DEFAULT_MIN_CONFIDENCE


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number (got {value})")
    return value


def _probability(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise typer.BadParameter(f"must be between 0 and 1 (got {value})")
    return value


def _positive(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a number above 0 (got {value})")
    return value


class Fmt(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class BackendChoice(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"
    onnx_int8 = "onnx-int8"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


#: The model, as the first argument of predict, sort, scan, explain, evaluate, serve, export.
MODEL_HELP = f"MODEL: {GRAMMAR}."

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help=f"The model, instead of the first argument: {GRAMMAR}."),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option("--weights", help="Weights file for a pretrained name (overrides bundled)."),
]
PresetOpt = Annotated[
    str,
    typer.Option("--preset", help="Label preset: seed4, fpdb6, brain3, or views13 (the 13 "
                                  "standard views of the bundled SonoNet-16); for a pretrained "
                                  "model, the planes its classes are folded into."),
]
BackendOpt = Annotated[
    BackendChoice,
    typer.Option("--backend", help="auto (ONNX Runtime for a bundled model, torch for runs), "
                                   "torch, onnx or onnx-int8 (ONNX Runtime on the CPU)."),
]
TtaOpt = Annotated[bool, typer.Option("--tta", help="Test-time augmentation (flip average).")]
EnsembleOpt = Annotated[
    str | None,
    typer.Option("--ensemble", help="More runs (comma-separated run folders or folders of "
                                    "runs) averaged with MODEL; a folder of runs given as "
                                    "MODEL is an ensemble by itself."),
]
MinConfidenceOpt = Annotated[
    float,
    typer.Option("--min-confidence", callback=_probability,
                 help="Below this calibrated confidence a result is flagged uncertain (0-1)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=0, help="Decode worker processes (0: in this process; "
                                          "default: chosen from the number of images)."),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per model call.")]
FormatOpt = Annotated[Fmt, typer.Option("--format", help="table, json or csv.")]
EngineOpt = Annotated[
    Engine,
    typer.Option("--engine", help="local (this machine) or ray (a Ray cluster: decode tasks "
                                  "and model actors on every node; pip install "
                                  "'fetalplanes[ray]'; docs/scale.md)."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster for --engine ray: auto (the cluster this "
                                   "machine joined) or HOST:6379 (`ray start --head`); "
                                   "default a private local Ray instance."),
]
LabelsOpt = Annotated[
    Path | None, typer.Option("--labels", help="Label CSV when not auto-detected in DATA.")
]
EveryOpt = Annotated[int, typer.Option("--every", min=1, help="Classify every K-th frame.")]
FpsOpt = Annotated[
    float | None,
    typer.Option("--fps", callback=_positive, help="Frame rate of a folder of frames (default "
                                                   "25), or of a file that declares none."),
]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture (see `fetalplanes models`; any timm name)."),
]
#: `--model` meant the architecture before 0.3; kept one version, hidden, with a warning.
ArchAliasOpt = Annotated[
    str | None, typer.Option("--model", hidden=True, help="Deprecated: use --arch.")
]


def out_option(default_help: str) -> Any:
    """`--out` with what the command writes by default."""
    return typer.Option("--out", help=f"Output folder (default {default_help}).")


def arch_of(arch: str | None, alias: str | None, default: str | None = None) -> str | None:
    """The architecture from `--arch`, or the deprecated `--model` (with a warning)."""
    if alias is not None:
        typer.secho("warning: --model for an architecture is deprecated; use --arch "
                    f"{alias}", fg=typer.colors.YELLOW, err=True)
        if arch is not None and arch != alias:
            raise typer.BadParameter("give --arch only (--model is its deprecated alias)")
    return arch or alias or default


def split_model(args: list[str], model: str | None, rest: int | None,
                usage: str) -> tuple[str, list[str]]:
    """(MODEL, the other arguments) from `MODEL ARGS...` or `--model MODEL ARGS...`;
    `rest` is how many other arguments the command takes (None: one or more)."""
    from fetalplanes.cli.common import fail

    first, others = (model, list(args)) if model is not None else (
        (args[0], list(args[1:])) if args else (None, []))
    if first is None or (rest is not None and len(others) != rest) or \
            (rest is None and not others):
        fail(f"usage: {usage} (MODEL: {GRAMMAR})")
    return str(first), others


def model_ref(
    model: str,
    weights: Path | None = None,
    preset: str = "seed4",
    backend: BackendChoice | str = BackendChoice.auto,
    tta: bool = False,
    ensemble: str | None = None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> ModelRef:
    """The `ModelRef` of a command's model options."""
    extra = tuple(p.strip() for p in (ensemble or "").split(",") if p.strip())
    value = backend.value if isinstance(backend, BackendChoice) else str(backend)
    return ModelRef(model, str(weights) if weights else None, preset, value, tta, extra,
                     min_confidence=min_confidence)


def load_model(spec: ModelRef) -> Any:
    """The predictor for a spec. A run used with an ONNX backend is exported first
    (`tools.export.ensure_onnx`: inference itself never writes a run folder)."""
    if spec.kind == "run" and spec.backend in ("onnx", "onnx-int8"):
        from fetalplanes.tools.export import ensure_onnx

        ensure_onnx(Path(spec.model), int8=spec.backend == "onnx-int8")
    return spec.load()
