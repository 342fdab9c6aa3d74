"""What every answer gets: a request id, ``nosniff``, a count and a time in the metrics, and a JSON 500
for an unexpected exception (pure ASGI: no task per request)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from starlette.requests import Request

from pacl_fast.serve import errors
from pacl_fast.serve.metrics import ServeMetrics
from pacl_fast.serve.routes import router

#: Endpoints named in metrics: the router's routes and FastAPI's own pages; anything else is counted as "other"
#: (bounded label values). Read from the router, so a new route is named without a second list to keep.
ENDPOINTS = frozenset({route.path for route in router.routes} | {"/docs", "/openapi.json"})


def new_request_id() -> str:
    """16 hex digits: short enough to read out, unique enough to find one request in a log."""
    return uuid.uuid4().hex[:16]


class RequestMiddleware:
    """Gives each request an id (``request.state.request_id``, the ``X-Request-ID`` header), counts every
    answer by endpoint and status code and times it, and answers an exception no handler took with
    :func:`errors.internal_error` (the traceback goes to the log, not to the client)."""

    def __init__(self, app: Callable, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.monotonic()
        status = {"code": 500, "started": False}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as error:
            if status["started"]:  # half an answer is out: nothing better to do than drop the connection
                raise
            request = Request(scope, receive)
            response = errors.error_response(request, errors.internal_error(error, request_id, scope["path"]))
            await response(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)
