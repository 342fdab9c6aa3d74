"""What a ``pacl-fast serve`` process allows and how it batches: :class:`ServeSettings`, and the presets.

Kept free of torch and FastAPI imports so that ``pacl-fast serve --help`` stays instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pacl_fast.choices import DEFAULT_MAX_PIXELS, TEMPLATE_PRESETS


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one service process (the ``pacl-fast serve`` options of the same names).

    Attributes:
        max_batch: images run through the model together, at most.
        max_wait_ms: how long the first queued request waits for others before its batch runs.
        max_queue: requests admitted and waiting for the model (being decoded or queued), at most;
            the next one is answered 503 with ``Retry-After``.
        max_image_bytes: largest encoded image accepted (the request body is cut off past it).
        max_pixels: largest decoded image (width x height), checked from the header before decoding.
        max_labels: most class names in one request.
        max_label_chars: longest class name.
        timeout: seconds from a request's arrival to its answer; past it the answer is 504 and work
            not started yet is dropped.
        templates: the template preset used when a request names none (``None``: ``imagenet``).
        max_windows: most sliding windows per image a request may ask for.
        warmup: run one image through the model before reporting ready.
        body_timeout: seconds from a request's arrival in which its whole body must arrive (408
            after; ``timeout`` if that is shorter): a slow client holds a body reader's place this
            long at most.
        max_body_readers: requests reading their bodies at once, at most, apart from ``max_queue``
            (a request takes its place in the model's queue only once its body is read and parsed);
            the next one is answered 503 with ``Retry-After``. Bodies held in memory are bounded by
            ``(max_body_readers + max_queue) * max_image_bytes``.
    """

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_image_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_labels: int = 200
    max_label_chars: int = 200
    timeout: float = 30.0
    templates: str = "imagenet"
    max_windows: int = 64
    warmup: bool = True
    body_timeout: float = field(
        default=15.0,
        metadata={"help": "seconds in which a request's whole body must arrive; past it the answer is 408 "
                  "(a slow client holds a body reader's place no longer)"},
    )  # fmt: skip
    max_body_readers: int = field(
        default=128,
        metadata={"help": "requests reading their bodies at once, apart from --max-queue (a request joins the "
                  "model's queue only once its body is read); more are answered 503 with Retry-After"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_image_bytes", "max_pixels", "max_labels", "max_label_chars",
                     "max_windows", "max_body_readers"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        if not (isinstance(self.body_timeout, (int, float)) and math.isfinite(self.body_timeout)
                and self.body_timeout > 0):  # fmt: skip
            raise ValueError(f"body_timeout must be a finite number of seconds > 0, got {self.body_timeout!r}")
        if self.templates not in TEMPLATE_PRESETS:
            raise ValueError(f"templates must be one of {', '.join(TEMPLATE_PRESETS)}, got {self.templates!r}")
