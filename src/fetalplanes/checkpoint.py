"""Checkpoints: safetensors weights plus a JSON sidecar that says how to use them.

The sidecar is the single source of truth for class names and their order,
preprocessing, architecture, calibration, rejection threshold, the split's patient
ids and metrics, so no inference path can ever permute class names (the origin
notebook's bug). Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fetalplanes.errors import CheckpointError
from fetalplanes.transforms import Preprocess

WEIGHTS = "weights.safetensors"
SIDECAR = "model.json"
FORMAT_VERSION = 1


@dataclass
class ModelCard:
    """Everything needed to rebuild and use a trained model (the JSON sidecar)."""

    architecture: str
    classes: list[str]
    preprocess: Preprocess
    preset: str = "seed4"
    temperature: float = 1.0
    rejection: dict[str, Any] = field(default_factory=dict)
    split: dict[str, list[str]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    version: str = ""

    def to_dict(self) -> dict[str, Any]:
        from fetalplanes import __version__

        return {
            "format_version": FORMAT_VERSION,
            "fetalplanes_version": self.version or __version__,
            "created": self.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "architecture": {
                "name": self.architecture,
                "num_classes": len(self.classes),
                "in_chans": 1,
            },
            "classes": list(self.classes),
            "preset": self.preset,
            "preprocess": self.preprocess.to_dict(),
            "calibration": {"method": "temperature", "temperature": self.temperature},
            "rejection": self.rejection,
            "split": self.split,
            "data": self.data,
            "metrics": self.metrics,
            "training": self.training,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model.json") -> ModelCard:
        try:
            return cls(
                architecture=d["architecture"]["name"],
                classes=list(d["classes"]),
                preprocess=Preprocess.from_dict(d["preprocess"]),
                preset=d.get("preset", ""),
                temperature=float(d.get("calibration", {}).get("temperature", 1.0)),
                rejection=d.get("rejection", {}) or {},
                split=d.get("split", {}) or {},
                data=d.get("data", {}) or {},
                metrics=d.get("metrics", {}) or {},
                training=d.get("training", {}) or {},
                created=d.get("created", ""),
                version=d.get("fetalplanes_version", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{source}: incomplete model sidecar ({exc!r} missing or bad)"
            ) from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_card(run: Path, card: ModelCard) -> None:
    atomic_write_text(Path(run) / SIDECAR, json.dumps(card.to_dict(), indent=2) + "\n")


def save_checkpoint(run: Path, model: nn.Module, card: ModelCard) -> None:
    """Write weights then sidecar, each atomically."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    state = _unshare(state)
    tmp = run / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"architecture": card.architecture})
    os.replace(tmp, run / WEIGHTS)
    save_card(run, card)


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory; clone duplicates."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_card(run: str | Path) -> ModelCard:
    path = _run_dir(run) / SIDECAR
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; is {run} a fetalplanes run folder?") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return ModelCard.from_dict(d, str(path))


def _run_dir(run: str | Path) -> Path:
    p = Path(run)
    if p.is_file() and p.name in (WEIGHTS, SIDECAR):
        return p.parent
    if not p.exists():
        raise CheckpointError(f"{p}: run folder not found")
    return p


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or a .pth/.pt with weights_only (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot load weights ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def load_checkpoint(run: str | Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild the model of a run folder in eval mode on CPU."""
    from fetalplanes.models import create_model

    run_dir = _run_dir(run)
    card = load_card(run_dir)
    model = create_model(
        card.architecture, len(card.classes), pretrained=False, input_size=card.preprocess.size
    )
    wpath = run_dir / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(
            f"{wpath}: weights missing (training interrupted before the first epoch finished?)"
        )
    try:
        model.load_state_dict(load_file(str(wpath)))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{wpath}: does not match {card.architecture} ({first})") from None
    return model.eval(), card
