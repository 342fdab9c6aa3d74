"""The service's answers, rendered on a CPU thread: a segmentation as JSON (the label map as a PNG) or as
the overlay PNG, and the way back from a ``labels_png`` to labels for clients and tests."""

from __future__ import annotations

import base64
import io
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi.responses import JSONResponse, Response
from PIL import Image

from pacl_fast.serve.batcher import Job
from pacl_fast.serve.inputs import SegmentOptions

if TYPE_CHECKING:
    from pacl_fast.images import Prepared


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


def segmentation_answer(
    labels: Any,
    scores: Any,
    options: SegmentOptions,
    prepared: Prepared,
    *,
    as_png: bool,
    method: str,
    job: Job,
    arrival: float,
) -> Response:
    """The answer to ``POST /v1/segment``. Labels ``[H, W]`` int16 (-1 background), scores ``[H, W]`` float32."""
    from pacl_fast.images import to_uint8_hwc
    from pacl_fast.results import Segmentation, palette

    label_map = labels.numpy()  # [H, W]
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
        "method": method,
        "templates": options.templates,
        "batch_size": job.batch_size,
        "timing_ms": {
            "queue": round(((job.started or now) - job.enqueued) * 1000, 3),
            "total": round((now - arrival) * 1000, 3),
        },
    }
    return JSONResponse(body)


def label_map_from_png(data: bytes, num_classes: int) -> np.ndarray:
    """A ``labels_png`` back to ``[H, W]`` int16 labels (-1 background): for clients and tests."""
    from pacl_fast.results import PNG_BACKGROUND_8BIT, PNG_BACKGROUND_16BIT

    values = np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)  # [H, W]
    background = PNG_BACKGROUND_8BIT if num_classes <= 255 else PNG_BACKGROUND_16BIT
    return np.where(values == background, -1, values).astype(np.int16)
