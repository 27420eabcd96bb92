"""Pydantic response models: they are the API's documentation in /docs and /openapi.json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class FileResult(BaseModel):
    """The result for one uploaded file: a prediction, or an `error`."""

    path: str = Field(description="Name of the item: the uploaded file's base name.")
    filename: str = Field(description="Same as `path` (kept for clients of fetalplanes 0.1).")
    frame: int | None = Field(None, description="Frame index within a multi-frame file.")
    label: str | None = Field(
        None, description="Predicted plane, or `not_target` when the image is rejected."
    )
    confidence: float | None = Field(
        None, ge=0, le=1, description="Calibrated probability of the top class."
    )
    probabilities: dict[str, float] | None = Field(
        None, description="Calibrated probability of every class, by class name."
    )
    uncertain: bool | None = Field(
        None, description="Confidence is below the server's --min-confidence."
    )
    not_target: bool | None = Field(
        None, description="The rejection rule says this is not one of the target planes."
    )
    rejection_score: float | None = Field(
        None,
        description="In-distribution score the not-target rule thresholds (higher = more "
        "like the training planes).",
    )
    model_label: str | None = Field(
        None, description="Zero-shot models only: the network's own (unfolded) class."
    )
    model_confidence: float | None = Field(
        None, description="Zero-shot models only: probability of `model_label`."
    )
    heatmap: str | None = Field(
        None, description="With ?explain=true: base64 PNG of the heat map over the model input."
    )
    heatmap_error: str | None = Field(
        None, description="With ?explain=true: why no heat map was made for this file."
    )
    pixel_spacing_mm: list[float] | None = Field(
        None, description="(row, column) pixel size in mm, when the file declares it."
    )
    error: str | None = Field(
        None, description="Why the file could not be classified (not an image, truncated...)."
    )


class PredictResponse(BaseModel):
    """Results in upload order; `classes` gives the order of the probability bars."""

    classes: list[str]
    results: list[FileResult]


class ErrorResponse(BaseModel):
    """A refused request: one-line `detail`, plus per-file results when files were read."""

    detail: str
    results: list[FileResult] | None = None


class Calibration(BaseModel):
    method: str = "temperature"
    temperature: float


class Limits(BaseModel):
    """What the server accepts, so clients can check before uploading."""

    max_file_bytes: int
    max_request_bytes: int
    max_files: int


class ExplainStatus(BaseModel):
    available: bool
    reason: str | None = None


class ModelInfo(BaseModel):
    """The model card of the loaded checkpoint plus the server's own settings."""

    architecture: str
    classes: list[str] = Field(description="Names of the returned probabilities, in order.")
    csv_columns: list[str] = Field(
        description="Columns of the CSV download: the result schema shared with `predict "
        "--format csv`, the sort journal and evaluate's predictions.csv."
    )
    model_classes: list[str] = Field(description="The network's own classes (from the sidecar).")
    preset: str
    preprocessing: dict[str, Any]
    calibration: Calibration
    rejection: dict[str, Any] = Field(description="The stored not-a-target-plane rule.")
    metrics: dict[str, Any] = Field(description="Training/validation metrics from the sidecar.")
    created: str
    fetalplanes_version: str
    min_confidence: float = Field(description="Below this confidence a result is `uncertain`.")
    explain: ExplainStatus
    limits: Limits


class InferenceStats(BaseModel):
    """Micro-batching so far: model calls, files they covered, and the most merged in one."""

    batches: int
    files: int
    largest_batch: int
    most_requests_in_a_batch: int


class Health(BaseModel):
    status: str = "ok"
    architecture: str
    classes: int
    inference: InferenceStats
