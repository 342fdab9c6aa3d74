"""``pacl-fast segment``: images, folders, file lists and WebDataset shards -> label maps and overlays."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pacl_fast.cli.common import (
    HELP,
    Subcommands,
    UsageError,
    add_model_arguments,
    check_weights_files,
    distributed,
    labels_list,
    make_segmenter,
    positive_int,
    probability,
    sliding_window,
)
from pacl_fast.data.shards import DEFAULT_MAX_MEMBER_BYTES


def add_parser(sub: Subcommands) -> None:
    segment = sub.add_parser(
        "segment",
        formatter_class=HELP,
        help="segment images, folders, file lists or WebDataset shards into the given classes",
        description="Segment images; writes OUT/<key>_labels.png (palette PNG, background 255) and "
        "OUT/<key>_overlay.png per image (key: a file's stem; below a folder, its relative path; in a "
        "shard, its __key__) and prints the share of pixels per class. Images whose outputs exist are "
        "skipped, so a killed run resumes. Under torchrun each rank takes its own share. Exits 1 naming "
        "every image that failed, after writing all the others.",
    )
    segment.add_argument("images", nargs="*", help="image files, folders (searched recursively) and .tar shards")
    segment.add_argument("--file-list", action="append", default=[], help="a text file of image paths, one a line")
    segment.add_argument("--labels", required=True, type=labels_list, help="comma-separated class names: a,b,c")
    segment.add_argument("--out", required=True, type=Path, help="output folder")
    segment.add_argument("--templates", default="imagenet", help="imagenet (80), short (7), single, or 'a {} photo'")
    segment.add_argument(
        "--background-threshold",
        type=probability,
        default=None,
        help="winner probability under which a pixel is background (label 255 in PNGs)",
    )
    segment.add_argument(
        "--sliding-window",
        type=sliding_window,
        default=None,
        metavar="CROP,STRIDE[,SHORT]",
        help="sliding-window inference, e.g. 448,224,448",
    )
    segment.add_argument(
        "--max-member-bytes",
        type=positive_int("--max-member-bytes"),
        default=DEFAULT_MAX_MEMBER_BYTES,
        help="a WebDataset shard member larger than this is not read; its sample fails",
    )
    segment.add_argument("--no-overlay", action="store_true", help="write only the label PNGs")
    segment.add_argument("--overwrite", action="store_true", help="segment again images whose outputs exist")
    segment.add_argument("--workers", type=int, default=0, help="image-decoding processes per rank")
    segment.add_argument("--quiet", action="store_true", help="no line per image, only progress and the summary")
    add_model_arguments(segment)


def model_request(args: argparse.Namespace, *names: str) -> dict:
    """The options that decide a run's outputs, with each local weight file's size and time."""

    def stamp(path: object) -> object:
        if path is None or not Path(str(path)).is_file():
            return None if path is None else str(path)
        stat = Path(str(path)).stat()
        return [str(Path(str(path)).resolve()), stat.st_size, stat.st_mtime_ns]

    model = ("clip", "method", "dtype", "image_size", "backend", "encoder", "text_dtype")
    request = {name: getattr(args, name) for name in (*model, *names)}
    request["sliding_window"] = None if args.sliding_window is None else str(args.sliding_window)
    request.update(clip_weights=stamp(args.clip_weights), pacl_weights=stamp(args.pacl_weights))
    if str(args.clip).startswith("local-dir:"):
        request["clip"] = [args.clip, *[stamp(p) for p in sorted(Path(args.clip[10:]).glob("*"))]]
    return request


def run(args: argparse.Namespace) -> int:
    from pacl_fast.bulk import already_done, collect_inputs, segment_bulk

    if not args.images and not args.file_list:
        raise UsageError("give images, folders, shards or --file-list")
    check_weights_files(args)
    inputs = collect_inputs(args.images, args.file_list)
    request = model_request(args, "labels", "templates", "background_threshold", "sliding_window", "no_overlay")
    if not args.overwrite and "WORLD_SIZE" not in os.environ:
        skipped = already_done(inputs, args.out, not args.no_overlay, request)
        if skipped is not None:  # a finished rerun: no model to load, no text to encode
            print(f"0 written, {skipped} skipped (already written), 0 failed")
            return 0
    dist, device = distributed(args)
    segmenter = make_segmenter(args, device)

    def report(key: str, source: str, result) -> None:
        if not args.quiet:
            shares = ", ".join(f"{name} {share:.1%}" for name, share in result.class_shares().items())
            sys.stdout.write(f"{source}: {shares}\n")  # one write: ranks share the stream, lines stay whole
            sys.stdout.flush()

    summary = segment_bulk(
        segmenter,
        inputs,
        args.labels,
        args.out,
        templates=args.templates,
        background_threshold=args.background_threshold,
        sliding_window=args.sliding_window,
        overlays=not args.no_overlay,
        overwrite=args.overwrite,
        dist=dist,
        workers=args.workers,
        max_member_bytes=args.max_member_bytes,
        on_result=report,
        request=request,
    )
    if dist.is_main:
        print(f"{summary.written} written, {summary.skipped} skipped (already written), {len(summary.failures)} failed")
        if summary.left_out:
            print(f"left out {summary.left_out} earlier outputs (*_labels.png, *_overlay.png) found under --out")
        if summary.failures:
            print(f"{len(summary.failures)} of {summary.total} images failed:", file=sys.stderr)
            for source, error in summary.failures:
                print(f"  {source}: {error}", file=sys.stderr)
    return 1 if summary.failures else 0
