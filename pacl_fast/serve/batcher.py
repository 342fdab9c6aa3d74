"""Dynamic batching: concurrent requests queue up and one worker thread runs them through the model together.

The worker thread owns the model (it builds it, warms it up, and is the only thread that calls
it), so the event loop never blocks on the model and the text-embedding cache is never touched by
two threads at once. It waits for the first job, then up to ``max_wait_ms`` for more (or until
``max_batch`` have queued), takes them in arrival order, groups them by options and canvas size,
and calls :meth:`Segmenter.segment_prepared` once per group: the same batched call
``Segmenter.predict`` makes, so each answer equals ``predict`` on that image and those labels.

Backpressure: :meth:`Batcher.admit` refuses a request (:class:`QueueFull`) when ``max_queue``
requests already wait for the model. A request that times out is withdrawn: if the worker has not
taken it yet it is never run.

A worker stuck in one batch (a model call blocked on a FIFO, a hung driver) makes every later request
time out: past ``stuck_after`` seconds in one batch the status is ``stuck``, so readiness fails and
new requests are refused at once, and the worker's stack is logged once to show where it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pacl_fast.serve.metrics import ServeMetrics

if TYPE_CHECKING:
    from pacl_fast.segmenter import Segmenter

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """``max_queue`` requests are already waiting; ``retry_after`` is a guess in whole seconds."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the queue is full ({depth} requests waiting); retry in {retry_after} s")
        self.depth, self.retry_after = depth, retry_after


class NotReady(Exception):
    """The model is still loading (or failed to load, or the service is stopping)."""


@dataclass(eq=False)
class Ticket:
    """One admitted request's place in the queue, released when the worker takes its job (or it gives up)."""

    batcher: Batcher
    released: bool = False

    def release(self) -> None:
        self.batcher._release(self)


@dataclass(eq=False)
class Job:
    """A unit of model work. ``run(segmenter, jobs)`` does one group's work; results resolve ``future``."""

    key: Hashable  # jobs with equal keys run in one call
    run: Callable[[Segmenter, list[Job]], Sequence[Any]]  # one result (or exception) per job
    payload: Any
    ticket: Ticket
    future: asyncio.Future
    images: int = 0  # images this job adds to a model batch (0 for text-only work)
    request_id: str = "-"  # the request's id, for the log
    enqueued: float = field(default_factory=time.monotonic)
    withdrawn: bool = False
    started: float | None = None
    batch_size: int = 0

    def resolve(self, outcome: Any) -> None:
        def settle() -> None:
            if self.future.done():  # the request gave up (timeout) or went away
                return
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting any more
            self.future.get_loop().call_soon_threadsafe(settle)


class Batcher:
    """The queue and the worker thread that owns the model.

    Args:
        segmenter: a built :class:`Segmenter`, or a function that builds one (called on the
            worker thread, so a service can answer ``/healthz`` while a large model loads).
        max_batch: images per model call, at most.
        max_wait_ms: how long the oldest queued job waits for company before its batch runs.
        max_queue: admitted requests waiting for the model, at most.
        metrics: where queue depth, batch sizes and model time are recorded.
        warmup: work run once on the worker after loading, before :attr:`ready` is set.
        stuck_after: seconds one batch may run before the worker counts as stuck (None: never).
    """

    def __init__(
        self,
        segmenter: Segmenter | Callable[[], Segmenter],
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: ServeMetrics,
        warmup: Callable[[Segmenter], None] | None = None,
        stuck_after: float | None = None,
    ):
        self._factory = segmenter if callable(segmenter) and not hasattr(segmenter, "segment_prepared") else None
        self.segmenter: Segmenter | None = None if self._factory else segmenter
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.metrics = metrics
        self._warmup = warmup
        self._pending: deque[Job] = deque()
        self._waiting = 0  # admitted tickets not yet released
        self._cond = threading.Condition()
        self._stop = False
        self._holds = 0
        self._batch_seconds = 0.0  # moving average of a batch's model time (for Retry-After)
        self.stuck_after = stuck_after
        self._running_since: float | None = None  # when the batch running now started (None: idle)
        self._stuck_logged: float | None = None  # the batch whose stuck worker was logged
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._thread = threading.Thread(target=self._work, name="pacl-serve-model", daemon=True)

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work; jobs still queued fail with :class:`NotReady`; wait for the running batch."""
        with self._cond:
            self._stop = True
            stranded = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in stranded:
            job.ticket.release()
            job.resolve(NotReady("the service is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def status(self) -> str:
        """``loading``, ``ready``, ``stuck`` (one batch has run past ``stuck_after``), ``failed`` or ``stopped``."""
        if self.load_error is not None:
            return "failed"
        if self._stop:
            return "stopped"
        if not self.ready.is_set():
            return "loading"
        return "stuck" if self.running_for() > (self.stuck_after or math.inf) else "ready"

    def running_for(self) -> float:
        """Seconds the batch running now has run (0 when the worker is idle)."""
        since = self._running_since
        return 0.0 if since is None else time.monotonic() - since

    def stuck_detail(self) -> str:
        """Why the status is ``stuck``, in words; the worker's stack goes to the log once per batch."""
        since, seconds = self._running_since, self.running_for()
        if since is not None and self._stuck_logged != since:
            self._stuck_logged = since
            frame = sys._current_frames().get(self._thread.ident)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)\n"
            logger.error("the model worker has run one batch for %.1f s; it waits here:\n%s", seconds, stack)
        return f"the model worker has run one batch for {seconds:.0f} s, over the {self.stuck_after:g} s bound"

    @contextmanager
    def hold(self):
        """Take no new batches while inside (requests queue up, and time out as usual): for draining and tests."""
        with self._cond:
            self._holds += 1
        try:
            yield self
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    # ----------------------------------------------------------------------------- the request side

    @property
    def depth(self) -> int:
        """Requests admitted and not yet taken by the worker."""
        return self._waiting

    @property
    def queued(self) -> int:
        """Jobs handed to the worker (decoded and prepared) and not yet taken into a batch."""
        with self._cond:
            return len(self._pending)

    def check_ready(self) -> None:
        """:class:`NotReady` saying why (``the model is loading``; ``stuck`` with how long) unless the status is
        ``ready``: the one refusal of both doors, a route's model dependency and :meth:`admit`."""
        status = self.status
        if status != "ready":
            raise NotReady(f"the model is {status}" + (f": {self.stuck_detail()}" if status == "stuck" else ""))

    def admit(self) -> Ticket:
        """A place in the queue, or :class:`QueueFull` / :class:`NotReady` at once."""
        self.check_ready()
        with self._cond:
            if self._waiting >= self.max_queue:
                raise QueueFull(self._waiting, self.retry_after())
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
        return Ticket(self)

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.released:
                return
            ticket.released = True
            self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by a batch: the queued batches times a batch's model time."""
        batches = self._waiting / self.max_batch + 1
        return int(min(60, max(1, math.ceil(batches * self._batch_seconds))))

    def submit(self, job: Job) -> None:
        """Queue ``job`` (its ticket admitted); the worker resolves ``job.future``."""
        with self._cond:
            if self._stop:
                job.ticket.release()
                raise NotReady("the service is shutting down")
            self._pending.append(job)
            self._cond.notify_all()

    def withdraw(self, job: Job) -> bool:
        """The request gave up. True: the job was still queued and will never run; False: it runs or ran."""
        with self._cond:
            job.withdrawn = True
            try:
                self._pending.remove(job)
            except ValueError:
                return False
        job.ticket.release()
        return True

    # ----------------------------------------------------------------------------- the worker

    def _take(self) -> list[Job] | None:
        """Block until a batch is due; None when stopping."""
        with self._cond:
            while True:
                while not self._stop and (not self._pending or self._holds):
                    self._cond.wait()
                if self._stop:
                    return None
                deadline = self._pending[0].enqueued + self.max_wait
                while not self._stop and not self._holds and self._images_pending() < self.max_batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stop:
                    return None
                if self._holds or not self._pending:
                    continue
                batch, images = [], 0
                while self._pending and (not batch or images + self._pending[0].images <= self.max_batch):
                    job = self._pending.popleft()
                    batch.append(job)
                    images += job.images
                break
        for job in batch:
            job.ticket.release()
        return batch

    def _images_pending(self) -> int:
        return sum(max(job.images, 1) for job in self._pending)

    def _work(self) -> None:
        try:
            if self._factory is not None:
                self.segmenter = self._factory()
            logger.info("model loaded: %r", self.segmenter)
            if self._warmup is not None:
                self._warmup(self.segmenter)
        except BaseException as error:  # reported by /readyz, and the process is told to stop
            logger.exception("the model failed to load")
            self.load_error = error
            if self.on_fatal is not None:
                self.on_fatal(error)
            return
        self.ready.set()
        logger.info("ready")
        while (batch := self._take()) is not None:
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        groups: dict[Hashable, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.key, []).append(job)
        for members in groups.values():
            members = [job for job in members if not job.withdrawn]
            if not members:
                continue
            start = time.monotonic()
            for job in members:
                job.started = start
                job.batch_size = len(members)
                self.metrics.queue_wait.observe(start - job.enqueued)
            self._running_since = start
            try:
                outcomes = list(members[0].run(self.segmenter, members))
                if len(outcomes) != len(members):
                    raise RuntimeError(f"a batch of {len(members)} jobs returned {len(outcomes)} results")
            except Exception as error:  # one failed group fails its own requests only
                # Each request logs the error with its traceback under its id (errors.model_failure).
                ids = ", ".join(job.request_id for job in members)
                logger.error("batch of %d failed (requests %s): %s", len(members), ids, type(error).__name__)
                outcomes = [error] * len(members)
            finally:
                self._running_since = None
            seconds = time.monotonic() - start
            images = sum(job.images for job in members)
            if images:
                self.metrics.batch_images.observe(images)
                self.metrics.batch_seconds.observe(seconds)
                self._batch_seconds = seconds if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * seconds
            for job, outcome in zip(members, outcomes):
                job.resolve(outcome)

