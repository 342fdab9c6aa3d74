"""``pacl-fast demo``: segment fresh synthetic scenes with the weights shipped in the package."""

from __future__ import annotations

import argparse
from pathlib import Path

from pacl_fast.cli.common import HELP, Subcommands, add_verbose, positive_int, say


def add_parser(sub: Subcommands) -> None:
    demo = sub.add_parser(
        "demo",
        help="segment generated scenes with the embedded default model",
        description="Segment fresh synthetic scenes with the demo weights shipped in the package, write overlays "
        "and ground truth, print the mIoU.",
        formatter_class=HELP,
    )
    add_verbose(demo)
    demo.add_argument("--out", type=Path, default=Path("pacl-demo"), help="output folder")
    demo.add_argument("--num-images", type=positive_int("--num-images"), default=8, help="scenes to segment")
    demo.add_argument("--seed", type=int, default=100, help="world seed of the scenes (training used 0)")


def run(args: argparse.Namespace) -> int:
    from pacl_fast.demo import demo_segmenter, run_demo

    segmenter = demo_segmenter()
    say(repr(segmenter))  # which model, on what
    print(run_demo(args.out, num_images=args.num_images, seed=args.seed, segmenter=segmenter).summary())
    return 0
