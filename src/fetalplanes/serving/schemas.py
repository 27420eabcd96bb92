"""Pydantic response models: they are the API's documentation in /docs and /openapi.json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, create_model

from fetalplanes.inference.results import result_fields


def _json_type(kind: Any) -> Any:
    """The JSON form of a result field's type (tuples travel as lists)."""
    text = str(kind)
    if "tuple" in text:
        return list[float] | None
    return kind


def result_model(name: str, doc: str, *, skip: tuple[str, ...] = (), required: tuple[str, ...]
                 = (), extra: dict[str, Any] | None = None) -> type[BaseModel]:
    """A response model whose fields are the result schema's (`results.result_fields`): the
    fields are declared once, in `Prediction`, and every API view derives from them."""
    fields: dict[str, Any] = {}
    for f in result_fields():
        if f.key in skip:
            continue
        if f.key in required:
            fields[f.key] = (_json_type(f.type), Field(description=f.doc))
        else:
            fields[f.key] = (_json_type(f.type) | None, Field(None, description=f.doc))
    return create_model(name, __doc__=doc, **fields, **(extra or {}))


FileResult = result_model(
    "FileResult",
    "The result for one uploaded file, or one frame of it: a prediction, or an `error`.",
    required=("path",),
    extra={
        "filename": (str, Field(description="The uploaded file's base name (`path` adds "
                                            "`#frame=N` for a frame of a cine or video).")),
        "heatmap": (str | None, Field(None, description="With ?explain=true: base64 PNG of "
                                                        "the heat map over the model input.")),
        "heatmap_error": (str | None, Field(None, description="With ?explain=true: why no "
                                                              "heat map was made for this file.")),
    },
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
