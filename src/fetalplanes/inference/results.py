"""One result schema: the `Prediction` and its only serialisers (JSON dict and CSV row).

Every surface uses these: `predict --format json|csv`, the table, the sort journal, the
server's JSON and CSV download, evaluate's predictions.csv and scan's timeline. Column
names are unique: class probabilities are prefixed `p_` so a class may be called
anything (even `not_target`) without clashing with the flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NOT_TARGET = "not_target"
UNCERTAIN = "uncertain"
#: Columns before the per-class probabilities, in order.
HEAD_COLUMNS = (
    "path",
    "frame",
    "label",
    "confidence",
    "uncertain",
    "not_target",
    "rejection_score",
    "model_label",
    "model_confidence",
    "pixel_spacing_mm",
)
TAIL_COLUMNS = ("error",)
PROB_PREFIX = "p_"
#: Spreadsheet formula triggers: a cell starting with one is prefixed with ' on CSV export.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class Prediction:
    """One item's result. `label` may be `not_target`; `probs` are by class name.

    `path` names the item: a file, or `file.dcm#frame=N` for a frame of a cine loop.
    `rejection_score` is the in-distribution score the rejection rule thresholded
    (higher = more like the training planes). `model_label`/`model_confidence` are a
    zero-shot model's own class before folding. `outputs` keeps the raw model outputs
    for evaluation; it is never serialised.
    """

    path: str
    label: str
    confidence: float
    probs: dict[str, float]
    not_target: bool = False
    uncertain: bool = False
    rejection_score: float | None = None
    model_label: str | None = None
    model_confidence: float | None = None
    frame: int | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    error: str | None = None
    outputs: Any = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def destination(self) -> str:
        """Folder a sort puts it in: the plane, `uncertain` or `not_target`."""
        if self.not_target:
            return NOT_TARGET
        return UNCERTAIN if self.uncertain else self.label

    def to_dict(self) -> dict[str, Any]:
        """JSON view (probabilities nested by class name; rounded to 6 decimals)."""
        d: dict[str, Any] = {"path": self.path}
        if self.frame is not None:
            d["frame"] = self.frame
        if self.error:
            d["error"] = self.error
            return d
        d |= {
            "label": self.label,
            "confidence": _round(self.confidence),
            "uncertain": self.uncertain,
            "not_target": self.not_target,
            "rejection_score": _round(self.rejection_score),
            "probabilities": {k: _round(v) for k, v in self.probs.items()},
        }
        if self.model_label is not None:
            d["model_label"] = self.model_label
            d["model_confidence"] = _round(self.model_confidence)
        if self.pixel_spacing_mm is not None:
            d["pixel_spacing_mm"] = list(self.pixel_spacing_mm)
        return d

    def to_row(self, classes: Sequence[str]) -> dict[str, str]:
        """CSV view: one string per column of `columns(classes)`, formulas neutralised."""
        ok = self.ok
        row = {
            "path": safe_cell(self.path),
            "frame": "" if self.frame is None else str(self.frame),
            "label": safe_cell(self.label) if ok else "",
            "confidence": f"{self.confidence:.6f}" if ok else "",
            "uncertain": str(int(self.uncertain)) if ok else "",
            "not_target": str(int(self.not_target)) if ok else "",
            "rejection_score": _fmt(self.rejection_score) if ok else "",
            "model_label": safe_cell(self.model_label or ""),
            "model_confidence": _fmt(self.model_confidence),
            "pixel_spacing_mm": _spacing(self.pixel_spacing_mm),
        }
        for c in classes:
            row[PROB_PREFIX + c] = f"{self.probs.get(c, 0.0):.6f}" if ok else ""
        row["error"] = safe_cell(self.error or "")
        return row


def columns(classes: Sequence[str]) -> list[str]:
    """The CSV header for these output classes (unique names)."""
    return [*HEAD_COLUMNS, *(PROB_PREFIX + c for c in classes), *TAIL_COLUMNS]


def failed(path: str, message: str, frame: int | None = None) -> Prediction:
    """The result of an item that could not be read: one-line `error`, nothing else."""
    return Prediction(path, "", 0.0, {}, frame=frame, error=message)


def safe_cell(text: str) -> str:
    """Neutralise spreadsheet formulas (CSV injection) in a text cell."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _round(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def _spacing(s: tuple[float, float] | None) -> str:
    return "" if s is None else f"{s[0]:.6g}x{s[1]:.6g}"
