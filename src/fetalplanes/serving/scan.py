"""`POST /api/v1/scan`: find the standard planes in one uploaded sweep (video or DICOM cine).

The upload is read by the predict endpoint's reader (in memory, same size limits and
timeouts) and never touches a disk: a DICOM cine is decoded from the bytes, and a video is
handed to OpenCV through an anonymous in-memory file (`data.video.memory_file`, Linux
``memfd_create``). The scan runs alone on the model, like a heat map, since it keeps the
network busy for the whole recording.
"""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from fetalplanes.data.sources import open_upload
from fetalplanes.errors import FetalPlanesError, ImageError
from fetalplanes.inference.predictor import Predictor
from fetalplanes.serving.batching import MicroBatcher
from fetalplanes.serving.schemas import ErrorResponse, result_model
from fetalplanes.serving.settings import ServeSettings
from fetalplanes.serving.uploads import Upload, UploadRejected, upload_body
from fetalplanes.workflows.scan import DEFAULT_WINDOW, ScanLimitError, ScanResult, scan

SCAN = "/api/v1/scan"
MAX_SCAN_FRAMES = 20_000
"""Most frames one request may scan (13 minutes at 25 fps); beyond it, ask for every=K."""


class _Service(Protocol):
    """What the scan endpoint needs of the app's `PredictService`."""

    predictor: Predictor
    settings: ServeSettings
    batcher: MicroBatcher[Any, Any]

    async def read(self, request: Request) -> list[Upload]: ...


class Smoothed(BaseModel):
    label: str = Field(description="Plane after temporal smoothing, or `not_target`.")
    confidence: float = Field(description="Smoothed probability of `label`'s top class.")
    not_target: bool
    uncertain: bool
    probabilities: dict[str, float]


TimelineFrame = result_model(
    "TimelineFrame",
    "One scanned frame: its own result (the result schema) and its smoothed label.",
    skip=("path", "error"),
    required=("frame", "time_s", "label", "confidence", "uncertain", "not_target",
              "probabilities"),
    extra={"smoothed": (Smoothed, Field(description="The label after temporal smoothing."))},
)


class BestFrame(BaseModel):
    plane: str
    frame: int
    time_s: float
    confidence: float = Field(description="Calibrated probability of the plane in this frame.")
    png: str | None = Field(None, description="The frame as decoded (grey), base64 PNG.")


class Segment(BaseModel):
    plane: str
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    frames: int
    best: BestFrame


class ScanResponse(BaseModel):
    """Timeline, segments, best frame per plane found, and the planes not found."""

    name: str
    kind: str = Field(description="video or dicom")
    fps: float
    every: int
    window: int
    frames_scanned: int
    duration_s: float
    seconds: float
    frames_per_second: float
    classes: list[str]
    pixel_spacing_mm: list[float] | None = None
    timeline: list[TimelineFrame]
    segments: list[Segment]
    best: list[BestFrame]
    found: list[str]
    missing: list[str]


SCAN_BODY = upload_body(
    {
        "type": "string",
        "format": "binary",
        "description": "One video (MP4, AVI, MOV...) or DICOM cine.",
    }
)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed request, or not exactly one file."},
    413: {"model": ErrorResponse, "description": "The file or its frame count is over the limits."},
    415: {"model": ErrorResponse, "description": "Not a readable video or DICOM cine."},
}


def scan_upload(predictor: Predictor, upload: Upload, every: int, window: int) -> ScanResult:
    """Scan one upload from memory (runs in a worker thread)."""
    with open_upload(upload.data, upload.filename) as source:
        return scan(predictor, source, every=every, window=window, max_frames=MAX_SCAN_FRAMES,
                    workers=0)  # in this thread: a server never forks decoders


def scan_router(service: _Service) -> APIRouter:
    """The scan endpoint, sharing the app's upload reader, limits and model gate."""
    router = APIRouter()

    @router.post(
        SCAN,
        response_model=ScanResponse,
        responses=ERRORS,
        openapi_extra=SCAN_BODY,
        summary="Find the standard planes in a video or DICOM cine",
        tags=["scan"],
    )
    async def scan_sweep(
        request: Request,
        every: int = Query(1, ge=1, le=1000, description="Classify every K-th frame."),
        window: int = Query(DEFAULT_WINDOW, ge=1, le=101,
                            description="Frames in the centred smoothing window (odd)."),
    ) -> Any:
        """Per-frame and smoothed planes, segments, best frame per plane, missing planes."""
        if window % 2 == 0:
            raise UploadRejected(400, f"window must be odd (got {window})")
        uploads = await service.read(request)
        if len(uploads) != 1:
            raise UploadRejected(400, f"send one video or DICOM cine (got {len(uploads)} files)")
        try:
            result = await service.batcher.exclusive(
                scan_upload, service.predictor, uploads[0], every, window
            )
        except ScanLimitError as exc:
            raise UploadRejected(413, str(exc)) from None
        except ImageError as exc:
            raise UploadRejected(415, str(exc)) from None
        except FetalPlanesError as exc:
            raise UploadRejected(400, str(exc)) from None
        return result.to_dict(images=True)

    return router
