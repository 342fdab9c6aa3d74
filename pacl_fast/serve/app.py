"""The FastAPI app of ``pacl-fast serve``: the API under ``/v1``, health, metrics, and the page at ``/``.

``create_app(segmenter, settings)`` makes an app around one model. A request's path through it:
admission (a place in the queue, or 503), the body read with a byte bound, the options parsed, the
image decoded and prepared on a CPU thread (``Segmenter.preprocessor``: the same decoding and
resizing ``Segmenter.predict`` does), the prepared image queued for the model's worker thread
(:mod:`pacl_fast.serve.batcher`), and the answer rendered on a CPU thread: JSON with the label map
as a palette PNG, or the overlay PNG for ``Accept: image/png``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pacl_fast.serve.batcher import Batcher, Job, NotReady, QueueFull, SegmentKey
from pacl_fast.serve.inputs import (
    ALLOWED_FORMATS,
    FILE_FIELD,
    MULTIPART_OVERHEAD,
    SEGMENT_OPTIONS,
    ApiError,
    SegmentOptions,
    Upload,
    default_sliding_window,
    open_image,
    parse_labels,
    parse_multipart,
    parse_segment_options,
    read_body,
)
from pacl_fast.serve.metrics import ServeMetrics
from pacl_fast.serve.settings import TEMPLATE_PRESETS, ServeSettings

if TYPE_CHECKING:
    from pacl_fast.images import Prepared
    from pacl_fast.segmenter import Segmenter

logger = logging.getLogger(__name__)

API_VERSION = "v1"
#: Endpoints named in metrics; anything else is counted as "other" (bounded label values).
ENDPOINTS = ("/", "/static/app.js", "/static/style.css", "/healthz", "/readyz", "/metrics", "/v1/info",
             "/v1/segment", "/v1/embed-labels", "/docs", "/openapi.json")  # fmt: skip
#: The page loads nothing from anywhere but this server.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def template_set(name: str) -> str | tuple[str, ...]:
    """A preset name -> what ``Segmenter.encode_labels`` takes."""
    if name == "synthetic":
        from pacl_fast.data.synthetic import SYNTHETIC_TEMPLATES

        return SYNTHETIC_TEMPLATES
    return name


def label_presets() -> dict[str, tuple[str, ...]]:
    """Class-name lists the page offers (VOC without its background class: every name is asked for)."""
    from pacl_fast.data.segmentation import ADE20K_CLASSES, CITYSCAPES_CLASSES, VOC_CLASSES
    from pacl_fast.data.synthetic import CLASS_NAMES

    return {"voc": VOC_CLASSES[1:], "ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "shapes": CLASS_NAMES}


def wants_png(accept: str | None) -> bool:
    """``Accept`` lists ``image/png`` before ``application/json`` (or without it): answer with the overlay."""
    if not accept:
        return False
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if "image/png" not in types:
        return False
    return "application/json" not in types or types.index("image/png") < types.index("application/json")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def npy_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class EmbedRequest(BaseModel):
    """Class names to embed ahead of time (so that the first segmentation with them is fast)."""

    model_config = ConfigDict(extra="forbid")
    labels: list[str] | str
    templates: str | None = None


def _segment_group(segmenter: Segmenter, jobs: list[Job]) -> list:
    """Worker side: one ``segment_prepared`` call for jobs of equal options and canvas size."""
    from pacl_fast.images import SlidingWindow

    options: SegmentOptions = jobs[0].key.options
    embeddings = segmenter.encode_labels(options.labels, template_set(options.templates))  # [C, E], cached
    window = SlidingWindow(*options.sliding_window) if options.sliding_window else None
    # Scores are always computed, as predict does: the labels then equal predict's exactly.
    return segmenter.segment_prepared(
        [job.payload for job in jobs],
        embeddings,
        sliding_window=window,
        background_threshold=options.background_threshold,
        with_scores=True,
    )


def _embed_group(segmenter: Segmenter, jobs: list[Job]) -> list:
    labels, templates = jobs[0].key
    embeddings = segmenter.encode_labels(labels, template_set(templates))  # [C, E]
    return [tuple(embeddings.shape)] * len(jobs)


class _MetricsMiddleware:
    """Counts every answer by endpoint and status code and times it (pure ASGI: no per-request task)."""

    def __init__(self, app: Callable, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.monotonic()
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)


def _segment_openapi() -> dict:
    """OpenAPI of ``POST /v1/segment``, which reads its body itself (bounded, in memory)."""
    option_schema = {
        "labels": {"type": "string", "description": "class names, comma-separated (or a JSON list)"},
        "templates": {"type": "string", "enum": list(TEMPLATE_PRESETS)},
        "background_threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "sliding_window": {"type": "string", "description": "true, false, or CROP,STRIDE[,SHORT] in pixels"},
        "with_scores": {"type": "boolean", "description": "add the winner scores (float32 .npy, base64)"},
    }
    return {
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": schema} for name, schema in option_schema.items()
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FILE_FIELD, "labels"],
                        "properties": {FILE_FIELD: {"type": "string", "format": "binary"}, **option_schema},
                    }
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "responses": {
            "200": {
                "description": "JSON (see the README), or the overlay PNG with Accept: image/png",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    }


def create_app(
    segmenter: Segmenter | Callable[[], Segmenter],
    settings: ServeSettings | None = None,
    *,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The service around one model.

    Args:
        segmenter: a built :class:`~pacl_fast.segmenter.Segmenter`, or a function that builds one
            (run on the model's worker thread when the app starts; ``/readyz`` says when it is done).
        settings: limits and batching (:class:`ServeSettings`).
        on_fatal: called (from the worker thread) if the model fails to load, e.g. to stop the server.
    """
    settings = settings or ServeSettings()
    metrics = ServeMetrics()
    cpu_slots = anyio.CapacityLimiter(max(1, os.cpu_count() or 1))

    def warmup(model: Segmenter) -> None:
        """Text tower, image tower and head once each, so that the first request pays no lazy set-up."""
        if not settings.warmup:
            return
        blank = Image.new("RGB", (model.image_size, model.image_size), (128, 128, 128))
        prepared = model.preprocessor()(blank)
        embeddings = model.encode_labels(("object",), template_set(settings.templates))
        model.segment_prepared([prepared], embeddings)

    batcher = Batcher(
        segmenter,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        metrics=metrics,
        warmup=warmup,
    )
    batcher.on_fatal = on_fatal

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(batcher.stop)

    app = FastAPI(
        title="pacl-fast",
        version=API_VERSION,
        summary="Open-vocabulary semantic segmentation: an image and class names in, a label map out.",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.metrics, app.state.settings = batcher, metrics, settings
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    static = resources.files("pacl_fast.serve") / "static"
    page = (static / "index.html").read_bytes()
    assets = {name: (static / name).read_bytes() for name in STATIC_FILES}

    # ----------------------------------------------------------------------------- errors

    def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.errors.labels(str(status), kind).inc()
        return JSONResponse({"error": kind, "detail": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.kind, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in error.errors():
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            problems.append(f"{where or 'body'}: {problem.get('msg', 'invalid')}")
        return error_response(422, "bad_request", "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return error_response(error.status_code, kind, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal", f"internal error ({type(error).__name__}); the server log has details")

    def model() -> Segmenter:
        if batcher.status != "ready":
            raise ApiError(503, "not_ready", f"the model is {batcher.status}", {"Retry-After": "5"})
        return batcher.segmenter

    def admit():
        """A place in the queue; refused before the body is read, so the connection closes after the answer
        (the unread body must not be taken for the client's next request)."""
        try:
            return batcher.admit()
        except QueueFull as error:
            headers = {"Retry-After": str(error.retry_after), "Connection": "close"}
            raise ApiError(503, "queue_full", str(error), headers) from None
        except NotReady as error:
            raise ApiError(503, "not_ready", str(error), {"Retry-After": "5", "Connection": "close"}) from None

    async def run_model(job_key: Any, run: Callable, payload: Any, ticket: Any, images: int) -> tuple[Any, Job]:
        """Queue one job and wait for it; a cancelled wait (timeout) withdraws it."""
        loop = asyncio.get_running_loop()
        job = Job(key=job_key, run=run, payload=payload, ticket=ticket, future=loop.create_future(), images=images)
        try:
            batcher.submit(job)
        except NotReady as error:
            raise ApiError(503, "not_ready", str(error), {"Retry-After": "5"}) from None
        try:
            outcome = await job.future
        except asyncio.CancelledError:
            metrics.dropped.labels("queued" if batcher.withdraw(job) else "running").inc()
            raise
        except NotReady as error:
            raise ApiError(503, "not_ready", str(error), {"Retry-After": "5"}) from None
        except Exception as error:  # the model's failure on this job (the batcher sets it on the future)
            raise model_error(error) from None
        return outcome, job

    async def within_timeout(work: Any) -> Any:
        try:
            return await asyncio.wait_for(work, settings.timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {settings.timeout:g} s; the work was dropped") from None

    def model_error(error: Exception) -> ApiError:
        if isinstance(error, ApiError):
            return error
        if isinstance(error, (ValueError, TypeError)):
            return ApiError(422, "bad_request", str(error))
        logger.error("model error: %s: %s", type(error).__name__, error)
        return ApiError(500, "model_error", f"the model failed on this request ({type(error).__name__}: {error})")

    # ----------------------------------------------------------------------------- the page, health, metrics

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": PAGE_CSP})

    def static_route(name: str, media_type: str) -> None:
        async def serve_asset() -> Response:
            return Response(assets[name], media_type=media_type, headers={"Cache-Control": "no-cache"})

        app.add_api_route(f"/static/{name}", serve_asset, methods=["GET"], include_in_schema=False)

    for name, media_type in STATIC_FILES.items():
        static_route(name, media_type)

    @app.get("/healthz", tags=["health"], summary="The process answers (liveness)")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The model is loaded and warmed up (readiness)")
    async def readyz() -> JSONResponse:
        status = batcher.status
        body: dict[str, Any] = {"status": status}
        if batcher.load_error is not None:
            body["detail"] = f"{type(batcher.load_error).__name__}: {batcher.load_error}"
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text format)")
    async def metrics_text() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get(f"/{API_VERSION}/info", tags=["segmentation"], summary="The model, its method, limits and presets")
    async def info() -> dict:
        segmenter = model()
        crop, stride, short = default_sliding_window(segmenter.image_size, segmenter.patch_size)
        return {
            "service": "pacl-fast",
            "api": API_VERSION,
            "method": segmenter.method,
            "model": repr(segmenter),
            "image_size": segmenter.image_size,
            "patch_size": segmenter.patch_size,
            "templates": list(TEMPLATE_PRESETS),
            "default_templates": settings.templates,
            "default_sliding_window": f"{crop},{stride},{short}",
            "options": list(SEGMENT_OPTIONS),
            "formats": list(ALLOWED_FORMATS),
            "limits": {
                "max_batch": settings.max_batch,
                "max_queue": settings.max_queue,
                "max_image_bytes": settings.max_image_bytes,
                "max_pixels": min(settings.max_pixels, segmenter.max_pixels),
                "max_labels": settings.max_labels,
                "timeout_s": settings.timeout,
            },
            "label_presets": {name: list(names) for name, names in label_presets().items()},
        }

    # ----------------------------------------------------------------------------- segmentation

    async def read_upload(request: Request) -> tuple[bytearray, str | None, dict[str, list[str]]]:
        """Event loop: the body under its byte bound, the multipart Content-Type (None for a raw image body)
        and the query options. Parsing waits for a CPU thread (:func:`parse_upload`)."""
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        multipart = media_type == "multipart/form-data"
        if not multipart and not (media_type.startswith("image/") or media_type == "application/octet-stream"):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send the image as multipart/form-data (field {FILE_FIELD!r}) or as the raw body with an image/* "
                f"or application/octet-stream Content-Type, not {media_type or 'no Content-Type'}",
            )
        limit = settings.max_image_bytes + (MULTIPART_OVERHEAD if multipart else 0)
        body = await read_body(request.stream(), request.headers.get("content-length"), limit)
        query: dict[str, list[str]] = {}
        for name, value in request.query_params.multi_items():
            query.setdefault(name, []).append(value)
        return body, content_type if multipart else None, query

    def parse_upload(body: bytearray, multipart: str | None, query: dict[str, list[str]]) -> Upload:
        """CPU thread: the image bytes and every option (multipart fields and query parameters)."""
        upload = parse_multipart(body, multipart) if multipart else Upload(body, {})
        both = sorted(set(query) & set(upload.fields))
        if both:
            raise ApiError(422, "bad_option", f"option(s) {both} given both in the query and in the form")
        upload.fields.update(query)
        return upload

    def prepare(data: bytes, options: SegmentOptions, segmenter: Segmenter, keep_image: bool) -> Prepared:
        """CPU thread: bytes -> decoded image -> the model input (``Segmenter.preprocessor``, as predict does)."""
        from pacl_fast.images import SlidingWindow

        max_pixels = min(settings.max_pixels, segmenter.max_pixels)
        image = open_image(data, max_pixels, settings.max_image_bytes)
        window = SlidingWindow(*options.sliding_window) if options.sliding_window else None
        try:
            prepared = segmenter.preprocessor(window, keep_images=keep_image)(image)
        except (ValueError, TypeError) as error:
            raise ApiError(422, "bad_image", str(error)) from None
        if window is not None:
            count = len(window.origins(prepared.geometry.canvas_size, segmenter.patch_size))
            if count > settings.max_windows:
                raise ApiError(
                    422, "bad_option", f"sliding_window makes {count} windows, over the limit of {settings.max_windows}"
                )
        return prepared

    def render(
        labels: Any, scores: Any, options: SegmentOptions, prepared: Prepared, as_png: bool, job: Job, arrival: float
    ) -> Response:
        """CPU thread: the answer. Labels ``[H, W]`` int16 (-1 background), scores ``[H, W]`` float32."""
        from pacl_fast.images import to_uint8_hwc
        from pacl_fast.results import Segmentation, palette

        label_map = labels.numpy()
        result = Segmentation(label_map, scores.numpy(), options.labels, "upload")
        if as_png:
            overlay = result.overlay(to_uint8_hwc(prepared.image))
            return Response(png_bytes(overlay), media_type="image/png")
        counts = np.bincount(label_map.ravel().astype(np.int64) + 1, minlength=len(options.labels) + 1)  # [C + 1]
        total = max(1, label_map.size)
        now = time.monotonic()
        body = {
            "classes": list(options.labels),
            "shares": [float(count) / total for count in counts[1:]],
            "background_share": float(counts[0]) / total,
            "palette": palette(len(options.labels)).tolist(),
            "height": int(label_map.shape[0]),
            "width": int(label_map.shape[1]),
            "labels_png": base64.b64encode(png_bytes(result.label_image())).decode("ascii"),
            "scores_npy": npy_base64(result.scores) if options.with_scores else None,
            "method": batcher.segmenter.method,
            "templates": options.templates,
            "batch_size": job.batch_size,
            "timing_ms": {
                "queue": round(((job.started or now) - job.enqueued) * 1000, 3),
                "total": round((now - arrival) * 1000, 3),
            },
        }
        return JSONResponse(body)

    async def segment_request(request: Request, ticket: Any, arrival: float) -> Response:
        segmenter = model()
        body, multipart, query = await read_upload(request)
        as_png = wants_png(request.headers.get("accept"))

        def parse_and_prepare(data: bytearray) -> tuple[SegmentOptions, Prepared]:  # on a CPU thread
            upload = parse_upload(data, multipart, query)
            options = parse_segment_options(upload.fields, settings, segmenter.image_size, segmenter.patch_size)
            return options, prepare(upload.image, options, segmenter, as_png)

        options, prepared = await anyio.to_thread.run_sync(parse_and_prepare, body, limiter=cpu_slots)
        del body
        key = SegmentKey(options, tuple(prepared.pixels.shape))
        (labels, scores), job = await run_model(key, _segment_group, prepared, ticket, images=1)
        return await anyio.to_thread.run_sync(
            render, labels, scores, options, prepared, as_png, job, arrival, limiter=cpu_slots
        )

    @app.post(
        f"/{API_VERSION}/segment",
        tags=["segmentation"],
        summary="Segment one image into the given classes",
        description="Send the image as multipart/form-data (field `file`, options as fields or query parameters) "
        "or as the raw body (Content-Type image/* or application/octet-stream, options as query parameters). "
        "Answers JSON: `classes`, `shares` (pixel share per class), `background_share`, `palette` (RGB per "
        "class), `height`, `width`, `labels_png` (base64 PNG: pixel value = class index, 255 = background; "
        "16-bit grey over 255 classes), `scores_npy` (with `with_scores=true`: base64 NumPy .npy, float32 "
        "[H, W], the winning class's probability), `batch_size`, `timing_ms`. With `Accept: image/png` the "
        "answer is the overlay PNG.",
        openapi_extra=_segment_openapi(),
    )
    async def segment(request: Request) -> Response:
        arrival = time.monotonic()
        ticket = admit()
        try:
            return await within_timeout(segment_request(request, ticket, arrival))
        finally:
            ticket.release()

    @app.post(
        f"/{API_VERSION}/embed-labels",
        tags=["segmentation"],
        summary="Compute and cache the text embeddings of class names (warm-up)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": EmbedRequest.model_json_schema()}},
            }
        },
    )
    async def embed_labels(request: Request) -> dict:
        model()
        # Read under a bound before parsing (FastAPI would read and parse a body of any size first).
        body = await read_body(request.stream(), request.headers.get("content-length"), MULTIPART_OVERHEAD)
        try:
            asked = EmbedRequest.model_validate_json(body)
        except ValidationError as error:
            raise RequestValidationError(error.errors()) from None
        labels = parse_labels(asked.labels, settings)
        templates = asked.templates or settings.templates
        if templates not in TEMPLATE_PRESETS:
            raise ApiError(422, "bad_option", f"templates must be one of {', '.join(TEMPLATE_PRESETS)}")
        ticket = admit()
        try:
            outcome, _ = await within_timeout(run_model((labels, templates), _embed_group, None, ticket, images=0))
        finally:
            ticket.release()
        return {"classes": list(labels), "templates": templates, "embedding_shape": list(outcome)}

    return app


def label_map_from_png(data: bytes, num_classes: int) -> np.ndarray:
    """A ``labels_png`` back to ``[H, W]`` int16 labels (-1 background): for clients and tests."""
    image = Image.open(io.BytesIO(data))
    values = np.asarray(image).astype(np.int64)
    from pacl_fast.results import PNG_BACKGROUND_8BIT, PNG_BACKGROUND_16BIT

    background = PNG_BACKGROUND_8BIT if num_classes <= 255 else PNG_BACKGROUND_16BIT
    return np.where(values == background, -1, values).astype(np.int16)


__all__: Sequence[str] = ("create_app", "label_map_from_png", "wants_png", "EmbedRequest")
