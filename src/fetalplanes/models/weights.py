"""Reading weight files safely: safetensors, or .pth/.pt with weights_only (never pickles).

Every failure is one CheckpointError line naming the file: missing, unreadable, not a
regular file, truncated or garbage safetensors, a pickle holding more than tensors, or
weights holding NaN or infinite values (which would classify every image with NaN
probabilities). Files are opened through `data.images.open_file`, so a FIFO or device
never reaches a loader, even one swapped in after the first check.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fetalplanes.data.images import fd_path, open_file, os_error_text
from fetalplanes.errors import CheckpointError

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def check_readable(path: str | Path, what: str = "weight file") -> Path:
    """`path` when it is a regular file this process can open; else one CheckpointError line.

    Why: `Path.is_file()` is False for a file under an unsearchable folder, which read as
    'not found'; and a FIFO or device must never reach a loader (it would block or never end).
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise CheckpointError(f"{path}: is a folder, not a {what}")
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{path}: not a regular file, so not a {what}")
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: {what} not readable ({os_error_text(exc)})") from None
    return path


def _open(path: Path, what: str) -> int:
    """A guarded descriptor of `path` (see `data.images.open_file`), errors in one line."""
    try:
        return open_file(path, os.O_RDONLY, CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: {what} not readable ({os_error_text(exc)})") from None


def check_finite(
    state: dict[str, torch.Tensor], path: str | Path, what: str = "weight file"
) -> None:
    """Refuse tensors holding NaN or infinite values (a diverged training, a damaged file):
    a model built from them classifies every image with NaN probabilities."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{path}: the {what} holds NaN or infinite values (first in {key}); the "
                "training diverged or the file is damaged"
            )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def load_safetensors(path: str | Path, what: str = "weight file") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file; truncated, empty, garbage or huge-header files and
    unreadable ones are one CheckpointError line naming the file."""
    path = check_readable(path, what)
    fd = _open(path, what)
    try:
        return load_file(fd_path(fd, path))
    except SafetensorError as exc:
        reason = _first_line(exc).removeprefix("Error while deserializing header: ")
        raise CheckpointError(f"{path}: not a readable safetensors {what} ({reason})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: {what} not readable ({os_error_text(exc)})") from None
    except Exception as exc:  # e.g. a dtype this torch cannot hold
        reason = _first_line(exc)
        raise CheckpointError(f"{path}: not a readable safetensors {what} ({reason})") from None
    finally:
        os.close(fd)


def _refusal(path: Path, exc: Exception) -> CheckpointError:
    """One line for a .pth torch refuses: the pickled global it holds, or why it cannot be
    read, without PyTorch's advice to turn the safety off."""
    text = str(exc)
    found = _GLOBAL.search(text)
    if found:
        return CheckpointError(
            f"{path}: refused: the file holds a pickled {found.group(1)} object, not only "
            "tensors (fetalplanes never unpickles code; save a plain state dict or safetensors)"
        )
    after = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler" in text else ""
    reason = next((line.strip() for line in after.splitlines() if line.strip()), "")
    return CheckpointError(
        f"{path}: not a weights file fetalplanes can read (corrupt or not a PyTorch file"
        + (f": {reason[:120]})" if reason else ")")
    )


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or a .pth/.pt with weights_only (no pickles)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
        check_finite(state, path)
        return state
    check_readable(path)
    try:
        with os.fdopen(_open(path, "weight file"), "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: weight file not readable ({os_error_text(exc)})") from None
    except Exception as exc:  # corrupt, truncated, not a torch file: the first line only
        raise CheckpointError(
            f"{path}: not a weights file fetalplanes can read ({type(exc).__name__}: "
            f"{_first_line(exc)})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    check_finite(obj, path)
    return obj
