"""The service's one error map: what each failure answers, and what goes to the server's log instead.

Two kinds of failure, never confused:

* **The client's mistake** (:class:`ApiError` raised where the request is read, FastAPI's validation
  errors, unknown paths): a 4xx whose ``detail`` names the field or limit, so the client can fix it.
* **A fault of the model or the server** (whatever the model's worker raises, anything unexpected):
  a 5xx that never blames the client and never repeats the exception's text, which may name server
  files (``Read-only file system: '/srv/cache/onnx/...'``). The client gets the kind of failure and
  its request id; the server's log gets the details under that id.

Every error body is ``{"error": kind, "detail": sentence, "request_id": id}``; the id is also the
``X-Request-ID`` header of every answer (:mod:`pacl_fast.serve.middleware` makes it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pacl_fast.serve.batcher import NotReady, QueueFull

logger = logging.getLogger(__name__)

#: Answers refused before the body was read close the connection: the unread body must not be taken
#: for the client's next request.
CLOSE = {"Connection": "close"}


class ApiError(Exception):
    """A request the service refuses: HTTP ``status``, a short ``kind`` and a sentence for people."""

    def __init__(self, status: int, kind: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = dict(headers or {})


# ----------------------------------------------------------------------------- what each failure answers


def not_ready(error: NotReady | str, *, body_unread: bool = False) -> ApiError:
    """503: the model is loading, failed, stuck or stopping."""
    headers = {"Retry-After": "5", **(CLOSE if body_unread else {})}
    return ApiError(503, "not_ready", str(error), headers)


def queue_full(error: QueueFull) -> ApiError:
    """503: ``max_queue`` requests already wait for the model."""
    return ApiError(503, "queue_full", str(error), {"Retry-After": str(error.retry_after), **CLOSE})


def timed_out(seconds: float) -> ApiError:
    """504: no answer within ``--timeout``; queued work is withdrawn by the caller."""
    return ApiError(504, "timeout", f"no answer within {seconds:g} s; the work was dropped")


def model_failure(error: BaseException, request_id: str) -> ApiError:
    """The model's worker failed on this request's job: a 5xx naming the kind of failure, never its text.

    A ValueError or TypeError from the model is the model's fault too: everything a client can get
    wrong is checked before its job is queued (:mod:`pacl_fast.serve.inputs`).
    """
    if isinstance(error, ApiError):
        return error
    if isinstance(error, NotReady):
        return not_ready(error)
    logger.error("request %s: the model failed: %s: %s", request_id, type(error).__name__, error, exc_info=error)
    return ApiError(
        500,
        "model_error",
        f"the model failed on this request ({type(error).__name__}); the server log has the details "
        f"under request id {request_id}",
    )


def internal_error(error: BaseException, request_id: str, path: str) -> ApiError:
    """An unexpected exception in the service itself: 500, the traceback to the log under the request id."""
    logger.error("request %s: unexpected error on %s", request_id, path, exc_info=error)
    return ApiError(
        500,
        "internal",
        f"internal error ({type(error).__name__}); the server log has the details under request id {request_id}",
    )


def validation_problems(error: RequestValidationError) -> ApiError:
    """422 from FastAPI's or pydantic's validation: each problem as ``field: message``."""
    problems = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        problems.append(f"{where or 'body'}: {problem.get('msg', 'invalid')}")
    return ApiError(422, "bad_request", "; ".join(problems) or "invalid request")


def http_problem(error: StarletteHTTPException) -> ApiError:
    """Starlette's own errors (unknown path, wrong method) in the service's shape."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return ApiError(error.status_code, kind, str(error.detail), getattr(error, "headers", None))


# ----------------------------------------------------------------------------- the answer


def request_id_of(request: Request) -> str:
    """The id :mod:`~pacl_fast.serve.middleware` gave this request (``-`` outside the middleware)."""
    return getattr(request.state, "request_id", "-")


def error_response(request: Request, error: ApiError) -> JSONResponse:
    """The JSON answer of ``error``, counted in ``pacl_serve_errors_total`` when the app has metrics."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(str(error.status), error.kind).inc()
    body = {"error": error.kind, "detail": error.message, "request_id": request_id_of(request)}
    return JSONResponse(body, status_code=error.status, headers=error.headers or None)


def install(app: FastAPI) -> None:
    """The handlers of the client's mistakes. Unexpected exceptions are answered by the middleware
    (:func:`internal_error`), which knows the request id and sees every route."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_problems(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(request, http_problem(error))
