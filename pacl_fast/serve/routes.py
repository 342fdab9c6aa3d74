"""The service's routes, on one :class:`~fastapi.APIRouter`: the page, health, metrics, and the API under ``/v1``.

Each route reads what it needs through :mod:`pacl_fast.serve.deps` (from ``request.app.state``), so
any app that holds that state can serve it. ``POST /v1/segment``, in order:

1. the model is ready (else 503), the Content-Type is an upload (else 415);
2. the body is read under a body reader's place (:class:`~pacl_fast.serve.inputs.BodyReaders`, 503
   over the cap), within ``body_timeout`` (408) and under its byte bound (413), then its options are
   parsed on a CPU thread (4xx naming the field);
3. only then a place in the model's queue (503 ``queue_full``): a slow client never holds one;
4. the image decoded and prepared on a CPU thread (``Segmenter.preprocessor``, as predict does),
   queued for the model's worker (:mod:`pacl_fast.serve.batcher`), and the answer rendered on a CPU
   thread (:mod:`pacl_fast.serve.render`); past ``timeout`` from arrival the answer is 504.
"""

from __future__ import annotations

import functools
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pacl_fast.serve import jobs
from pacl_fast.serve.deps import BatcherDep, CpuSlots, Metrics, Model, Readers, RequestId, Settings
from pacl_fast.serve.inputs import (
    ALLOWED_FORMATS,
    FILE_FIELD,
    MULTIPART_OVERHEAD,
    SEGMENT_OPTIONS,
    BodyReaders,
    EmbedRequest,
    SegmentOptions,
    Upload,
    default_sliding_window,
    parse_embed_request,
    parse_segment_options,
    parse_upload,
    read_body,
    upload_kind,
)
from pacl_fast.serve.render import segmentation_answer, wants_png
from pacl_fast.serve.settings import TEMPLATE_PRESETS, ServeSettings

if TYPE_CHECKING:
    from pacl_fast.segmenter import Segmenter

API_VERSION = "v1"
#: The page loads nothing from anywhere but this server.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: The page's files: a fixed list (no path from a request ever reaches the file system).
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}

router = APIRouter()


@functools.cache
def static_bytes(name: str) -> bytes:
    """A file of the page, read once from the package."""
    return (resources.files("pacl_fast.serve") / "static" / name).read_bytes()


def label_presets() -> dict[str, tuple[str, ...]]:
    """Class-name lists the page offers (VOC without its background class: every name is asked for)."""
    from pacl_fast.data.segmentation import ADE20K_CLASSES, CITYSCAPES_CLASSES, VOC_CLASSES
    from pacl_fast.data.synthetic import CLASS_NAMES

    return {"voc": VOC_CLASSES[1:], "ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "shapes": CLASS_NAMES}


# ----------------------------------------------------------------------------- the page, health, metrics


@router.get("/", include_in_schema=False)
async def index() -> Response:
    headers = {"Content-Security-Policy": PAGE_CSP}
    return Response(static_bytes("index.html"), media_type="text/html; charset=utf-8", headers=headers)


def _static_route(name: str, media_type: str) -> None:
    async def serve_asset() -> Response:
        return Response(static_bytes(name), media_type=media_type, headers={"Cache-Control": "no-cache"})

    router.add_api_route(f"/static/{name}", serve_asset, methods=["GET"], include_in_schema=False)


for _name, _media_type in STATIC_FILES.items():
    _static_route(_name, _media_type)


@router.get("/healthz", tags=["health"], summary="The process answers (liveness)")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="The model is loaded, warmed up and its worker not stuck (readiness)")
async def readyz(batcher: BatcherDep) -> JSONResponse:
    status = batcher.status
    body: dict[str, Any] = {"status": status}
    if status == "failed":  # the error's text may name server files: it is in the log, not here
        body["detail"] = f"{type(batcher.load_error).__name__}: the model failed to load; the server log has why"
    elif status == "stuck":
        body["detail"] = batcher.stuck_detail()
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics (text format)")
async def metrics_text(metrics: Metrics) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)


# ----------------------------------------------------------------------------- the API


def request_defaults(segmenter: Segmenter, settings: ServeSettings) -> dict[str, Any]:
    """What a ``/v1/segment`` request that names no option gets (the page starts from these): the model's
    defaults (``Segmenter.defaults``, as ``predict`` and ``pacl-fast segment`` use them), the templates of
    ``--templates`` if the operator set them, the input size and logit scale the service runs with."""
    asked = segmenter.resolve(settings.templates)
    window = asked.sliding_window
    return {
        **segmenter.defaults.to_dict(),
        "templates": asked.templates if isinstance(asked.templates, str) else list(asked.templates),
        "background_threshold": asked.background_threshold,
        "sliding_window": None if window is None else [window.crop, window.stride, window.short_side],
        "image_size": segmenter.image_size,
        "logit_scale": segmenter.logit_scale,
    }


@router.get(f"/{API_VERSION}/info", tags=["segmentation"], summary="The model, its method, limits and presets")
async def info(segmenter: Model, settings: Settings) -> dict:
    crop, stride, short = default_sliding_window(segmenter)
    defaults = request_defaults(segmenter, settings)
    return {
        "service": "pacl-fast",
        "api": API_VERSION,
        "method": segmenter.method,
        "model": segmenter.name,  # what people read: demo, ViT-B-16@openai, local-dir:<folder>
        "identity": segmenter.identity,  # the full CLIP identity (weights hashes), for operators
        "model_id": segmenter.model_id,  # what run records key on: CLIP, method, PACL weights, precision
        "segmenter": repr(segmenter),
        "encoder": segmenter.encoder.name,
        "precision": segmenter.precision,
        "choices": segmenter.choices,  # which encoder and precision run, and why
        "image_size": segmenter.image_size,
        "patch_size": segmenter.patch_size,
        "pixel_multiple": segmenter.pixel_multiple,
        "grid_patch": segmenter.grid_patch,
        "vfm": segmenter.vfm,
        "templates": list(TEMPLATE_PRESETS),
        "defaults": defaults,
        "default_templates": defaults["templates"],
        "default_sliding_window": f"{crop},{stride}" + (f",{short}" if short else ""),
        "options": list(SEGMENT_OPTIONS),
        "formats": list(ALLOWED_FORMATS),
        "limits": {
            "max_batch": settings.max_batch,
            "max_queue": settings.max_queue,
            "max_image_bytes": settings.max_image_bytes,
            "max_pixels": min(settings.max_pixels, segmenter.max_pixels),
            "max_labels": settings.max_labels,
            "timeout_s": settings.timeout,
            "body_timeout_s": settings.body_timeout,
            "max_body_readers": settings.max_body_readers,
        },
        "label_presets": {name: list(names) for name, names in label_presets().items()},
    }


def body_seconds(settings: ServeSettings) -> float:
    """The body's deadline: ``body_timeout``, or ``timeout`` if that is shorter."""
    return min(settings.body_timeout, settings.timeout)


async def read_segment_request(
    request: Request,
    segmenter: Segmenter,
    settings: ServeSettings,
    readers: BodyReaders,
    cpu: anyio.CapacityLimiter,
    arrival: float,
) -> tuple[Upload, SegmentOptions]:
    """Steps 1-2: the body under a reader's place and the deadlines, then the options (on a CPU thread)."""
    content_type = request.headers.get("content-type", "")
    multipart = upload_kind(content_type)
    query: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        query.setdefault(name, []).append(value)
    limit = settings.max_image_bytes + (MULTIPART_OVERHEAD if multipart else 0)

    with readers.slot():
        body = await read_body(request.stream(), request.headers.get("content-length"), limit, body_seconds(settings))

        def parse() -> tuple[Upload, SegmentOptions]:
            upload = parse_upload(body, content_type if multipart else None, query)
            options = parse_segment_options(upload.fields, settings, segmenter)
            return upload, options

        parsing = anyio.to_thread.run_sync(parse, limiter=cpu)
        return await jobs.by_deadline(arrival + settings.timeout, parsing, settings.timeout)


def _segment_openapi() -> dict:
    """OpenAPI of ``POST /v1/segment``, which reads its body itself (bounded, in memory)."""
    option_schema = {
        "labels": {"type": "string", "description": "class names, comma-separated (or a JSON list)"},
        "templates": {"type": "string", "enum": list(TEMPLATE_PRESETS), "description": "default: the model's"},
        "background_threshold": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "default: the model's (/v1/info defaults); 0: none",
        },
        "sliding_window": {
            "type": "string",
            "description": "true, false, or CROP,STRIDE[,SHORT] in pixels; default: the model's",
        },
        "with_scores": {"type": "boolean", "description": "add the winner scores (float32 .npy, base64)"},
    }
    binary = {"schema": {"type": "string", "format": "binary"}}
    form = {"type": "object", "required": [FILE_FIELD, "labels"],
            "properties": {FILE_FIELD: {"type": "string", "format": "binary"}, **option_schema}}  # fmt: skip
    return {
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": schema} for name, schema in option_schema.items()
        ],
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": form}, "image/*": binary, "application/octet-stream": binary},
        },
        "responses": {
            "200": {
                "description": "JSON (see the README), or the overlay PNG with Accept: image/png",
                "content": {"image/png": binary},
            }
        },
    }


SEGMENT_DESCRIPTION = (
    "Send the image as multipart/form-data (field `file`, options as fields or query parameters) or as the raw "
    "body (Content-Type image/* or application/octet-stream, options as query parameters). Options left out "
    "are the model's defaults (`defaults` in /v1/info), as the library and the command line use them. Answers JSON: "
    "`classes`, `shares` (pixel share per class), `background_share`, `palette` (RGB per class), `height`, "
    "`width`, `labels_png` (base64 PNG: pixel value = class index, 255 = background; 16-bit grey over 255 "
    "classes, 65535 = background), `scores_npy` (with `with_scores=true`: base64 NumPy .npy, float32 [H, W], the "
    "winning class's probability), `batch_size`, `timing_ms`. With `Accept: image/png` the answer is the overlay "
    "PNG. The whole body must arrive within the server's body timeout (408 after)."
)


@router.post(
    f"/{API_VERSION}/segment",
    tags=["segmentation"],
    summary="Segment one image into the given classes",
    description=SEGMENT_DESCRIPTION,
    openapi_extra=_segment_openapi(),
)
async def segment(
    request: Request,
    segmenter: Model,
    settings: Settings,
    batcher: BatcherDep,
    readers: Readers,
    cpu: CpuSlots,
    request_id: RequestId,
) -> Response:
    arrival = time.monotonic()
    as_png = wants_png(request.headers.get("accept"))
    upload, options = await read_segment_request(request, segmenter, settings, readers, cpu, arrival)
    ticket = jobs.admit(batcher)  # step 3: only now, with the body read and parsed

    async def answer() -> Response:
        prepared = await anyio.to_thread.run_sync(
            jobs.prepare, upload.image, options, segmenter, settings, as_png, limiter=cpu
        )
        key = jobs.SegmentKey.of(options, tuple(prepared.pixels.shape))
        payload = jobs.SegmentPayload(prepared, options)
        job = jobs.new_job(key, jobs.segment_group, payload, ticket, images=1, request_id=request_id)
        labels, scores = await jobs.run_job(batcher, job)
        render = functools.partial(
            segmentation_answer, as_png=as_png, method=segmenter.method, job=job, arrival=arrival
        )
        return await anyio.to_thread.run_sync(render, labels, scores, options, prepared, limiter=cpu)

    try:
        return await jobs.by_deadline(arrival + settings.timeout, answer(), settings.timeout)
    finally:
        ticket.release()


@router.post(
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
async def embed_labels(
    request: Request,
    segmenter: Model,
    settings: Settings,
    batcher: BatcherDep,
    readers: Readers,
    request_id: RequestId,
) -> dict:
    arrival = time.monotonic()
    # Read under a bound before parsing (FastAPI would read and parse a body of any size first).
    with readers.slot():
        length = request.headers.get("content-length")
        body = await read_body(request.stream(), length, MULTIPART_OVERHEAD, body_seconds(settings))
    labels, templates = parse_embed_request(body, settings, segmenter)
    ticket = jobs.admit(batcher)
    try:
        job = jobs.new_job((labels, templates), jobs.embed_group, None, ticket, images=0, request_id=request_id)
        shape = await jobs.by_deadline(arrival + settings.timeout, jobs.run_job(batcher, job), settings.timeout)
    finally:
        ticket.release()
    return {"classes": list(labels), "templates": templates, "embedding_shape": list(shape)}
