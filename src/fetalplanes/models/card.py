"""The run folder's JSON sidecar (`model.json`): the single source of truth for a model.

It holds class names and their order, preprocessing, architecture, calibration,
rejection rule, the split's patient ids and metrics, so no inference path can ever
permute class names (the origin notebook's bug). Torch-free, so ONNX-only inference can
read it. Weights live beside it in `weights.safetensors` (`models.checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from fetalplanes._version import __version__
from fetalplanes.data.images import read_file
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.errors import CheckpointError

WEIGHTS = "weights.safetensors"
BANK_FILE = "feature_bank.safetensors"
SIDECAR = "model.json"
FORMAT_VERSION = 1
#: A sidecar is a few KB; anything far bigger is not one (and is not read into memory).
MAX_SIDECAR_BYTES = 16 * 1024**2


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
        """Build a card from sidecar JSON; CheckpointError lists every problem, one line
        each naming `source`, so a bad edit never runs (temperature 0 gave NaN confidences,
        a size of 100000 ran out of memory, a bank path could point anywhere)."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: not a model sidecar (a JSON object is expected)")
        _check_format(d.get("format_version", FORMAT_VERSION), source)
        problems = sidecar_problems(d)
        if problems:
            lines = [f"{source}: {p}" for p in problems]
            error = CheckpointError("\n".join(lines))
            error.lines = lines  # type: ignore[attr-defined]  # the CLI: one line each
            raise error
        return cls(
            architecture=d["architecture"]["name"],
            classes=list(d["classes"]),
            preprocess=Preprocess.from_dict(d["preprocess"]),
            preset=str(d.get("preset") or ""),
            temperature=float((d.get("calibration") or {}).get("temperature", 1.0)),
            rejection=d.get("rejection", {}) or {},
            split=d.get("split", {}) or {},
            data=d.get("data", {}) or {},
            metrics=d.get("metrics", {}) or {},
            training=d.get("training", {}) or {},
            created=str(d.get("created") or ""),
            version=str(d.get("fetalplanes_version") or ""),
        )


#: Accepted network input sizes per side: below 8 no network sees anything, above 4096 the
#: resized batch alone needs gigabytes.
MIN_SIZE, MAX_SIZE = 8, 4096
NORMALIZE = ("fixed", "per_image")


def _check_format(version: Any, source: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{source}: format_version {version} is not known")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: made by a newer fetalplanes (format_version {version}; this version "
            f"reads {FORMAT_VERSION}); upgrade fetalplanes to use this run"
        )


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (text, bool, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _dict(d: dict[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    value = d.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"'{key}' must be an object")
        return {}
    return value


def sidecar_problems(d: dict[str, Any]) -> list[str]:
    """Every problem of a sidecar dict, one short sentence each (empty: valid)."""
    problems: list[str] = []
    arch = d.get("architecture")
    name = arch.get("name") if isinstance(arch, dict) else None
    if not isinstance(name, str) or not name.strip():
        problems.append("missing architecture name ('architecture': {'name': ...})")
    class_problems = _class_problems(d.get("classes"))
    problems += class_problems
    if isinstance(arch, dict) and not class_problems:
        n = arch.get("num_classes", len(d["classes"]))
        if n != len(d["classes"]):
            problems.append(f"architecture num_classes {n} but {len(d['classes'])} class names")
    if "preprocess" not in d:
        problems.append("missing 'preprocess'")
    else:
        problems += _preprocess_problems(d["preprocess"])
    calibration = _dict(d, "calibration", problems)
    temperature = _number(calibration.get("temperature", 1.0))
    if temperature is None or temperature <= 0:
        problems.append(
            f"temperature must be a finite number > 0 (got {calibration.get('temperature')})"
        )
    problems += _rejection_problems(_dict(d, "rejection", problems))
    for key in ("split", "data", "metrics", "training"):
        _dict(d, key, problems)
    return problems


#: Most classes a sidecar may list, and the longest name: a million names hung the
#: repeat check and would build a classifier head of a million outputs.
MAX_CLASSES, MAX_CLASS_NAME = 1_000, 200


def _class_problems(classes: Any) -> list[str]:
    """Problems of the class list, checked cheapest first (the count before any name)."""
    if not isinstance(classes, list) or not classes:
        return ["'classes' must be a non-empty list of class names"]
    if len(classes) > MAX_CLASSES:
        return [f"{len(classes):,} class names; at most {MAX_CLASSES:,} are allowed"]
    if not all(isinstance(c, str) and c.strip() for c in classes):
        return ["class names must be non-empty text"]
    longest = max(len(c) for c in classes)
    if longest > MAX_CLASS_NAME:
        return [f"a class name of {longest:,} characters; at most {MAX_CLASS_NAME} are allowed"]
    counts = Counter(classes)
    repeated = sorted(c for c, n in counts.items() if n > 1)
    if repeated:
        more = f" and {len(repeated) - 5:,} more" if len(repeated) > 5 else ""
        return [f"class names repeat: {', '.join(repeated[:5])}{more}"]
    return []


def _preprocess_problems(pp: Any) -> list[str]:
    if not isinstance(pp, dict):
        return ["'preprocess' must be an object"]
    problems = []
    size = pp.get("size", [224, 224])
    sides = size if isinstance(size, list) and len(size) == 2 else None
    if sides is None or not all(
        isinstance(v, int) and not isinstance(v, bool) and MIN_SIZE <= v <= MAX_SIZE for v in sides
    ):
        problems.append(
            f"image size must be two whole numbers from {MIN_SIZE} to {MAX_SIZE} "
            f"(height, width); got {size}"
        )
    if pp.get("normalize", "fixed") not in NORMALIZE:
        problems.append(f"normalize must be one of {', '.join(NORMALIZE)}")
    if _number(pp.get("mean", 0.0)) is None:
        problems.append("preprocess mean must be a finite number")
    std = _number(pp.get("std", 1.0))
    if std is None or std <= 0:
        problems.append("preprocess std must be a finite number > 0")
    if not isinstance(pp.get("crop", True), bool):
        problems.append("preprocess crop must be true or false")
    return problems


def _rejection_problems(rejection: dict[str, Any]) -> list[str]:
    problems = []
    if "threshold" in rejection and _number(rejection["threshold"]) is None:
        got = rejection["threshold"]
        problems.append(f"rejection threshold must be a finite number (got {got})")
    if "threshold" in rejection and not isinstance(rejection.get("method"), str):
        problems.append("a rejection threshold needs a rejection method")
    scale = _number(rejection.get("scale", 1.0))
    if scale is None or scale <= 0:
        problems.append("rejection scale must be a finite number > 0")
    k = rejection.get("k", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        problems.append(f"rejection k must be a whole number >= 1 (got {k})")
    if "bank" in rejection:
        why = bank_path_problem(rejection["bank"])
        if why:
            problems.append(why)
    return problems


def bank_path_problem(bank: Any) -> str | None:
    """Why a sidecar's feature-bank path is unsafe (it must name a file inside the run
    folder: relative, no '..'), or None when it is fine."""
    if not isinstance(bank, str) or not bank.strip():
        return "the feature bank path must be a file name inside the run folder"
    pure = PurePosixPath(bank.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(bank).drive or ".." in pure.parts:
        return f"the feature bank path {bank} leaves the run folder (no absolute paths or '..')"
    return None


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
    """The sidecar of a run folder, validated; CheckpointError (naming model.json) else."""
    path = run_folder(run) / SIDECAR
    try:
        text = read_file(path, MAX_SIDECAR_BYTES, CheckpointError).decode("utf-8")
        d = json.loads(text)
    except CheckpointError as exc:
        if not path.exists() and not path.is_symlink():
            raise CheckpointError(
                f"{path}: not found; is {run} a fetalplanes run folder?"
            ) from None
        raise exc from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    return ModelCard.from_dict(d, str(path))


def run_folder(run: str | Path) -> Path:
    p = Path(run)
    if p.is_file() and p.name in (WEIGHTS, SIDECAR):
        return p.parent
    if not p.exists():
        raise CheckpointError(f"{p}: run folder not found")
    return p


