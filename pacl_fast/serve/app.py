"""The FastAPI app of ``pacl-fast serve``: :func:`create_app` assembles it around one model.

The parts, each on its own: :mod:`~pacl_fast.serve.routes` (the API under ``/v1``, health, metrics,
the page at ``/``), :mod:`~pacl_fast.serve.deps` (what routes read from ``app.state``),
:mod:`~pacl_fast.serve.errors` (the one error map), :mod:`~pacl_fast.serve.middleware` (request ids,
metrics, the last-resort 500), :mod:`~pacl_fast.serve.jobs` (the model's work),
:mod:`~pacl_fast.serve.render` (the answers), :mod:`~pacl_fast.serve.batcher` (the model's worker).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from fastapi import FastAPI

from pacl_fast.serve import errors, jobs
from pacl_fast.serve.batcher import Batcher
from pacl_fast.serve.deps import install_state
from pacl_fast.serve.inputs import EmbedRequest
from pacl_fast.serve.metrics import ServeMetrics
from pacl_fast.serve.middleware import RequestMiddleware
from pacl_fast.serve.render import label_map_from_png, wants_png
from pacl_fast.serve.routes import API_VERSION, router
from pacl_fast.serve.settings import ServeSettings

if TYPE_CHECKING:
    from pacl_fast.segmenter import Segmenter


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
    batcher = Batcher(
        segmenter,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        metrics=metrics,
        warmup=(lambda model: jobs.warmup(model, settings.templates)) if settings.warmup else None,
        # A batch running past the timeout has failed every request in it, and all behind it wait.
        stuck_after=settings.timeout,
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
    install_state(app, batcher, settings, metrics)
    errors.install(app)
    app.add_middleware(RequestMiddleware, metrics=metrics)
    app.include_router(router)
    return app


#: ``create_app``, and names clients imported from here before they moved to their own modules.
__all__: Sequence[str] = ("create_app", "label_map_from_png", "wants_png", "EmbedRequest")
