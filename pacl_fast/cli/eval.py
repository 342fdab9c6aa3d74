"""``pacl-fast eval``: mIoU on a segmentation benchmark, resumable and shardable under ``torchrun``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import pacl_fast.cli.common as common
from pacl_fast.choices import DATASETS, PROTOCOLS

if TYPE_CHECKING:
    from pacl_fast.data.segmentation import SegmentationDataset
    from pacl_fast.images import SlidingWindow
    from pacl_fast.protocols import EvalProtocol
    from pacl_fast.segmenter import Segmenter


def add_parser(sub: common.Subcommands) -> None:
    parser = sub.add_parser(
        "eval",
        formatter_class=common.HELP,
        help="mIoU on a segmentation benchmark (VOC, Context, COCO-Stuff, ADE20K, Cityscapes, synthetic)",
        description="Evaluate on a benchmark in mmsegmentation's layout; prints a per-class IoU table and "
        "mIoU / mAcc / aAcc. Partial results are saved as it goes: run the same command again to resume. "
        "Under torchrun the ranks share the images and the numbers equal a single process's.",
    )
    common.add_verbose(parser)
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="benchmark")
    parser.add_argument("--root", type=Path, default=None, help="the dataset folder (or a folder above it)")
    parser.add_argument("--split", default=None, help="split (default val; synthetic: val or seedN)")
    parser.add_argument(
        "--class-names",
        type=Path,
        default=None,
        help="names to ask with: one class per line, synonyms separated by commas (SCLIP's cls_*.txt format)",
    )
    parser.add_argument(
        "--templates",
        default=None,
        help="prompt templates: imagenet (80), short (7), single, synthetic, or 'a photo of a {}.' (default: the "
        "dataset's own (synthetic: synthetic), else the model's: synthetic for --clip demo, else imagenet)",
    )
    parser.add_argument(
        "--sliding-window",
        type=common.sliding_window,
        default=None,
        metavar="CROP,STRIDE[,SHORT]",
        help="the training-free papers' protocol, e.g. 224,112,336 for a ViT-B/16 at 224 or 448,224,448; "
        "default: the model's (none for most: the whole image with its short side at --image-size); off: none",
    )
    parser.add_argument(
        "--background-threshold",
        type=common.probability,
        default=None,
        help="pixels whose winning probability is under this are background (voc21, context60, cocoobject); "
        "default: the model's (0.95 for --clip demo, none for most) on those datasets, none elsewhere; 0: none",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=None,
        help="a training-free paper's evaluation protocol for this dataset, exactly as its configs set it: class "
        "names and background, templates, short side, sliding window, logit scale, thresholds, PAMR "
        "(pacl_fast/protocols.py cites each value); then leave those options out",
    )
    common.add_run_arguments(parser, default_save_every=20)
    common.add_model_arguments(parser)


def protocol_of(args: argparse.Namespace) -> EvalProtocol | None:
    """``--protocol``'s preset for the dataset (it sets the image size); the options it sets must be left out."""
    if args.protocol is None:
        return None
    from pacl_fast.protocols import get_protocol

    set_by_protocol = ("class_names", "templates", "sliding_window", "background_threshold", "image_size")
    given = [f"--{name.replace('_', '-')}" for name in set_by_protocol if getattr(args, name) is not None]
    if given:
        raise common.UsageError(f"--protocol {args.protocol} sets {', '.join(given)}: leave them out")
    protocol = get_protocol(args.protocol, args.dataset)
    args.image_size = protocol.short_side
    return protocol


def check_against_dataset(args: argparse.Namespace, dataset: SegmentationDataset, names: tuple | None) -> None:
    """What the options ask of the dataset, before the model loads: a name per class, a background class."""
    from pacl_fast.data.names import ClassQueries

    if names is not None:
        try:
            asked = ClassQueries.from_names(names).num_classes
        except ValueError as error:
            raise common.UsageError(f"--class-names {args.class_names}: {error}") from None
        if asked != dataset.num_classes:
            raise common.UsageError(
                f"--class-names {args.class_names} names {asked} classes; {dataset.name} has {dataset.num_classes}"
            )
    if args.background_threshold and dataset.background_index is None:
        raise common.UsageError(
            f"--background-threshold: {dataset.name} has no background class to predict; use it with voc21, "
            "context60 or cocoobject"
        )


def model_options(
    args: argparse.Namespace, segmenter: Segmenter, dataset: SegmentationDataset, protocol: EvalProtocol | None
) -> tuple[float | None, SlidingWindow | None]:
    """The background threshold and sliding window to evaluate with: a protocol sets its own (None here);
    else what the options say, and for what they leave out the model's (``Segmenter.defaults``), its
    threshold only on datasets with a background class (elsewhere the metric ignores background pixels,
    so a threshold could only turn right pixels into unscored ones)."""
    if protocol is not None:
        return None, None
    threshold = args.background_threshold
    if threshold is None and dataset.background_index is not None:
        threshold = segmenter.defaults.background_threshold
    window = args.sliding_window if args.sliding_window is not None else segmenter.defaults.sliding_window
    return threshold or None, window or None  # 0 and off: none


def run(args: argparse.Namespace) -> int:
    from pacl_fast.data.names import read_class_names
    from pacl_fast.data.segmentation import open_dataset
    from pacl_fast.evaluate import evaluate_segmentation
    from pacl_fast.runs import clear_state

    common.check_weights_files(args)
    common.check_text(None, args.templates)
    common.encoder_choice(args)
    protocol = protocol_of(args)
    dataset = open_dataset(args.dataset, args.root, args.split)
    names = read_class_names(args.class_names) if args.class_names else None
    check_against_dataset(args, dataset, names)
    dist, device = common.distributed(args)
    partial = common.state_dir(args, f"eval-{args.dataset}")
    if args.restart:
        clear_state(partial, dist)
    images = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    segmenter = common.make_segmenter(
        args,
        device,
        expected_images=images / dist.world_size,
        logit_scale=None if protocol is None else protocol.logit_scale,
    )
    threshold, window = model_options(args, segmenter, dataset, protocol)
    with common.resumable(partial, args.save_every):
        report = evaluate_segmentation(
            segmenter,
            dataset,
            names=names,
            templates=args.templates,  # None: the dataset's own, else the model's
            sliding_window=window,
            background_threshold=threshold,
            protocol=protocol,
            **common.run_options(args, dist, partial),
        )
    if dist.is_main:
        print(report.metrics.table())
        print(f"{report.dataset}: {report.num_images} images, {len(report.failures)} failed")
        model = {"clip": str(args.clip), "pacl_weights": common.path_text(args.pacl_weights), "vfm": segmenter.vfm,
                 "name": segmenter.name, "choices": segmenter.choices}  # fmt: skip
        ran = {"background_threshold": threshold, "sliding_window": None if window is None else asdict(window)}
        common.write_json(args.json, {"model": model, "options": ran, **report.to_dict()})
        for failure in report.failures:
            print(f"  failed: {failure['id']}: {failure['error']}", file=sys.stderr)
        if report.failures:
            print(f"{len(report.failures)} images failed; the numbers above leave them out", file=sys.stderr)
    clear_state(partial, dist)
    return 1 if report.failures else 0
