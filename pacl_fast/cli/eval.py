"""``pacl-fast eval``: mIoU on a segmentation benchmark, resumable and shardable under ``torchrun``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pacl_fast.choices import DATASETS, PROTOCOLS
from pacl_fast.cli import common

if TYPE_CHECKING:
    from pacl_fast.data.segmentation import SegmentationDataset
    from pacl_fast.protocols import EvalProtocol


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
        help="imagenet (80), short (7), single, or 'a {} photo' (default: the dataset's own, else imagenet)",
    )
    parser.add_argument(
        "--sliding-window",
        type=common.sliding_window,
        default=None,
        metavar="CROP,STRIDE[,SHORT]",
        help="the training-free papers' protocol, e.g. 224,112,336 for a ViT-B/16 at 224 or 448,224,448; "
        "default: the whole image with its short side at --image-size",
    )
    parser.add_argument(
        "--background-threshold",
        type=common.probability,
        default=None,
        help="pixels whose winning probability is under this are background (voc21, context60, cocoobject)",
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
    if args.background_threshold is not None and dataset.background_index is None:
        raise common.UsageError(
            f"--background-threshold: {dataset.name} has no background class to predict; use it with voc21, "
            "context60 or cocoobject"
        )


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
    segmenter = common.make_segmenter(args, device, logit_scale=None if protocol is None else protocol.logit_scale)
    with common.resumable(partial, args.save_every):
        report = evaluate_segmentation(
            segmenter,
            dataset,
            names=names,
            templates=args.templates,
            sliding_window=args.sliding_window,
            background_threshold=args.background_threshold,
            protocol=protocol,
            **common.run_options(args, dist, partial),
        )
    if dist.is_main:
        print(report.metrics.table())
        print(f"{report.dataset}: {report.num_images} images, {len(report.failures)} failed")
        model = {"clip": str(args.clip), "pacl_weights": common.path_text(args.pacl_weights), "vfm": segmenter.vfm}
        common.write_json(args.json, {"model": model, **report.to_dict()})
        for failure in report.failures:
            print(f"  failed: {failure['id']}: {failure['error']}", file=sys.stderr)
        if report.failures:
            print(f"{len(report.failures)} images failed; the numbers above leave them out", file=sys.stderr)
    clear_state(partial, dist)
    return 1 if report.failures else 0
