"""The FastAPI application: page at `/`, JSON API under `/api/v1`, health at `/healthz`.

`create_app` takes an already loaded `Predictor`, so the model is loaded once per
process and tests can inject one. Nothing here writes uploads to disk or logs them.
"""

from __future__ import annotations

import base64
import itertools
import logging
import math
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fetalplanes._version import __version__
from fetalplanes.data.images import decode_cost, decoded_pixels
from fetalplanes.data.sources import Item, Source, Unreadable, upload_source
from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import Prediction, columns, failed
from fetalplanes.serving.audit import audit_router
from fetalplanes.serving.batching import DecodeBudget, MicroBatcher
from fetalplanes.serving.explainer import Explainer, explainer_for, one_line
from fetalplanes.serving.live import live_router
from fetalplanes.serving.scan import scan_router
from fetalplanes.serving.schemas import (
    Calibration,
    ErrorResponse,
    ExplainStatus,
    FileResult,
    Health,
    InferenceStats,
    Limits,
    ModelInfo,
    PredictResponse,
)
from fetalplanes.serving.settings import MB, ServeSettings
from fetalplanes.serving.uploads import Upload, UploadRejected, read_uploads, upload_body

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("fetalplanes.serve")

DESCRIPTION = """Classify 2D fetal ultrasound images into standard planes.

Upload images as `multipart/form-data` in the field `files` (one or many). Every file
gets its own result, or an `error` when it is not a readable image. Status codes:
200 when at least one file was classified; 400 for a malformed request; 408 when the
upload stalls or takes too long; 413 when a file, a form field, the request or the number
of files is over the server's limits; 415 when the
request is not multipart or none of its files is a readable image (per-file errors
are in `results`). Uploads are processed in memory and never stored or logged.
"""

UPLOAD_BODY = upload_body(
    {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "description": "Images (PNG, JPEG, BMP, TIFF, WebP or DICOM); "
        "the content is sniffed, not the file name.",
    }
)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed multipart request or no files."},
    408: {"model": ErrorResponse, "description": "The upload stalled or took too long."},
    413: {"model": ErrorResponse, "description": "A file or the request is over the limits."},
    415: {
        "model": ErrorResponse,
        "description": "Not multipart, or none of the files is a readable image.",
    },
}

CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def finite(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf (e.g. an undefined metric) become null instead of a 500."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def model_info(predictor: Predictor, settings: ServeSettings, explainer: Explainer) -> ModelInfo:
    """The model card as the API shows it (computed once at start-up)."""
    card = predictor.card
    return ModelInfo(
        architecture=card.architecture,
        classes=predictor.output_classes,
        csv_columns=columns(predictor.output_classes),
        model_classes=list(card.classes),
        preset=card.preset,
        preprocessing=card.preprocess.to_dict(),
        calibration=Calibration(temperature=card.temperature),
        rejection=finite(card.rejection),
        metrics=finite(card.metrics),
        created=card.created,
        fetalplanes_version=card.version or __version__,
        min_confidence=predictor.min_confidence,
        explain=ExplainStatus(available=explainer.available, reason=explainer.reason),
        limits=Limits(
            max_file_bytes=settings.max_file_bytes,
            max_request_bytes=settings.max_request_bytes,
            max_files=settings.max_files,
        ),
    )


#: Why a heat map is not made for the frames of a cine or video.
MULTI_FRAME_HEAT = "heat maps are made for single images, not the frames of a cine or video"


def file_result(pred: Prediction, filename: str) -> FileResult:
    """API view of one prediction: the result schema's JSON (`Prediction.to_dict`), named
    by the item (`name`, or `name#frame=N` for a frame), with the upload's `filename`."""
    return FileResult(filename=filename, **pred.to_dict())


def file_result_index(preds: list[list[Prediction]], upload: int) -> int:
    """Index in the flat result list of the first result of upload `upload`."""
    return sum(len(p) for p in preds[:upload])


def over_pixel_budget(
    uploads: list[Upload], budget: int, max_decode_bytes: int | None = None
) -> dict[int, str]:
    """Uploads past the request's pixel budget (counted in upload order, from the headers
    alone), or whose decoding alone would need more memory than the server's decode budget
    -> their one-line error; the others are decoded as usual."""
    used, refused = 0, {}
    for i, upload in enumerate(uploads):
        pixels = decoded_pixels(upload.data, upload.filename)
        cost = decode_cost(upload.data, upload.filename) if max_decode_bytes else 0
        if max_decode_bytes and cost > max_decode_bytes:
            refused[i] = (
                f"{upload.filename}: decoding it needs about {cost / MB:.0f} MB, over this "
                f"server's decode budget ({max_decode_bytes / MB:.0f} MB); send a smaller image"
            )
        elif used + pixels > budget:
            refused[i] = (
                f"{upload.filename}: over this request's pixel budget ({budget / 1e6:g} "
                "megapixels per request); send it in another request"
            )
        else:
            used += pixels
    return refused


def error_json(status: int, detail: str, results: list[FileResult] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if results is not None:
        body["results"] = [r.model_dump() for r in results]
    # 408, 413: the rest of the body is unread, so the connection cannot carry another request
    headers = {"Connection": "close"} if status in (408, 413) else None
    return JSONResponse(body, status_code=status, headers=headers)


class SecurityHeaders:
    """Pure ASGI middleware (no body buffering): no caching of results, strict CSP on the page."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                if path.startswith("/api/"):
                    headers.append((b"cache-control", b"no-store"))
                if not path.startswith("/docs"):  # Swagger UI's page has an inline script
                    headers.append((b"content-security-policy", CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class PredictService:
    """What /api/v1/predict does, apart from HTTP: read, batch, explain."""

    def __init__(self, predictor: Predictor, settings: ServeSettings, explainer: Explainer):
        self.predictor = predictor
        self.settings = settings
        self.explainer = explainer
        self._heat_requests = 0  # requests computing heat maps now (one event loop: no lock)
        self.decode_budget = DecodeBudget(settings.max_decode_bytes)
        self.batcher: MicroBatcher[Item, Prediction] = MicroBatcher(
            self.run_items,
            slots=settings.max_concurrency,
            max_batch=settings.max_batch,
            window_s=settings.batch_window_ms / 1000,
        )

    def hold(self, item: Item) -> AbstractContextManager[None]:
        """Wait until decoding this item fits the server's decode budget (threads)."""
        if item.data is not None:
            cost = decode_cost(item.data, item.name)
        else:
            cost = 0 if item.pixels is None else int(item.pixels.size) * 4
        return self.decode_budget.hold(cost)

    def run_items(self, items: list[Item]) -> list[Prediction]:
        """The engine on a batch of items, in this thread, within the decode budget (what
        the micro-batcher calls; every upload, frame and live frame goes through here)."""
        return list(self.predictor.predict_items(items, workers=0, hold=self.hold))

    def open_sources(self, uploads: list[Upload], refused: dict[int, str],
                     stack: ExitStack) -> list[Source]:
        """One source per upload (an image, every frame of a DICOM or video), read from
        memory only; refused and unreadable uploads become one-item error sources."""
        return [Unreadable(u.filename, refused[i]) if i in refused
                else upload_source(u.data, u.filename, stack) for i, u in enumerate(uploads)]

    async def read(self, request: Request) -> list[Upload]:
        s = self.settings
        try:
            return await read_uploads(
                request.headers.get("content-type", ""),
                request.headers.get("content-length"),
                request.stream(),
                max_file_bytes=s.max_file_bytes,
                max_request_bytes=s.max_request_bytes,
                max_files=s.max_files,
                max_field_bytes=s.max_field_bytes,
                max_part_header_bytes=s.max_part_header_bytes,
                body_timeout_s=s.body_timeout_s,
                upload_timeout_s=s.upload_timeout_s,
            )
        except ClientDisconnect:
            raise UploadRejected(400, "client disconnected during upload") from None

    async def classify(self, uploads: list[Upload], explain: bool) -> list[FileResult]:
        """Results for every item of every upload, in upload order: single images share
        micro-batches with other requests; a cine or video runs alone through the engine
        (its frames in order), like a scan."""
        budget = self.settings.max_request_pixels  # headers only, but off the event loop
        refused = await anyio.to_thread.run_sync(
            over_pixel_budget, uploads, budget, self.settings.max_decode_bytes
        )
        with ExitStack() as stack:
            sources = await anyio.to_thread.run_sync(self.open_sources, uploads, refused, stack)
            single = [s for s in sources if (s.expected() or 0) == 1]
            done = iter(await self.batcher.submit([next(s.items()) for s in single]))
            preds: list[list[Prediction]] = []
            for source in sources:
                if (source.expected() or 0) == 1:
                    preds.append([next(done)])
                else:
                    preds.append(await self.batcher.exclusive(self.run_frames, source))
        results = [file_result(p, u.filename) for ps, u in zip(preds, uploads, strict=True)
                   for p in ps]
        if explain:
            firsts = [ps[0] if len(ps) == 1 else failed(u.filename, MULTI_FRAME_HEAT)
                      for ps, u in zip(preds, uploads, strict=True)]
            heads = [results[file_result_index(preds, i)] for i in range(len(uploads))]
            await self._explain_all(heads, uploads, firsts)
            for head, ps in zip(heads, preds, strict=True):
                if len(ps) > 1:
                    head.heatmap_error = MULTI_FRAME_HEAT
        return results

    def run_frames(self, source: Source) -> list[Prediction]:
        """Every frame of a multi-frame upload through the engine, in order (bounded)."""
        n = source.expected()
        limit = self.settings.max_frames
        if n is not None and n > limit:
            return [failed(source.name, f"{source.name}: {n} frames, more than this server "
                                        f"classifies per file ({limit}); use /api/v1/scan "
                                        "with every=K, or send fewer frames")]
        items = itertools.islice(source.items(), limit + 1)
        out = self.run_items(list(items))
        if len(out) > limit:
            return [failed(source.name, f"{source.name}: more than {limit} frames; use "
                                        "/api/v1/scan with every=K, or send fewer frames")]
        return out

    async def _explain_all(
        self, results: list[FileResult], uploads: list[Upload], preds: list[Prediction]
    ) -> None:
        """Heat maps for the readable files, within the per-request and concurrent bounds:
        each one runs alone on the network, so unbounded queues would hold every upload in
        memory and delay every other request."""
        s = self.settings
        wanted = [(r, u, p) for r, u, p in zip(results, uploads, preds, strict=True) if p.ok]
        if self._heat_requests >= s.max_heatmap_requests:
            busy = (
                f"server busy: {self._heat_requests} requests are computing heat maps "
                f"(limit {s.max_heatmap_requests}); try again shortly"
            )
            for result, _, _ in wanted:
                result.heatmap_error = busy
            return
        self._heat_requests += 1
        try:
            for n, (result, upload, pred) in enumerate(wanted):
                if n >= s.max_heatmaps_per_request:
                    result.heatmap_error = (
                        f"heat maps are limited to {s.max_heatmaps_per_request} per request; "
                        "ask for this one in another request"
                    )
                else:
                    await self._explain(result, upload, pred)
        finally:
            self._heat_requests -= 1

    def _target(self, pred: Prediction) -> int | None:
        """Explain the top class of the network (None: let explain pick, for folded models)."""
        if self.predictor.fold is not None:
            return None
        return self.predictor.classes.index(max(pred.probs, key=pred.probs.__getitem__))

    async def _explain(self, result: FileResult, upload: Upload, pred: Prediction) -> None:
        if not self.explainer.available:
            result.heatmap_error = self.explainer.reason
            return
        try:
            png = await self.batcher.exclusive(
                self.explainer.overlay,
                self.predictor,
                upload.data,
                upload.filename,
                self._target(pred),
            )
        except Exception as exc:  # heat maps are optional: report per file, keep the result
            result.heatmap_error = f"heat map failed: {one_line(exc)}"
            return
        result.heatmap = base64.b64encode(png).decode("ascii")


def api_router(service: PredictService, info: ModelInfo) -> APIRouter:
    """The versioned JSON API and the health check."""
    router = APIRouter()

    @router.post(
        "/api/v1/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        openapi_extra=UPLOAD_BODY,
        summary="Classify uploaded images",
        tags=["predict"],
    )
    async def predict(
        request: Request,
        explain: bool = Query(False, description="Also return a heat-map overlay per image."),
    ) -> Any:
        """Plane, calibrated confidence, all class probabilities and flags, per file."""
        uploads = await service.read(request)
        results = await service.classify(uploads, explain)
        if all(r.error is not None for r in results):
            n = len(results)
            what = "the file is not" if n == 1 else f"none of the {n} files is"
            return error_json(415, f"{what} a readable image", results)
        return PredictResponse(classes=info.classes, results=results)

    @router.get("/api/v1/model", response_model=ModelInfo, tags=["model"])
    async def model() -> ModelInfo:
        """Classes, architecture, preprocessing, metrics, calibration, rejection, limits."""
        return info

    @router.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """Liveness (the model is loaded and the server answers) and batching counters."""
        stats = service.batcher.stats
        return Health(
            architecture=info.architecture,
            classes=len(info.classes),
            inference=InferenceStats(
                batches=stats.batches,
                files=stats.items,
                largest_batch=stats.largest,
                most_requests_in_a_batch=stats.most_requests,
            ),
        )

    return router


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadRejected)
    async def rejected(_: Request, exc: UploadRejected) -> JSONResponse:
        return error_json(exc.status, exc.detail)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed: %s", one_line(exc))  # never the upload itself
        return error_json(500, "internal server error; see the server log")


def add_page(app: FastAPI) -> None:
    """The single-page web app: plain files, no build step, nothing from the internet."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


DOCS_ASSETS = "/docs-assets"


def add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the installed `swagger-ui-bundle` package: it works offline
    (FastAPI's default page loads its scripts from a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the [serve] extra brings it; say so instead of a blank page
        swagger_ui_path = None

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if swagger_ui_path is None:
            return HTMLResponse("API docs need the swagger-ui-bundle package: pip install "
                                "'fetalplanes[serve]'. The schema is at /openapi.json.",
                                status_code=503)
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="fetalplanes API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )

    if swagger_ui_path is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")


def create_app(
    predictor: Predictor,
    settings: ServeSettings | None = None,
    explainer: Explainer | None = None,
) -> FastAPI:
    """Build the app around a loaded predictor (`explainer` defaults to Grad-CAM)."""
    settings = settings or ServeSettings()
    explainer = explainer if explainer is not None else explainer_for(predictor)
    service = PredictService(predictor, settings, explainer)
    info = model_info(predictor, settings, explainer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.batcher.aclose()

    app = FastAPI(
        title="fetalplanes",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by add_docs from local files
        redoc_url=None,  # ReDoc would load from a CDN
    )
    app.state.service = service
    add_error_handlers(app)
    app.include_router(api_router(service, info))
    app.include_router(scan_router(service))
    app.include_router(audit_router(service))
    app.include_router(live_router(service))
    add_page(app)
    add_docs(app)
    app.add_middleware(SecurityHeaders)
    return app
