"""The ``pacl-fast`` command line: ``segment`` and ``demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pacl_fast.images import SlidingWindow


def _labels(text: str) -> list[str]:
    labels = [label.strip() for label in text.split(",")]
    if not all(labels):
        raise argparse.ArgumentTypeError(f"--labels has an empty name in {text!r}; give 'a,b,c'")
    return labels


def _sliding_window(text: str) -> SlidingWindow:
    try:
        parts = [int(v) for v in text.split(",")]
        return SlidingWindow(*parts)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"--sliding-window expects CROP,STRIDE[,SHORT_SIDE], got {text!r}") from error


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that choose the CLIP, PACL weights and runtime (shared by subcommands)."""
    group = parser.add_argument_group("model")
    group.add_argument("--clip", default="ViT-B-16", help="open_clip model name or local-dir:PATH (default ViT-B-16)")
    group.add_argument("--clip-weights", default=None, help="pretrained tag (hub) or local checkpoint file")
    group.add_argument("--pacl-weights", default=None, help="PACL weights (.safetensors)")
    group.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--image-size", type=int, default=None, help="short side the model sees (default: CLIP's)")
    group.add_argument(
        "--backend",
        default="fast",
        choices=["fast", "reference", "tiled", "triton"],
        help="head backend: fast (Triton on CUDA, tiled on CPU; default), reference, tiled, triton",
    )
    group.add_argument("--batch-size", type=int, default=8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacl-fast", description="Open-vocabulary semantic segmentation with PACL on open_clip."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    segment = sub.add_parser(
        "segment",
        help="segment images into the given classes",
        description="Segment images; writes <stem>_labels.png (palette PNG, background 255) and "
        "<stem>_overlay.png per image, prints the share of pixels per class. Exits 1 naming every "
        "image that failed, after writing all the others.",
    )
    segment.add_argument("images", nargs="+", help="image files")
    segment.add_argument("--labels", required=True, type=_labels, help="comma-separated class names: a,b,c")
    segment.add_argument("--out", required=True, type=Path, help="output folder")
    segment.add_argument("--templates", default="imagenet", help="imagenet (80), short (7), single, or 'a {} photo'")
    segment.add_argument(
        "--background-threshold",
        type=float,
        default=None,
        help="winner probability under which a pixel is background (label 255 in PNGs)",
    )
    segment.add_argument(
        "--sliding-window",
        type=_sliding_window,
        default=None,
        metavar="CROP,STRIDE[,SHORT]",
        help="sliding-window inference, e.g. 448,224,448",
    )
    add_model_arguments(segment)

    demo = sub.add_parser(
        "demo",
        help="segment generated scenes with the embedded default model",
        description="Segment a few generated scenes end to end and write overlays.",
    )
    demo.add_argument("--out", type=Path, default=Path("pacl-demo"), help="output folder (default ./pacl-demo)")
    demo.add_argument("--num-images", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def run_segment(args: argparse.Namespace) -> int:
    from pacl_fast.results import ImageError
    from pacl_fast.segmenter import Segmenter

    segmenter = Segmenter(
        args.clip,
        args.clip_weights,
        args.pacl_weights,
        device=args.device,
        dtype=args.dtype,
        image_size=args.image_size,
        backend=args.backend,
        batch_size=args.batch_size,
    )
    results = segmenter.predict(
        args.images,
        args.labels,
        templates=args.templates,
        background_threshold=args.background_threshold,
        sliding_window=args.sliding_window,
        errors="return",
    )
    failed = []
    for path, result in zip(args.images, results):
        if isinstance(result, ImageError):
            failed.append(result)
            continue
        result.save(args.out, stem=Path(path).stem)
        shares = ", ".join(f"{name} {share:.1%}" for name, share in result.class_shares().items())
        print(f"{path}: {shares}")
    if failed:
        print(f"{len(failed)} of {len(results)} images failed:", file=sys.stderr)
        for failure in failed:
            print(f"  {failure.source}: {failure.error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "segment":
        return run_segment(args)
    if args.command == "demo":
        from pacl_fast.demo import run_demo

        run_demo(args.out, num_images=args.num_images, seed=args.seed)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
