"""`POST /api/v1/audit`: the exam checklist of uploaded images, DICOM files and sweeps.

The files of one request are one study. They are read by the predict endpoint's reader (in
memory, same limits and timeouts) and never touch a disk (videos go through an anonymous
in-memory file, as for the scan endpoint). A zero-shot model (the bundled SonoNet-16) is
folded to the checklist's preset for the request, so `fetalplanes serve sononet16` answers
the ISUOG checklist whatever `--preset` it was started with. The web page's Study panel
keeps a checklist filled by merging the answers of successive drops in the browser: the
server keeps nothing between requests.

`GET /api/v1/checklists` lists the shipped checklists and what this model can assess of
them; `GET /api/v1/model/card` is the model card the page and every report show.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from fetalplanes.errors import FetalPlanesError, ImageError
from fetalplanes.inference.predictor import Predictor
from fetalplanes.models.model_card import card_for
from fetalplanes.serving.batching import MicroBatcher
from fetalplanes.serving.scan import MAX_SCAN_FRAMES
from fetalplanes.serving.schemas import ErrorResponse
from fetalplanes.serving.settings import ServeSettings
from fetalplanes.serving.uploads import Upload, UploadRejected, upload_body
from fetalplanes.workflows.audit import (
    AuditOptions,
    audit_uploads,
    check_checklist_fits,
    model_views,
    predictor_for_preset,
)
from fetalplanes.workflows.checklist import (
    DEFAULT_CHECKLIST,
    Checklist,
    builtin_checklists,
    load_checklist,
)
from fetalplanes.workflows.scan import DEFAULT_WINDOW, ScanLimitError

AUDIT = "/api/v1/audit"


class _Service(Protocol):
    predictor: Predictor
    settings: ServeSettings
    batcher: MicroBatcher[Any, Any]

    async def read(self, request: Request) -> list[Upload]: ...


class Where(BaseModel):
    source: str = Field(description="The uploaded file's name.")
    frame: int | None = Field(None, description="Frame of a recording; null for an image.")
    time_s: float | None = Field(None, description="Time of that frame in the recording.")


class Best(Where):
    view: str = Field(description="The model view the frame showed.")
    confidence: float = Field(description="Calibrated probability of that view in the frame.")


class AuditItem(BaseModel):
    """One checklist item and what the study shows of it."""

    id: str
    section: str
    name: str
    views: list[str] = Field(description="Model views that show this item (any counts).")
    required: bool
    note: str | None = None
    status: str = Field(description="present, missing or not_assessed (by this model).")
    present: bool
    assessed: str | None = Field(None, description="'not assessed by this model' when so.")
    best: Best | None = None
    frames: int = Field(description="Accepted frames or images that showed it.")
    uncertain_frames: int
    first: Where | None = None
    last: Where | None = None
    sources: list[str]


class Run(BaseModel):
    start_s: float
    end_s: float
    label: str
    status: str = Field(description="view, uncertain or not_target")


class RecordingRuns(BaseModel):
    source: str
    duration_s: float
    frames: int
    runs: list[Run]


class Still(BaseModel):
    source: str
    label: str
    confidence: float
    not_target: bool
    uncertain: bool


class AuditSummary(BaseModel):
    assessed: int
    present: int
    missing: int
    not_assessed: int
    complete: bool
    completeness: float | None = None


class AuditResponse(BaseModel):
    """checklist.json of `fetalplanes audit` for the uploaded study, plus thumbnails,
    recording timelines and per-image labels for drawing it."""

    fetalplanes_version: str
    created: str
    research_use: str
    study: dict[str, Any]
    model: dict[str, Any]
    settings: dict[str, Any]
    checklist: dict[str, Any]
    model_views: list[str]
    observations: int
    summary: AuditSummary
    present: list[str]
    missing: list[str]
    not_assessed: list[str]
    items: list[AuditItem]
    failures: list[str]
    timing: dict[str, Any]
    thumbnails: dict[str, str] = Field(description="Item id -> best frame, base64 PNG.")
    timelines: list[RecordingRuns]
    stills: list[Still]


class ChecklistInfo(BaseModel):
    name: str
    title: str
    preset: str
    source: dict[str, str]
    items: list[dict[str, Any]]
    assessed: list[str] = Field(description="Ids of the items this model can assess.")


class ChecklistsResponse(BaseModel):
    default: str | None = Field(description="The checklist audits use when none is named.")
    checklists: list[ChecklistInfo]


AUDIT_BODY = upload_body({
    "type": "array",
    "items": {"type": "string", "format": "binary"},
    "description": "The study's files: images, DICOM files (stills or cines), videos.",
})
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed request, no file, or a checklist "
          "this model cannot assess."},
    413: {"model": ErrorResponse, "description": "Over the size or frame limits."},
    415: {"model": ErrorResponse, "description": "No file could be read."},
}


def _fits(predictor: Predictor, checklist: Checklist) -> list[str]:
    views = set(model_views(predictor_for_preset(predictor, checklist.preset)))
    return [i.id for i in checklist.items if views & set(i.views)]


def default_checklist(predictor: Predictor) -> str | None:
    """ISUOG when the model can assess it (the bundled SonoNet-16), else the first shipped
    checklist it can assess (seed4-planes for a four-plane run)."""
    names = [DEFAULT_CHECKLIST, *[n for n in builtin_checklists() if n != DEFAULT_CHECKLIST]]
    return next((n for n in names if _fits(predictor, load_checklist(n))), None)


def model_card(predictor: Predictor) -> dict[str, Any]:
    """The card as JSON can carry it (a NaN metric becomes null)."""
    card = card_for(predictor.card, predictor.card.architecture, predictor.fold is not None)
    return _finite(card)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def run_audit_request(predictor: Predictor, uploads: list[Upload], checklist: Checklist,
                      every: int, window: int, model: dict[str, Any]) -> dict[str, Any]:
    options = AuditOptions(every=every, window=window, max_frames=MAX_SCAN_FRAMES,
                           workers=0)  # in this thread: a server never forks decoders
    files = [(u.filename, u.data) for u in uploads]
    return audit_uploads(predictor, files, checklist, options, model)


def audit_router(service: _Service) -> APIRouter:
    """The audit endpoints, sharing the app's upload reader, limits and model gate."""
    router = APIRouter()
    default = default_checklist(service.predictor)
    card = model_card(service.predictor)

    @router.get("/api/v1/checklists", response_model=ChecklistsResponse, tags=["audit"])
    async def checklists() -> Any:
        """The shipped checklists and which of their items this model can assess."""
        out = []
        for name in builtin_checklists():
            c = load_checklist(name)
            d = c.to_dict()
            out.append({"name": c.name, "title": c.title, "preset": c.preset,
                        "source": c.source, "items": d["items"],
                        "assessed": _fits(service.predictor, c)})
        return {"default": default, "checklists": out}

    @router.get("/api/v1/model/card", tags=["model"])
    async def model_card_json() -> dict[str, Any]:
        """What the model is and is not: intended use, training data, measured accuracy,
        known failure modes; research software, not a medical device."""
        return card

    @router.post(AUDIT, response_model=AuditResponse, responses=ERRORS,
                 openapi_extra=AUDIT_BODY, tags=["audit"],
                 summary="The exam checklist of a study's images and sweeps")
    async def audit(
        request: Request,
        checklist: str | None = Query(None, max_length=64, description="A shipped checklist "
                                      "(GET /api/v1/checklists); default: ISUOG when the "
                                      "model can assess it."),
        every: int = Query(1, ge=1, le=1000, description="In recordings, every K-th frame."),
        window: int = Query(DEFAULT_WINDOW, ge=1, le=101,
                            description="Frames in the centred smoothing window (odd)."),
    ) -> Any:
        """Which checklist views the uploaded files show, the best frame of each, what is
        missing. All files of the request are one study."""
        if window % 2 == 0:
            raise UploadRejected(400, f"window must be odd (got {window})")
        name = checklist or default
        if name is None or name not in builtin_checklists():
            known = ", ".join(builtin_checklists())
            raise UploadRejected(400, f"unknown checklist {name!r}; choose {known}")
        chosen = load_checklist(name)
        predictor = predictor_for_preset(service.predictor, chosen.preset)
        try:
            check_checklist_fits(chosen, model_views(predictor), predictor.card.architecture)
        except FetalPlanesError as exc:
            raise UploadRejected(400, str(exc)) from None
        uploads = await service.read(request)
        if not uploads:
            raise UploadRejected(400, "send the study's files in the 'files' field")
        model = {"name": predictor.card.architecture,
                 "preset": predictor.card.preset if predictor.fold is not None else None,
                 "classes": predictor.output_classes, "card": card}
        try:
            result = await service.batcher.exclusive(
                run_audit_request, predictor, uploads, chosen, every, window, model)
        except ScanLimitError as exc:
            raise UploadRejected(413, str(exc)) from None
        except ImageError as exc:
            raise UploadRejected(415, str(exc)) from None
        except FetalPlanesError as exc:
            raise UploadRejected(400, str(exc)) from None
        if not result["observations"] and result["failures"]:
            raise UploadRejected(415, result["failures"][0])
        return result

    return router
