"""The ``pacl-fast`` command line: ``segment``, ``demo``, ``eval``, ``classify``, ``export`` and ``serve``.

Each command is a module of this package with ``add_parser(sub)`` and ``run(args)``, registered in
:data:`COMMANDS`; :mod:`pacl_fast.cli.common` holds what they share. Nothing heavy is imported until
a command runs, so ``--help`` is instant. Errors a user can fix (a missing file, a bad option value,
a backend that is not installed) end the command with one line on stderr and exit code 2;
``PACL_FAST_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pacl_fast.cli import classify, demo, export, segment, serve
from pacl_fast.cli import eval as evaluate
from pacl_fast.cli.common import HELP, UsageError, run_command
from pacl_fast.process_exit import run_and_exit

__all__ = ["COMMANDS", "HELP", "UsageError", "build_parser", "console", "main"]

#: Every command, in the order ``pacl-fast --help`` lists them.
COMMANDS = {
    "segment": segment,
    "demo": demo,
    "eval": evaluate,
    "classify": classify,
    "export": export,
    "serve": serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacl-fast",
        description="Open-vocabulary semantic segmentation on open_clip: PACL, or a training-free method "
        "(NACLIP, SCLIP, ClearCLIP, MaskCLIP) on stock CLIP weights.",
        formatter_class=HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, COMMANDS[args.command].run, args)


def console() -> None:
    """``pacl-fast`` and ``python -m pacl_fast``: :func:`main` on the command line, then the process ends
    without the interpreter's seconds of teardown (:func:`~pacl_fast.process_exit.run_and_exit`)."""
    run_and_exit(main)
