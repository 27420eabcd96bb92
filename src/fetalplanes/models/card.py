"""The run folder's JSON sidecar (`model.json`): the single source of truth for a model.

It holds class names and their order, preprocessing, architecture, calibration,
rejection rule, the split's patient ids and metrics, so no inference path can ever
permute class names (the origin notebook's bug). Torch-free, so ONNX-only inference can
read it. Weights live beside it in `weights.safetensors` (`models.checkpoint`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fetalplanes._version import __version__
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.errors import CheckpointError

WEIGHTS = "weights.safetensors"
BANK_FILE = "feature_bank.safetensors"
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


def umask_mode(path: str | Path) -> None:
    """Give a temp file (mkstemp makes them 0600) the mode a plain open() would, so run
    files on a shared server are readable by colleagues as the umask allows."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_card(run: Path, card: ModelCard) -> None:
    atomic_write_text(Path(run) / SIDECAR, json.dumps(card.to_dict(), indent=2) + "\n")


def load_card(run: str | Path) -> ModelCard:
    path = run_folder(run) / SIDECAR
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; is {run} a fetalplanes run folder?") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return ModelCard.from_dict(d, str(path))


def run_folder(run: str | Path) -> Path:
    p = Path(run)
    if p.is_file() and p.name in (WEIGHTS, SIDECAR):
        return p.parent
    if not p.exists():
        raise CheckpointError(f"{p}: run folder not found")
    return p


