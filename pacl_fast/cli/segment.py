"""``pacl-fast segment``: images, folders, file lists and WebDataset shards -> label maps and overlays."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pacl_fast.cli.common as common
from pacl_fast.data.shards import DEFAULT_MAX_MEMBER_BYTES

if TYPE_CHECKING:
    from pacl_fast.bulk import Inputs
    from pacl_fast.segmenter import Segmenter


def add_parser(sub: common.Subcommands) -> None:
    segment = sub.add_parser(
        "segment",
        formatter_class=common.HELP,
        help="segment images, folders, file lists or WebDataset shards into the given classes",
        description="Segment images; writes OUT/<key>_labels.png (palette PNG, background 255) and "
        "OUT/<key>_overlay.png per image (key: a file's stem; below a folder, its relative path; in a "
        "shard, its __key__) and prints the share of pixels per class. Images whose outputs exist are "
        "skipped, so a killed run resumes. Under torchrun each rank takes its own share. Exits 1 naming "
        "every image that failed, after writing all the others.",
    )
    common.add_verbose(segment)
    segment.add_argument("images", nargs="*", help="image files, folders (searched recursively) and .tar shards")
    segment.add_argument("--file-list", action="append", default=[], help="a text file of image paths, one a line")
    segment.add_argument("--labels", required=True, type=common.labels_list, help="comma-separated class names: a,b,c")
    segment.add_argument("--out", required=True, type=Path, help="output folder")
    segment.add_argument("--templates", default=None, help=common.TEMPLATES_HELP)
    segment.add_argument("--background-threshold", type=common.probability, default=None, help=common.THRESHOLD_HELP)
    segment.add_argument(
        "--sliding-window",
        type=common.sliding_window,
        default=None,
        metavar="CROP,STRIDE[,SHORT]",
        help=common.WINDOW_HELP,
    )
    segment.add_argument(
        "--max-member-bytes",
        type=common.positive_int("--max-member-bytes"),
        default=DEFAULT_MAX_MEMBER_BYTES,
        help="a WebDataset shard member larger than this is not read; its sample fails",
    )
    segment.add_argument("--no-overlay", action="store_true", help="write only the label PNGs")
    segment.add_argument("--overwrite", action="store_true", help="segment again images whose outputs exist")
    segment.add_argument(
        "--workers", type=common.non_negative_int("--workers"), default=0, help="image-decoding processes per rank"
    )
    segment.add_argument("--quiet", action="store_true", help="no line per image, only progress and the summary")
    common.add_model_arguments(segment)


def print_summary(written: int, skipped: int, failures: list[tuple[str, str]], total: int) -> None:
    """Counts on stdout; every failure on stderr, with its reason."""
    print(f"{written} written, {skipped} skipped (already written), {len(failures)} failed")
    if failures:
        print(f"{len(failures)} of {total} images failed:", file=sys.stderr)
        for source, error in failures:
            print(f"  {source}: {error}", file=sys.stderr)


def missing_inputs(inputs: Inputs) -> list[tuple[str, str]] | None:
    """When no file or shard named as an input exists: each as a failure (nothing to segment, so no model is
    loaded); else None (one that exists is found at the first stat, and the missing ones fail in the run)."""
    from pacl_fast.bulk import printable

    paths = [item.path for item in inputs.files] + list(inputs.shards)
    if any(path.is_file() for path in paths):
        return None
    return [(printable(str(path)), "no such file") for path in paths]


def expected_images(inputs: Inputs, world_size: int) -> float:
    """The images this rank will segment, for ``--encoder auto`` (an OpenVINO build pays only over many): its
    share of the files; a WebDataset shard counts as many (shards hold thousands, their count is unknown)."""
    return math.inf if inputs.shards else len(inputs.files) / world_size


def time_phases(segmenter: Segmenter) -> None:
    """``PACL_FAST_TIMINGS``: the segmenter's class-name embeddings timed as ``text`` and each result's PNG
    writing as ``writing`` (the rest of the bulk run is ``images``), by wrapping this one segmenter's methods."""
    segmenter.encode_labels = common.timed("text", segmenter.encode_labels)
    segment_images = segmenter.segment_images

    def segment_images_timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - Segmenter.segment_images's
        results = segment_images(*args, **kwargs)
        for result in results:
            if hasattr(result, "save"):
                result.save = common.timed("writing", result.save)
        return results

    segmenter.segment_images = segment_images_timed


def run(args: argparse.Namespace) -> int:
    from pacl_fast.bulk import already_done, check_output_folder, collect_inputs, request_record, segment_bulk

    if not args.images and not args.file_list:
        raise common.UsageError("give images, folders, shards or --file-list")
    common.check_weights_files(args)
    common.check_text(args.labels, args.templates)
    common.encoder_choice(args)
    inputs = collect_inputs(args.images, args.file_list)
    missing = missing_inputs(inputs)
    if missing is not None:  # nothing to segment: no model, no --out
        if os.environ.get("RANK", "0") == "0":
            failures = [*inputs.refused, *missing]
            print_summary(0, 0, failures, len(failures))
        return 1
    check_output_folder(args.out, "--out")
    request = request_record(vars(args))
    if not args.overwrite and "WORLD_SIZE" not in os.environ:
        skipped = already_done(inputs, args.out, not args.no_overlay, request)
        if skipped is not None:  # a finished rerun: no model to load, no text to encode
            print(f"0 written, {skipped} skipped (already written), 0 failed")
            return 0
    dist, device = common.distributed(args)
    with common.phase("model"):
        segmenter = common.make_segmenter(args, device, expected_images=expected_images(inputs, dist.world_size))
    if common.timings_on():
        time_phases(segmenter)
    # What the options leave out is the model's (its defaults), as predict and the service use it.
    asked = segmenter.resolve(args.templates, args.background_threshold, args.sliding_window)

    written = 0  # by this rank, for the line Ctrl-C leaves

    def report(key: str, source: str, result) -> None:
        nonlocal written
        written += 1
        if not args.quiet:
            shares = ", ".join(f"{name} {share:.1%}" for name, share in result.class_shares().items())
            sys.stdout.write(f"{source}: {shares}\n")  # one write: ranks share the stream, lines stay whole
            sys.stdout.flush()

    try:
        with common.phase("images"):  # decoding, the encoder, the head: what text and writing leave
            summary = segment_bulk(
                segmenter,
                inputs,
                args.labels,
                args.out,
                templates=asked.templates,
                background_threshold=asked.background_threshold,
                sliding_window=asked.sliding_window,
                overlays=not args.no_overlay,
                overwrite=args.overwrite,
                dist=dist,
                workers=args.workers,
                max_member_bytes=args.max_member_bytes,
                on_result=report,
                request=request,
            )
    except KeyboardInterrupt:
        by = " by this rank" if dist.enabled else ""
        raise common.Interrupted(
            f"{written} images written to {args.out}{by}; run the same command again to resume (images already "
            "written are skipped)"
        ) from None
    if dist.is_main:
        print_summary(summary.written, summary.skipped, summary.failures, summary.total)
    return 1 if summary.failures else 0
