"""``pacl-fast classify``: zero-shot classification, PACL's compatibility beside plain CLIP."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pacl_fast.cli.common as common


def add_parser(sub: common.Subcommands) -> None:
    parser = sub.add_parser(
        "classify",
        formatter_class=common.HELP,
        help="zero-shot classification with PACL's compatibility and with plain CLIP, side by side",
        description="Classify images into the given classes, or evaluate top-1 / top-5 on an ImageFolder "
        "(ROOT/CLASS/IMAGE) with --image-folder. Both scorers see the same pixels and prompts.",
    )
    common.add_verbose(parser)
    parser.add_argument("images", nargs="*", help="image files")
    parser.add_argument("--labels", type=common.labels_list, default=None, help="comma-separated class names: a,b,c")
    parser.add_argument(
        "--class-names",
        type=Path,
        default=None,
        help="class names file: one class per line, synonyms separated by commas (for --image-folder: one "
        "line per class folder, sorted; default: the folder names)",
    )
    parser.add_argument("--image-folder", type=Path, default=None, help="evaluate on ROOT/CLASS/IMAGE")
    parser.add_argument(
        "--top-k", type=common.positive_int("--top-k"), default=5, help="classes shown per image (default 5)"
    )
    parser.add_argument("--templates", default=None, help=common.TEMPLATES_HELP)
    common.add_run_arguments(parser, default_save_every=256)
    common.add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if (args.image_folder is None) == (not args.images):
        raise common.UsageError("give image files, or --image-folder ROOT (not both)")
    if args.method not in (None, "pacl"):
        raise common.UsageError("classify compares PACL's compatibility with CLIP: it runs --method pacl only")
    args.method = "pacl"
    common.check_weights_files(args)
    common.check_text(args.labels, args.templates)
    common.encoder_choice(args)
    return run_folder(args) if args.image_folder is not None else run_images(args)


def run_folder(args: argparse.Namespace) -> int:
    """Top-1 / top-5 of both scorers on ``--image-folder``, resumably."""
    from pacl_fast.data.classification import ImageFolder
    from pacl_fast.evaluate import evaluate_classification
    from pacl_fast.runs import clear_state
    from pacl_fast.zeroshot import ZeroShotClassifier

    folder = ImageFolder(args.image_folder, args.class_names)
    dist, device = common.distributed(args)
    images = len(folder) if args.limit is None else min(args.limit, len(folder))
    segmenter = common.make_segmenter(args, device, expected_images=images / dist.world_size)
    classifier = ZeroShotClassifier(segmenter)
    partial = common.state_dir(args, "classify")
    if args.restart:
        clear_state(partial, dist)
    with common.resumable(partial, args.save_every):
        report = evaluate_classification(
            classifier,
            folder,
            templates=segmenter.resolve(args.templates).templates,  # None: the model's
            **common.run_options(args, dist, partial),
        )
    if dist.is_main:
        print(report.table())
        common.write_json(args.json, {"pacl_weights": common.path_text(args.pacl_weights), **report.to_dict()})
        for failure in report.failures:
            print(f"  failed: {failure['id']}: {failure['error']}", file=sys.stderr)
    clear_state(partial, dist)
    return 1 if report.failures else 0


def run_images(args: argparse.Namespace) -> int:
    """The top classes of each image by both scorers, side by side."""
    from pacl_fast.data.names import read_class_names
    from pacl_fast.zeroshot import METHODS, ZeroShotClassifier

    if (args.labels is None) == (args.class_names is None):
        raise common.UsageError("give --labels a,b,c or --class-names FILE")
    labels = args.labels if args.labels is not None else read_class_names(args.class_names)
    dist, device = common.distributed(args)
    segmenter = common.make_segmenter(args, device, expected_images=len(args.images))
    classifier = ZeroShotClassifier(segmenter)
    templates = segmenter.resolve(args.templates).templates  # None: the model's
    results = classifier.classify(args.images, labels, templates=templates, top_k=args.top_k)
    payload = []
    for path, result in zip(args.images, results):
        print(path)
        print(f"  {'PACL':<32} CLIP")
        for (pacl_name, pacl_p), (clip_name, clip_p) in zip(result["pacl"], result["clip"]):
            print(f"  {pacl_name:<24} {pacl_p:6.1%}  {clip_name:<24} {clip_p:6.1%}")
        payload.append({"image": str(path), **{m: [{"class": n, "p": p} for n, p in result[m]] for m in METHODS}})
    common.write_json(args.json, {"results": payload})
    return 0
