"""``pacl-fast serve`` (and ``python -m pacl_fast.serve``): the HTTP service's command line.

Light on purpose: nothing here imports torch, FastAPI or uvicorn until the command runs, so that
``pacl-fast --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence
from contextlib import contextmanager

from pacl_fast.cli.common import (
    HELP,
    Subcommands,
    UsageError,
    add_model_arguments,
    check_weights_files,
    checked_number,
    make_segmenter,
    positive_int,
    run_command,
)
from pacl_fast.serve.settings import DEFAULT_MAX_PIXELS, TEMPLATE_PRESETS, ServeSettings

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Serve segmentation over HTTP: POST /v1/segment (an image and class names in, a label map out), "
    "/v1/embed-labels, /v1/info, /healthz, /readyz, /metrics, OpenAPI docs at /docs, and a page to try it at /. "
    "Concurrent requests are batched (--max-batch, --max-wait-ms). The service is stateless: run one "
    "process per GPU (CUDA_VISIBLE_DEVICES) behind any HTTP load balancer to scale out."
)


def positive_float(name: str):
    return checked_number(name, float, lambda value: value > 0, "a positive number")


def non_negative_float(name: str):
    return checked_number(name, float, lambda value: value >= 0, "a number >= 0")


port_number = checked_number("--port", int, lambda value: 0 <= value <= 65535, "0..65535")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` options, on ``parser`` (the subcommand's, or ``python -m pacl_fast.serve``'s)."""
    defaults = ServeSettings()
    group = parser.add_argument_group("service")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    group.add_argument("--port", type=port_number, default=8000, help="TCP port")
    group.add_argument(
        "--max-batch", type=positive_int("--max-batch"), default=defaults.max_batch, help="images per model call"
    )
    group.add_argument(
        "--max-wait-ms",
        type=non_negative_float("--max-wait-ms"),
        default=defaults.max_wait_ms,
        help="how long a request waits for others to batch with when the model is idle",
    )
    group.add_argument(
        "--max-queue",
        type=positive_int("--max-queue"),
        default=defaults.max_queue,
        help="requests waiting for the model, at most; more are answered 503 with Retry-After",
    )
    group.add_argument(
        "--max-image-bytes",
        type=positive_int("--max-image-bytes"),
        default=defaults.max_image_bytes,
        help="largest upload (encoded bytes); more is answered 413",
    )
    group.add_argument(
        "--max-pixels",
        type=positive_int("--max-pixels"),
        default=DEFAULT_MAX_PIXELS,
        help="largest image (width x height), checked before decoding; more is answered 413",
    )
    group.add_argument(
        "--max-labels", type=positive_int("--max-labels"), default=defaults.max_labels, help="class names per request"
    )
    group.add_argument(
        "--timeout",
        type=positive_float("--timeout"),
        default=defaults.timeout,
        help="seconds to answer a request; past it the answer is 504 and queued work is dropped",
    )
    group.add_argument(
        "--templates",
        default=None,
        choices=TEMPLATE_PRESETS,
        help="prompt templates when a request names none (default: synthetic with --clip demo, else imagenet)",
    )
    group.add_argument("--no-access-log", action="store_true", help="do not log a line per request")
    add_model_arguments(
        parser,
        # --batch-size (images per encoder call) follows --max-batch unless given.
        batch_size={"default": None, "help": "images (or sliding windows) per encoder call (default: --max-batch)"},
        # Class names come from clients here: keep their embeddings in memory unless the operator opts in.
        no_text_cache={"action": "store_true", "default": True, "help": argparse.SUPPRESS},
    )
    group.add_argument(
        "--disk-text-cache",
        action="store_true",
        help="also keep class-name embeddings in the on-disk text cache (warm across restarts and replicas "
        "of one machine); clients' label sets then write cache files, bounded by the cache's size cap",
    )


def add_parser(sub: Subcommands) -> None:
    """Register ``pacl-fast serve`` on the CLI's subcommands."""
    parser = sub.add_parser(
        "serve",
        formatter_class=HELP,
        help="HTTP segmentation service with dynamic batching, and a web page to try it",
        description=DESCRIPTION,
    )
    configure_parser(parser)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    templates = args.templates or ("synthetic" if args.clip == "demo" else "imagenet")
    try:
        return ServeSettings(
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            max_image_bytes=args.max_image_bytes,
            max_pixels=args.max_pixels,
            max_labels=args.max_labels,
            timeout=args.timeout,
            templates=templates,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error


@contextmanager
def _quiet_after_shutdown():
    """uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it found:
    let that handler be a no-op so that a clean stop exits 0 (not 130, or killed by SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda number, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resolve_model_options(args: argparse.Namespace) -> None:
    """The serve defaults of the shared model options: encoder batch = ``--max-batch``; disk text cache opt-in."""
    if args.batch_size is None:
        args.batch_size = args.max_batch
    if getattr(args, "disk_text_cache", False):
        args.no_text_cache = False


def run(args: argparse.Namespace) -> int:
    """Load the model on the service's worker thread and serve until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    from pacl_fast.serve.app import create_app

    check_weights_files(args)
    settings = settings_from_args(args)
    resolve_model_options(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: the service has no authentication; put it behind your own proxy", args.host)

    def build():
        return make_segmenter(args, args.device, max_pixels=args.max_pixels)

    server: uvicorn.Server | None = None

    def stop(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(build, settings, on_fatal=stop)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=max(5, int(settings.timeout)),
    )
    server = uvicorn.Server(config)
    with _quiet_after_shutdown():
        server.run()
    error = app.state.batcher.load_error
    if error is not None:
        raise error
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pacl_fast.serve``: the same as ``pacl-fast serve``."""
    parser = argparse.ArgumentParser(prog="python -m pacl_fast.serve", description=DESCRIPTION, formatter_class=HELP)
    configure_parser(parser)
    return run_command("serve", run, parser.parse_args(argv))
