"""The exam checklist: which standard views a study must hold, and which of them it does.

A `Checklist` is data (JSON shipped in `workflows/checklists/`, or a user's file): items a
guideline asks for, each naming the model views that can show it. `evaluate_checklist` is a
pure function from classified frames (`Observation`s: a still image, a frame of a cine or a
video, after smoothing where there is a timeline) to a `ChecklistResult`: per item present or
missing (or not assessed by this model), its best frame, how many frames showed it and when
it was first and last seen.

Why pure: the same evaluation serves `fetalplanes audit`, the HTTP API, the web page and
the DICOM network sessions, whatever classified the frames and however they arrived; it
streams (memory grows with the number of items, not of frames).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fetalplanes.errors import FetalPlanesError

FORMAT = "fetalplanes-checklist/1"
DEFAULT_CHECKLIST = "isuog-mid-trimester"
#: A checklist is a few KB; anything far bigger is not one (and is not read into memory).
MAX_CHECKLIST_BYTES = 1024 * 1024
PRESENT, MISSING, NOT_ASSESSED = "present", "missing", "not_assessed"
NOT_ASSESSED_TEXT = "not assessed by this model"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ChecklistError(FetalPlanesError):
    """A checklist file is missing, not JSON, or not a checklist (one line naming it)."""


@dataclass(frozen=True)
class ChecklistItem:
    """One thing the exam must show. `views`: the model views that show it (any of them
    counts); none: no model view can, so it is listed as not assessed."""

    id: str
    name: str
    section: str = ""
    views: tuple[str, ...] = ()
    required: bool = True
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "section": self.section, "name": self.name,
                             "views": list(self.views), "required": self.required}
        if self.note:
            d["note"] = self.note
        return d


@dataclass(frozen=True)
class Checklist:
    """A named list of items; `preset` is the label preset whose class names `views` use
    (the preset a zero-shot model is folded to for this checklist)."""

    name: str
    title: str
    items: tuple[ChecklistItem, ...]
    preset: str = "seed4"
    source: dict[str, str] = field(default_factory=dict)

    @property
    def views(self) -> list[str]:
        """Every view any item names, in item order, once."""
        return list(dict.fromkeys(v for item in self.items for v in item.views))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "title": self.title,
                "preset": self.preset, "source": dict(self.source),
                "items": [i.to_dict() for i in self.items]}

    @classmethod
    def from_dict(cls, d: Any, where: str = "checklist") -> Checklist:
        """Validate and build; ChecklistError naming `where` and the first problem."""
        if not isinstance(d, dict):
            raise ChecklistError(f"{where}: not a checklist (a JSON object is expected)")
        if d.get("format", FORMAT) != FORMAT:
            raise ChecklistError(f"{where}: format {d.get('format')!r} is not {FORMAT}")
        items = d.get("items")
        if not isinstance(items, list) or not items:
            raise ChecklistError(f"{where}: 'items' must be a non-empty list")
        built = tuple(_item(raw, f"{where}: item {n + 1}") for n, raw in enumerate(items))
        ids = [i.id for i in built]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ChecklistError(f"{where}: item ids repeat: {', '.join(repeated)}")
        name, title = d.get("name", ""), d.get("title", "")
        if not isinstance(name, str) or not _ID.match(name):
            raise ChecklistError(f"{where}: 'name' must be a short id (letters, digits, -._)")
        source = d.get("source", {})
        if not isinstance(source, dict) or not all(isinstance(v, str) for v in source.values()):
            raise ChecklistError(f"{where}: 'source' must be an object of texts")
        preset = d.get("preset", "seed4")
        if not isinstance(preset, str) or not preset:
            raise ChecklistError(f"{where}: 'preset' must be a preset name")
        return cls(name, str(title or name), built, preset, dict(source))


def _item(raw: Any, where: str) -> ChecklistItem:
    if not isinstance(raw, dict):
        raise ChecklistError(f"{where}: must be an object")
    item_id, name = raw.get("id"), raw.get("name")
    if not isinstance(item_id, str) or not _ID.match(item_id):
        raise ChecklistError(f"{where}: 'id' must be a short id (letters, digits, -._)")
    if not isinstance(name, str) or not name.strip():
        raise ChecklistError(f"{where} ({item_id}): 'name' must be non-empty text")
    views = raw.get("views", [])
    if not isinstance(views, list) or not all(isinstance(v, str) and v for v in views):
        raise ChecklistError(f"{where} ({item_id}): 'views' must be a list of view names")
    required = raw.get("required", True)
    if not isinstance(required, bool):
        raise ChecklistError(f"{where} ({item_id}): 'required' must be true or false")
    section, note = raw.get("section", ""), raw.get("note", "")
    if not isinstance(section, str) or not isinstance(note, str):
        raise ChecklistError(f"{where} ({item_id}): 'section' and 'note' must be text")
    return ChecklistItem(item_id, name.strip(), section, tuple(views), required, note)


def builtin_checklists() -> list[str]:
    """Names of the checklists shipped with the package."""
    folder = resources.files("fetalplanes.workflows") / "checklists"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_checklist(spec: str | Path = DEFAULT_CHECKLIST) -> Checklist:
    """A shipped checklist by name, or a JSON file; ChecklistError (one line) otherwise."""
    text_spec = str(spec)
    if text_spec in builtin_checklists():
        ref = resources.files("fetalplanes.workflows") / "checklists" / f"{text_spec}.json"
        return Checklist.from_dict(json.loads(ref.read_text(encoding="utf-8")), text_spec)
    path = Path(spec)
    if not path.suffix.lower() == ".json":
        raise ChecklistError(f"{spec}: unknown checklist; choose "
                             f"{', '.join(builtin_checklists())} or a .json file")
    from fetalplanes.data.images import read_file

    data = read_file(path, MAX_CHECKLIST_BYTES, ChecklistError)
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ChecklistError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    return Checklist.from_dict(d, str(path))


# ------------------------------------------------------------------ evaluation
@dataclass(frozen=True)
class Observation:
    """One classified image or frame, as any classifier or session reports it.

    `label`: the view (after temporal smoothing for a recording), `confidence`: how well this
    frame shows `label` (for a recording, the frame's own calibrated probability of it, which
    picks the best frame). `not_target`/`uncertain`: the label is not accepted.
    `frame_rejected`: the model's per-frame rule rejected this frame although smoothing
    accepted its label (such frames are a view's best frame only when no other shows it).
    `frame`/`time_s` are None for a still image.
    """

    source: str
    label: str
    confidence: float
    frame: int | None = None
    time_s: float | None = None
    not_target: bool = False
    uncertain: bool = False
    frame_rejected: bool = False

    @property
    def accepted(self) -> bool:
        return not self.not_target and not self.uncertain

    def where(self) -> dict[str, Any]:
        """Source, frame and time (the JSON form of 'where in the study')."""
        return {"source": self.source, "frame": self.frame,
                "time_s": None if self.time_s is None else round(self.time_s, 6)}


@dataclass
class ItemResult:
    """What a study shows of one checklist item."""

    item: ChecklistItem
    status: str  # present | missing | not_assessed
    best: Observation | None = None
    frames: int = 0
    uncertain_frames: int = 0
    first: Observation | None = None
    last: Observation | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def present(self) -> bool:
        return self.status == PRESENT

    def to_dict(self) -> dict[str, Any]:
        d = self.item.to_dict() | {"status": self.status, "present": self.present}
        if self.status == NOT_ASSESSED:
            d["assessed"] = NOT_ASSESSED_TEXT
        d["best"] = None if self.best is None else self.best.where() | {
            "view": self.best.label, "confidence": round(self.best.confidence, 6)}
        d["frames"] = self.frames
        d["uncertain_frames"] = self.uncertain_frames
        d["first"] = None if self.first is None else self.first.where()
        d["last"] = None if self.last is None else self.last.where()
        d["sources"] = list(self.sources)
        return d


@dataclass
class ChecklistResult:
    """A checklist filled from a study's observations."""

    checklist: Checklist
    model_views: list[str]
    items: list[ItemResult]
    observations: int = 0

    def of(self, status: str, required_only: bool = True) -> list[ItemResult]:
        return [r for r in self.items
                if r.status == status and (r.item.required or not required_only)]

    @property
    def present(self) -> list[str]:
        return [r.item.name for r in self.of(PRESENT)]

    @property
    def missing(self) -> list[str]:
        return [r.item.name for r in self.of(MISSING)]

    @property
    def not_assessed(self) -> list[str]:
        return [r.item.name for r in self.of(NOT_ASSESSED)]

    @property
    def assessed(self) -> int:
        return len(self.of(PRESENT)) + len(self.of(MISSING))

    @property
    def completeness(self) -> float | None:
        """Present / assessed required items (None when the model assesses none)."""
        return len(self.of(PRESENT)) / self.assessed if self.assessed else None

    def item(self, item_id: str) -> ItemResult:
        for r in self.items:
            if r.item.id == item_id:
                return r
        raise KeyError(item_id)

    def to_dict(self) -> dict[str, Any]:
        c = self.completeness
        return {
            "checklist": {"name": self.checklist.name, "title": self.checklist.title,
                          "preset": self.checklist.preset, "source": self.checklist.source},
            "model_views": list(self.model_views),
            "observations": self.observations,
            "summary": {"assessed": self.assessed, "present": len(self.present),
                        "missing": len(self.missing), "not_assessed": len(self.not_assessed),
                        "complete": self.assessed > 0 and not self.missing,
                        "completeness": None if c is None else round(c, 4)},
            "present": self.present,
            "missing": self.missing,
            "not_assessed": self.not_assessed,
            "items": [r.to_dict() for r in self.items],
        }


def _better(a: Observation, b: Observation | None) -> bool:
    """Is `a` a better best frame than `b`: frames the per-frame rule accepted first, then
    the higher confidence; on a tie the earlier one stays."""
    if b is None:
        return True
    return (not a.frame_rejected, a.confidence) > (not b.frame_rejected, b.confidence)


class ChecklistTally:
    """`evaluate_checklist` one observation at a time (a live session fills its checklist
    as frames are classified): `add` says whether an item's status changed, `result()` is
    the checklist so far. Memory grows with the items, not the observations."""

    def __init__(self, checklist: Checklist, model_views: Sequence[str]):
        known = set(model_views)
        self.checklist = checklist
        self.model_views = list(model_views)
        self.items = [
            ItemResult(item, MISSING if known & set(item.views) else NOT_ASSESSED)
            for item in checklist.items
        ]
        self._by_view: dict[str, list[ItemResult]] = {}
        for r in self.items:
            if r.status == MISSING:
                for view in r.item.views:
                    self._by_view.setdefault(view, []).append(r)
        self.observations = 0

    def add(self, obs: Observation) -> bool:
        """Count one observation (in recording order); True when an item became present."""
        self.observations += 1
        changed = False
        for r in self._by_view.get(obs.label, ()):
            if not obs.accepted:
                r.uncertain_frames += obs.uncertain and not obs.not_target
                continue
            changed |= r.status != PRESENT
            r.status = PRESENT
            r.frames += 1
            r.first = r.first or obs
            r.last = obs
            if obs.source not in r.sources:
                r.sources.append(obs.source)
            if _better(obs, r.best):
                r.best = obs
        return changed

    def result(self) -> ChecklistResult:
        return ChecklistResult(self.checklist, list(self.model_views), self.items,
                               self.observations)


def evaluate_checklist(
    checklist: Checklist, observations: Iterable[Observation], model_views: Sequence[str]
) -> ChecklistResult:
    """Fill `checklist` from `observations` (in recording order) of a model whose output
    views are `model_views`. An item whose views the model cannot output is not assessed; an
    assessed item is present when an accepted observation has one of its views."""
    tally = ChecklistTally(checklist, model_views)
    for obs in observations:
        tally.add(obs)
    return tally.result()


# ------------------------------------------------------------------ fitting a model
def predictor_for_preset(predictor: Any, preset: str) -> Any:
    """The predictor, re-folded to `preset` when it is a zero-shot model (SonoNet-16's 14
    classes fold into any preset); other models are returned as they are. Shared by every
    way a checklist is filled (audit, the HTTP API, the DICOM network sessions)."""
    from fetalplanes.inference.predictor import Predictor, zero_shot_fold

    if getattr(predictor, "fold", None) is None or predictor.card.preset == preset:
        return predictor
    import copy

    card = copy.copy(predictor.card)
    card.preset = preset
    return Predictor(predictor.backend, card, predictor.min_confidence,
                     fold=zero_shot_fold(card))


def model_views(predictor: Any) -> list[str]:
    """The views a predictor can output (its classes without not_target)."""
    return [c for c in predictor.output_classes if c != "not_target"]


def check_checklist_fits(checklist: Checklist, views: Sequence[str], model: str) -> None:
    """One line when the model can assess none of the checklist's items."""
    if set(checklist.views) & set(views):
        return
    raise ChecklistError(
        f"{model} outputs {', '.join(views)}; checklist {checklist.name} names none of "
        f"these views (it is written for preset {checklist.preset}): choose a checklist for "
        "this model (--checklist seed4-planes for the four planes) or a FILE.json"
    )


def frame_observation(source: str, prediction: Any) -> Observation | None:
    """A classified still or frame as an `Observation`, with no smoothing (the form a
    still image takes in `fetalplanes audit`); None for a frame that failed (no label).
    `prediction` is a `Prediction`; `source` names where it came from (a file, a SOP
    Instance UID)."""
    if getattr(prediction, "error", None):
        return None
    return Observation(source, prediction.label, float(prediction.confidence),
                       frame=prediction.frame, not_target=bool(prediction.not_target),
                       uncertain=bool(prediction.uncertain),
                       frame_rejected=bool(prediction.not_target))
