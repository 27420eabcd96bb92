"""One result schema: the `Prediction`, declared once, and its only serialisers.

Every field of a result is declared here, once, as a field of `Prediction` whose metadata
says what it means and how it is written (JSON key, CSV column). Everything else derives
from that declaration: `to_dict` (JSON: predict, the API, the timeline), `to_row` and
`columns` (CSV: predict, the sort journal, evaluate's predictions.csv, scan's timeline,
the server's download), and the server's response models (`serving.schemas`), which are
built from `result_fields()`. tests/test_results.py compares all of them.

Column names are unique: class probabilities are prefixed `p_` so a class may be called
anything (even `not_target`) without clashing with the flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NOT_TARGET = "not_target"
UNCERTAIN = "uncertain"
PROB_PREFIX = "p_"
#: Spreadsheet formula triggers: a cell starting with one is prefixed with ' on CSV export.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _field(doc: str, default: Any = None, *, csv: bool = True, json: str | None = None,
           always: bool = False, ok_only: bool = True, factory: Any = None) -> Any:
    """A `Prediction` field with its meaning and serialisation (see `ResultField`)."""
    meta = {"doc": doc, "csv": csv, "json": json, "always": always, "ok_only": ok_only}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Prediction:
    """One item's result. `label` may be `not_target`; `probs` are by class name."""

    path: str = _field("Name of the item: a file, `file.dcm#frame=N` for a frame of a cine, "
                       "video or upload, or an uploaded file's base name.", "", always=True,
                       ok_only=False)
    frame: int | None = _field("Frame index within a multi-frame file, video or stream.",
                               ok_only=False)
    time_s: float | None = _field("Time of the frame in its recording, in seconds.",
                                  ok_only=False)
    label: str = _field("Predicted plane, or `not_target` when the image is rejected.", "",
                        always=True)
    confidence: float = _field("Calibrated probability of the top class.", 0.0, always=True)
    uncertain: bool = _field("Confidence is below the minimum confidence.", False,
                             always=True)
    not_target: bool = _field("The rejection rule says this is not one of the target planes.",
                              False, always=True)
    rejection_score: float | None = _field(
        "In-distribution score the not-target rule thresholds (higher = more like the "
        "training planes).", always=True)
    model_label: str | None = _field("Zero-shot models only: the network's own (unfolded) "
                                     "class.", ok_only=False)
    model_confidence: float | None = _field("Zero-shot models only: probability of "
                                            "`model_label`.", ok_only=False)
    pixel_spacing_mm: tuple[float, float] | None = _field(
        "(row, column) pixel size in mm, when the file declares it.", ok_only=False)
    probs: dict[str, float] = _field("Calibrated probability of every class, by class name "
                                     "(CSV: one `p_<class>` column each).", csv=False,
                                     json="probabilities", always=True,
                                     factory=dict)
    notes: list[str] = _field("Warnings about this item (e.g. a declared region that could "
                              "not be used).", csv=False, factory=list,
                              ok_only=False)
    error: str | None = _field("Why the item could not be classified (not an image, "
                               "truncated ...).", ok_only=False)
    outputs: Any = field(default=None, repr=False, compare=False)  # raw outputs, never written

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
        """JSON view: every declared field under its JSON key, numbers rounded to 6
        decimals; optional fields only when set; an error result carries only the item's
        identity and `error`."""
        d: dict[str, Any] = {}
        for f in result_fields():
            if self.error and f.ok_only:
                continue
            value = getattr(self, f.name)
            if not f.always and (value is None or value == []):
                continue
            d[f.key] = _json(value)
        return d

    def to_row(self, classes: Sequence[str]) -> dict[str, str]:
        """CSV view: one string per column of `columns(classes)`, formulas neutralised."""
        ok = self.ok
        row = {}
        for f in result_fields():
            if f.csv:
                row[f.name] = _cell(getattr(self, f.name)) if ok or not f.ok_only else ""
        for c in classes:
            row[PROB_PREFIX + c] = f"{self.probs.get(c, 0.0):.6f}" if ok else ""
        row["error"] = safe_cell(self.error or "")
        return row


@dataclass(frozen=True)
class ResultField:
    """One declared field of a result: its attribute, JSON key, type, meaning and whether
    it is a CSV column, always present in JSON, or only present for readable items."""

    name: str
    key: str
    type: Any
    doc: str
    csv: bool
    always: bool
    ok_only: bool


def result_fields() -> list[ResultField]:
    """The fields of `Prediction` in declaration order (what every serialiser derives from)."""
    hints = _hints()
    out = []
    for f in dataclasses.fields(Prediction):
        if "doc" not in f.metadata:
            continue
        m = f.metadata
        out.append(ResultField(f.name, m["json"] or f.name, hints[f.name], m["doc"],
                               m["csv"], m["always"], m["ok_only"]))
    return out


def _hints() -> dict[str, Any]:
    import typing

    return typing.get_type_hints(Prediction)


#: Columns before the per-class probabilities, in order (from the declaration).
HEAD_COLUMNS = tuple(f.name for f in result_fields() if f.csv and f.name != "error")
TAIL_COLUMNS = ("error",)


def columns(classes: Sequence[str]) -> list[str]:
    """The CSV header for these output classes (unique names)."""
    return [*HEAD_COLUMNS, *(PROB_PREFIX + c for c in classes), *TAIL_COLUMNS]


def failed(path: str, message: str, frame: int | None = None) -> Prediction:
    """The result of an item that could not be read: one-line `error`, nothing else."""
    return Prediction(path, frame=frame, error=message)


def safe_cell(text: str) -> str:
    """Neutralise spreadsheet formulas (CSV injection) in a text cell."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _json(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return _round(value)
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, tuple):  # pixel spacing
        return "x".join(f"{v:.6g}" for v in value)
    if isinstance(value, str):
        return safe_cell(value)
    return str(value)


def _round(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)
