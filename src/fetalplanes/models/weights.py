"""Reading weight files safely: safetensors, or .pth/.pt with weights_only (never pickles)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from fetalplanes.errors import CheckpointError


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or a .pth/.pt with weights_only (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise CheckpointError(f"{path}: weight file not readable (permission denied)") from None
    except Exception as exc:  # corrupt, truncated, a refused pickle: the first line only
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: not a weights file fetalplanes can read ({type(exc).__name__}: {first})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj
