"""What routes depend on, read from ``request.app.state``: the settings, the batcher (and through it the
model), the metrics, the body readers' cap and the CPU threads. :func:`install_state` puts them there;
a route never reaches for anything else, so a route can run in any app that holds these."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Request

from pacl_fast.serve import errors
from pacl_fast.serve.batcher import Batcher, NotReady
from pacl_fast.serve.inputs import BodyReaders
from pacl_fast.serve.metrics import ServeMetrics
from pacl_fast.serve.settings import ServeSettings

if TYPE_CHECKING:
    from pacl_fast.segmenter import Segmenter


def install_state(app: FastAPI, batcher: Batcher, settings: ServeSettings, metrics: ServeMetrics) -> None:
    """Everything :mod:`pacl_fast.serve.routes` reads, on ``app.state``."""
    app.state.batcher, app.state.settings, app.state.metrics = batcher, settings, metrics
    app.state.body_readers = BodyReaders(settings.max_body_readers, metrics.body_readers)
    app.state.cpu_slots = anyio.CapacityLimiter(max(1, os.cpu_count() or 1))  # decoding, parsing, rendering


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


def get_metrics(request: Request) -> ServeMetrics:
    return request.app.state.metrics


def get_body_readers(request: Request) -> BodyReaders:
    return request.app.state.body_readers


def get_cpu_slots(request: Request) -> anyio.CapacityLimiter:
    return request.app.state.cpu_slots


def get_request_id(request: Request) -> str:
    return errors.request_id_of(request)


def ready_model(request: Request) -> Segmenter:
    """The model, or 503 while it loads, after it failed, while its worker is stuck, or while stopping."""
    batcher = get_batcher(request)
    try:
        batcher.check_ready()
    except NotReady as error:
        raise errors.not_ready(error, body_unread=request.method == "POST") from None
    return batcher.segmenter


Settings = Annotated[ServeSettings, Depends(get_settings)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
Metrics = Annotated[ServeMetrics, Depends(get_metrics)]
Readers = Annotated[BodyReaders, Depends(get_body_readers)]
CpuSlots = Annotated[anyio.CapacityLimiter, Depends(get_cpu_slots)]
RequestId = Annotated[str, Depends(get_request_id)]
Model = Annotated[Any, Depends(ready_model)]  # the Segmenter
