"""``pacl-fast serve`` (and ``python -m pacl_fast.serve``): the HTTP service's command line.

Light on purpose: nothing here imports torch, FastAPI or uvicorn until the command runs, so that
``pacl-fast --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import signal
import socket
import threading
import typing
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import pacl_fast.cli.common as common
from pacl_fast.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Serve segmentation over HTTP: POST /v1/segment (an image and class names in, a label map out), "
    "/v1/embed-labels, /v1/info, /healthz, /readyz, /metrics, OpenAPI docs at /docs, and a page to try it at /. "
    "Concurrent requests are batched (--max-batch, --max-wait-ms). The service is stateless: run one "
    "process per GPU (CUDA_VISIBLE_DEVICES) behind any HTTP load balancer to scale out."
)


port_number = common.checked_number("--port", int, lambda value: 0 <= value <= 65535, "0..65535")

#: What a setting's text must be, by the field's type.
_EXPECTED = {int: "an integer", float: "a number", str: "text"}


def option_name(name: str) -> str:
    """``max_batch`` -> ``--max-batch``."""
    return "--" + name.replace("_", "-")


def setting_type(settings: type[ServeSettings], name: str, kind: type) -> Callable[[str], Any]:
    """An argparse ``type`` for field ``name``: the text as ``kind``, checked by the settings' own
    ``__post_init__`` (the other fields at their defaults), its message naming the option."""
    flag = option_name(name)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {_EXPECTED[kind]}, got {text!r}") from None
        try:
            settings(**{name: value})
        except ValueError as error:
            message = str(error)
            message = flag + message[len(name) :] if message.startswith(name + " ") else f"{flag}: {message}"
            raise argparse.ArgumentTypeError(message) from None
        return value

    return parse


def add_settings_options(group: common.Options, settings: type[ServeSettings] = ServeSettings) -> None:
    """One option per field of ``settings``, from its type and metadata (see :mod:`pacl_fast.serve.settings`),
    so that a new field is an option without a line here."""
    hints = typing.get_type_hints(settings)
    defaults = settings()
    for spec in dataclasses.fields(settings):
        meta = spec.metadata
        if "help" not in meta:
            raise TypeError(f"{settings.__name__}.{spec.name} needs metadata={{'help': ...}}: it is a serve option")
        kind = hints[spec.name]
        kinds = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]  # X | None -> X
        kind = kinds[0]
        default = meta.get("cli_default", getattr(defaults, spec.name))
        if kind is bool:
            flag = option_name(("no_" if default else "") + spec.name)
            action = "store_false" if default else "store_true"
            shown = meta["help"] + (" (default: off)" if default else "")  # not "(default: True)" for --no-X
            group.add_argument(flag, dest=spec.name, action=action, default=default, help=shown)
            continue
        if kind not in _EXPECTED:
            raise TypeError(f"{settings.__name__}.{spec.name}: a serve option must be int, float, str or bool")
        group.add_argument(
            option_name(spec.name),
            type=setting_type(settings, spec.name, kind),
            default=default,
            choices=meta.get("choices"),
            help=meta["help"],
        )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` options, on ``parser`` (the subcommand's, or ``python -m pacl_fast.serve``'s)."""
    common.add_verbose(parser)
    parser.set_defaults(show_loggers=("uvicorn.access",))  # the access log is the service's own output
    group = parser.add_argument_group("service")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    group.add_argument("--port", type=port_number, default=8000, help="TCP port")
    add_settings_options(group)
    group.add_argument("--no-access-log", action="store_true", help="do not log a line per request")
    common.add_model_arguments(
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


def add_parser(sub: common.Subcommands) -> None:
    """Register ``pacl-fast serve`` on the CLI's subcommands."""
    parser = sub.add_parser(
        "serve",
        formatter_class=common.HELP,
        help="HTTP segmentation service with dynamic batching, and a web page to try it",
        description=DESCRIPTION,
    )
    configure_parser(parser)


def settings_from_args(args: argparse.Namespace, settings: type[ServeSettings] = ServeSettings) -> ServeSettings:
    """The service's settings from the options of the same names (``--templates`` unset: None, the model's)."""
    values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(settings)}
    try:
        return settings(**values)
    except ValueError as error:
        raise common.UsageError(str(error)) from error


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


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free one), before the model loads, so that a busy
    port is one line at once rather than an error after the model started loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise common.UsageError(f"cannot listen on --host {host} --port {port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if sock.family == socket.AF_INET6 else f"http://{host}:{port}/"


def run(args: argparse.Namespace) -> int:
    """Load the model on the service's worker thread and serve until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    from pacl_fast.serve.app import create_app

    common.check_weights_files(args)
    common.encoder_choice(args)  # its option checks, before the port opens
    settings = settings_from_args(args)
    resolve_model_options(args)
    sock = listen(args.host, args.port)
    common.say(f"serving {url(sock)} (API, page, /docs); the model loads meanwhile, /readyz says when it is ready")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: the service has no authentication; put it behind your own proxy", args.host)

    def build():  # on the worker thread; the batcher logs "model loaded: Segmenter(...)", the choices and why
        return common.make_segmenter(
            args, args.device, expected_images=math.inf, max_pixels=args.max_pixels, announce=False
        )

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
        server.run(sockets=[sock])
    error = app.state.batcher.load_error
    if error is not None:
        raise error
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pacl_fast.serve``: the same as ``pacl-fast serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m pacl_fast.serve", description=DESCRIPTION, formatter_class=common.HELP
    )
    configure_parser(parser)
    return common.run_command("serve", run, parser.parse_args(argv))
