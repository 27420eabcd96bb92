"""What every command shares: one-line errors, option types, building a predictor."""

from __future__ import annotations

import functools
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from fetalplanes.errors import FetalPlanesError


class Fmt(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"




def fail(msg: str, code: int = 2) -> None:
    """Print one red line on stderr and exit (2 = bad input, 1 = nothing succeeded)."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def guard(fn: Any) -> Any:
    """Turn our errors into one-line messages with exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FetalPlanesError as exc:
            fail(str(exc))
        except FileExistsError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


PresetOpt = Annotated[str, typer.Option("--preset", help="Label preset: seed4, fpdb6 or brain3.")]
LabelsOpt = Annotated[
    Path | None, typer.Option("--labels", help="Label CSV when not auto-detected in DATA.")
]



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


ModelOpt = Annotated[
    str | None,
    typer.Option(help="Zero-shot with published weights instead of a RUN (sononet16/32/64)."),
]
WeightsOpt = Annotated[Path | None, typer.Option(help="Weights file for --model.")]


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
MinConfidenceOpt = Annotated[
    float,
    typer.Option("--min-confidence", help="Flag predictions below this as uncertain."),
]


def build_predictor(
    run: Path | None,
    model: str | None,
    weights: Path | None,
    preset: str,
    backend: str,
    tta: bool,
    min_confidence: float,
    ensemble: str | None = None,
) -> Any:
    """The predictor a command asked for; exports ONNX first when the backend needs it
    (inference itself never writes into a run folder)."""
    from fetalplanes.inference.predictor import Predictor

    if ensemble:
        if model is not None or backend != "torch":
            fail("--ensemble combines run folders on the torch backend (no --model/--backend)")
        extra = [Path(p.strip()) for p in ensemble.split(",") if p.strip()]
        return Predictor.from_ensemble([run, *extra], tta=tta, min_confidence=min_confidence)
    if model is not None:
        if weights is None:
            fail(f"--model {model} needs --weights PATH (published weights file)")
        return Predictor.from_pretrained(
            model, weights, preset, tta=tta, min_confidence=min_confidence
        )
    assert run is not None
    if backend in ("onnx", "onnx-int8"):
        from fetalplanes.inference.ensemble import is_ensemble_dir
        from fetalplanes.tools.export import ensure_onnx

        if not is_ensemble_dir(run):
            ensure_onnx(run, int8=backend == "onnx-int8")
    return Predictor.from_run(run, backend=backend, tta=tta, min_confidence=min_confidence)
