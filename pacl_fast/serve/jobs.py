"""The model's work for the service: what a request prepares on a CPU thread, the key that decides which
jobs share a model call, what the worker runs for a group, and the request's wait for its answer."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from PIL import Image

from pacl_fast.serve import errors
from pacl_fast.serve.batcher import Batcher, Job, NotReady, QueueFull, Ticket
from pacl_fast.serve.errors import ApiError
from pacl_fast.serve.inputs import SegmentOptions, open_image
from pacl_fast.serve.settings import ServeSettings

if TYPE_CHECKING:
    from pacl_fast.images import Prepared
    from pacl_fast.segmenter import Segmenter

T = TypeVar("T")


@dataclass(frozen=True)
class SegmentKey:
    """Jobs that may share one ``segment_prepared`` call: equal in every option and in canvas size.

    Built from every field of :class:`SegmentOptions` by name (:meth:`of`), so an option added there
    separates batches without anyone remembering to add it here.
    """

    options: tuple[tuple[str, Hashable], ...]
    canvas: tuple[int, ...]

    @classmethod
    def of(cls, options: SegmentOptions, canvas: tuple[int, ...]) -> SegmentKey:
        return cls(tuple((spec.name, getattr(options, spec.name)) for spec in dataclasses.fields(options)), canvas)


@dataclass(frozen=True)
class SegmentPayload:
    """One segmentation job's input: the prepared image and the options it was parsed with."""

    prepared: Prepared
    options: SegmentOptions


def warmup(model: Segmenter, templates: str | None) -> None:
    """Text tower, image tower and head once each, so that the first request pays no lazy set-up
    (``templates``: the service's default; None: the model's)."""
    blank = Image.new("RGB", (model.image_size, model.image_size), (128, 128, 128))
    prepared = model.preprocessor()(blank)
    embeddings = model.encode_labels(("object",), templates)
    model.segment_prepared([prepared], embeddings)


def segment_group(segmenter: Segmenter, jobs: list[Job]) -> list:
    """Worker side: one ``segment_prepared`` call for jobs of equal options and canvas size."""
    from pacl_fast.images import SlidingWindow

    options: SegmentOptions = jobs[0].payload.options
    embeddings = segmenter.encode_labels(options.labels, options.templates)  # [C, E], cached
    window = SlidingWindow(*options.sliding_window) if options.sliding_window else None
    # Scores are always computed, as predict does: the labels then equal predict's exactly.
    return segmenter.segment_prepared(
        [job.payload.prepared for job in jobs],
        embeddings,
        sliding_window=window,
        background_threshold=options.background_threshold,
        with_scores=True,
    )


def embed_group(segmenter: Segmenter, jobs: list[Job]) -> list:
    """Worker side: the text embeddings of one label set (cached by the model), their shape per job."""
    labels, templates = jobs[0].key
    embeddings = segmenter.encode_labels(labels, templates)  # [C, E]
    return [tuple(embeddings.shape)] * len(jobs)


def prepare(data: bytes, options: SegmentOptions, segmenter: Segmenter, settings: ServeSettings, keep_image: bool
            ) -> Prepared:  # fmt: skip
    """CPU thread: bytes -> decoded image -> the model input (``Segmenter.preprocessor``, as predict does).
    Everything about the image a client can get wrong is found here, before the job is queued."""
    from pacl_fast.images import SlidingWindow

    max_pixels = min(settings.max_pixels, segmenter.max_pixels)
    image = open_image(data, max_pixels, settings.max_image_bytes)
    window = SlidingWindow(*options.sliding_window) if options.sliding_window else None
    try:
        prepared = segmenter.preprocessor(window, keep_images=keep_image)(image)
    except (ValueError, TypeError) as error:
        raise ApiError(422, "bad_image", str(error)) from None
    if window is not None:
        count = len(window.origins(prepared.geometry.canvas_size, segmenter.pixel_multiple))
        if count > settings.max_windows:
            raise ApiError(
                422, "bad_option", f"sliding_window makes {count} windows, over the limit of {settings.max_windows}"
            )
    return prepared


def admit(batcher: Batcher) -> Ticket:
    """A place in the model's queue, or 503 at once."""
    try:
        return batcher.admit()
    except NotReady as error:
        raise errors.not_ready(error) from None
    except QueueFull as error:
        raise errors.queue_full(error) from None


async def run_job(batcher: Batcher, job: Job) -> Any:
    """Queue ``job`` and wait for its outcome; a cancelled wait (timeout) withdraws it. A failure of the
    model on it is a 5xx (:func:`errors.model_failure`)."""
    try:
        batcher.submit(job)
    except NotReady as error:
        raise errors.not_ready(error) from None
    try:
        return await job.future
    except asyncio.CancelledError:
        batcher.metrics.dropped.labels("queued" if batcher.withdraw(job) else "running").inc()
        raise
    except Exception as error:  # the model's failure on this job (the batcher sets it on the future)
        raise errors.model_failure(error, job.request_id) from None


def new_job(key: Hashable, run: Callable, payload: Any, ticket: Ticket, images: int, request_id: str) -> Job:
    """A job whose outcome resolves a future of the running event loop."""
    future = asyncio.get_running_loop().create_future()
    return Job(key=key, run=run, payload=payload, ticket=ticket, future=future, images=images, request_id=request_id)


async def by_deadline(deadline: float, work: Awaitable[T], timeout: float) -> T:
    """``work`` done by the monotonic ``deadline``, else 504 (``timeout``: the seconds named in it)."""
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise errors.timed_out(timeout) from None
