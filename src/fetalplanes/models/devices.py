"""Choosing the torch device: one rule for training, inference and benchmarks."""

from __future__ import annotations

import torch

from fetalplanes.errors import FetalPlanesError


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes a CUDA GPU when there is one; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FetalPlanesError("--device cuda asked for, but no CUDA GPU is available")
    return dev
