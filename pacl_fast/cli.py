"""The ``pacl-fast`` command line: ``segment``, ``demo``, ``eval``, ``classify``, ``export`` and ``serve``.

Nothing heavy is imported until a command runs, so ``--help`` is instant. Errors a user can fix
(a missing file, a bad option value, a backend that is not installed) end the command with one
line on stderr and exit code 2; ``PACL_FAST_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pacl_fast.choices import DATASETS as DATASET_CHOICES  # standard library only: --help stays instant
from pacl_fast.choices import DTYPES as DTYPE_CHOICES
from pacl_fast.choices import ENCODERS as ENCODER_CHOICES
from pacl_fast.choices import EXPORT_FORMATS, EXPORT_PRECISIONS, HEAD_BACKENDS, TEXT_DTYPES
from pacl_fast.choices import METHODS as METHOD_CHOICES
from pacl_fast.choices import PROTOCOLS as PROTOCOL_CHOICES
from pacl_fast.data.shards import DEFAULT_MAX_MEMBER_BYTES

if TYPE_CHECKING:
    from pacl_fast.distributed import DistInfo
    from pacl_fast.images import SlidingWindow
    from pacl_fast.segmenter import Segmenter



class HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


WEIGHTS_HELP = (
    "PACL weights (.safetensors): train them with train/train.py (see the README's Training section), or use "
    "--clip demo for the synthetic-world demo weights; without them a training-free method runs on the CLIP"
)


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


def _labels(text: str) -> list[str]:
    labels = [label.strip() for label in text.split(",")]
    if not all(labels):
        raise argparse.ArgumentTypeError(f"--labels has an empty name in {text!r}; give 'a,b,c'")
    return labels


def _sliding_window(text: str) -> SlidingWindow:
    from pacl_fast.images import SlidingWindow

    try:
        parts = [int(v) for v in text.split(",")]
        return SlidingWindow(*parts)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"--sliding-window expects CROP,STRIDE[,SHORT_SIDE], got {text!r}") from error


def checked_number(name: str, convert: Callable[[str], float], ok: Callable[[float], bool], expected: str):
    """An argparse ``type``: ``convert(text)`` that passes ``ok``, else "NAME must be EXPECTED, got 'TEXT'"."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{name} must be {expected}, got {text!r}")
        return value

    return parse


def _positive_int(name: str) -> Callable[[str], int]:
    return checked_number(name, int, lambda value: value >= 1, "a positive integer")


_probability = checked_number(
    "--background-threshold", float, lambda value: 0.0 <= value <= 1.0, "a probability in [0, 1]"
)


def add_weights_arguments(group: argparse._ArgumentGroup) -> None:
    """Options that choose the CLIP, the method, the PACL weights and the device."""
    group.add_argument(
        "--clip",
        default="ViT-B-16",
        help="open_clip model name, local-dir:PATH, or 'demo' (the shipped synthetic-world CLIP + PACL weights)",
    )
    group.add_argument("--clip-weights", default=None, help="open_clip pretrained tag (hub) or local checkpoint file")
    group.add_argument("--pacl-weights", default=None, type=Path, help=WEIGHTS_HELP)
    group.add_argument(
        "--method",
        default=None,
        choices=METHOD_CHOICES,
        help="pacl (needs --pacl-weights), or a training-free method on the CLIP alone; default: pacl with "
        "--pacl-weights, else naclip",
    )
    group.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that choose the CLIP, the method and the runtime (shared by subcommands)."""
    group = parser.add_argument_group("model")
    add_weights_arguments(group)
    group.add_argument(
        "--dtype",
        default=None,
        choices=DTYPE_CHOICES,
        help="encoder precision (default: float16 for tensorrt, else float32); int8: --encoder openvino only "
        "(NNCF-quantised; calibrated by `pacl-fast export --format openvino`, else on synthetic scenes)",
    )
    group.add_argument(
        "--image-size",
        type=_positive_int("--image-size"),
        default=None,
        help="short side the model sees (default: the CLIP's own)",
    )
    group.add_argument(
        "--backend",
        default="fast",
        choices=HEAD_BACKENDS,
        help="head backend: fast (Triton on CUDA, tiled on CPU), reference, tiled, triton",
    )
    group.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8, help="images per encoder call")
    group.add_argument("--encoder", default="torch", choices=ENCODER_CHOICES, help="image/text encoder backend")
    group.add_argument(
        "--encoder-cache", type=Path, default=None, help="exported graphs / engines (default ~/.cache/pacl-fast)"
    )
    group.add_argument(
        "--text-dtype",
        default=None,
        choices=TEXT_DTYPES,
        help="precision of the text tower (torch/compile encoders; default float32: it runs once per vocabulary)",
    )
    group.add_argument(
        "--no-text-cache",
        action="store_true",
        help="do not keep class-name embeddings on disk ($PACL_FAST_CACHE/text; also PACL_FAST_NO_TEXT_CACHE=1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacl-fast",
        description="Open-vocabulary semantic segmentation on open_clip: PACL, or a training-free method "
        "(NACLIP, SCLIP, ClearCLIP, MaskCLIP) on stock CLIP weights.",
        formatter_class=HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    add_segment_parser(sub)
    demo = sub.add_parser(
        "demo",
        help="segment generated scenes with the embedded default model",
        description="Segment fresh synthetic scenes with the demo weights shipped in the package, write overlays "
        "and ground truth, print the mIoU.",
        formatter_class=HELP,
    )
    demo.add_argument("--out", type=Path, default=Path("pacl-demo"), help="output folder")
    demo.add_argument("--num-images", type=_positive_int("--num-images"), default=8, help="scenes to segment")
    demo.add_argument("--seed", type=int, default=100, help="world seed of the scenes (training used 0)")
    add_eval_parser(sub)
    add_classify_parser(sub)
    add_export_parser(sub)
    from pacl_fast.serve.cli import add_serve_parser, run_serve  # here: serve.cli imports this module

    add_serve_parser(sub)
    COMMANDS["serve"] = run_serve
    return parser


def _distributed(args: argparse.Namespace) -> tuple[DistInfo, str]:
    """Join ``torchrun``'s process group when there is one; pick this rank's device."""
    import torch

    from pacl_fast.distributed import init_distributed

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist = init_distributed("cuda" if device.startswith("cuda") else "cpu")
    if device == "cuda" and dist.enabled:
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    return dist, device


def check_weights_files(args: argparse.Namespace) -> None:
    """Fail fast on weight files that do not exist, before minutes of model loading."""
    if args.pacl_weights is not None and not args.pacl_weights.is_file():
        raise UsageError(f"--pacl-weights {args.pacl_weights}: no such file. {WEIGHTS_HELP}")
    if args.clip_weights is not None and (os.sep in args.clip_weights or args.clip_weights.endswith(
        (".safetensors", ".bin", ".pt", ".pth"))) and not Path(args.clip_weights).is_file():  # fmt: skip
        raise UsageError(f"--clip-weights {args.clip_weights}: no such file (give a local checkpoint or a tag)")
    if args.pacl_weights is not None and args.method not in (None, "pacl"):
        raise UsageError(f"--pacl-weights is used only by --method pacl, not {args.method}: drop one of them")


def _model_request(args: argparse.Namespace, *names: str) -> dict:
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


def encoder_choice(args: argparse.Namespace) -> tuple[str | None, dict]:
    """``--dtype`` and ``--encoder-cache`` as the encoder's dtype and options (int8 is an OpenVINO precision)."""
    options = {"cache_dir": args.encoder_cache} if args.encoder_cache is not None else {}
    if args.text_dtype is not None:
        if args.encoder not in ("torch", "compile"):
            raise UsageError(f"--text-dtype applies to the torch and compile encoders, not {args.encoder}")
        options["text_dtype"] = args.text_dtype
    if args.dtype != "int8":
        return args.dtype, options
    if args.encoder != "openvino":
        raise UsageError(f"--dtype int8 runs on --encoder openvino only, not {args.encoder}")
    return None, {**options, "precision": "int8"}


def _make_segmenter(args: argparse.Namespace, device: str, logit_scale: float | None = None) -> Segmenter:
    from pacl_fast.segmenter import Segmenter

    dtype, options = encoder_choice(args)
    segmenter = Segmenter(
        args.clip,
        args.clip_weights,
        args.pacl_weights,
        method=args.method,
        device=device,
        dtype=dtype,
        image_size=args.image_size,
        backend=args.backend,
        batch_size=args.batch_size,
        encoder=args.encoder,
        encoder_options=options or None,
        logit_scale=logit_scale,
        text_cache=False if args.no_text_cache else None,
    )
    print(f"pacl-fast: {segmenter!r}", file=sys.stderr)  # which method runs, on what
    return segmenter


def add_segment_parser(sub: argparse._SubParsersAction) -> None:
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
    segment.add_argument("--labels", required=True, type=_labels, help="comma-separated class names: a,b,c")
    segment.add_argument("--out", required=True, type=Path, help="output folder")
    segment.add_argument("--templates", default="imagenet", help="imagenet (80), short (7), single, or 'a {} photo'")
    segment.add_argument(
        "--background-threshold",
        type=_probability,
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
    segment.add_argument(
        "--max-member-bytes",
        type=_positive_int("--max-member-bytes"),
        default=DEFAULT_MAX_MEMBER_BYTES,
        help="a WebDataset shard member larger than this is not read; its sample fails",
    )
    segment.add_argument("--no-overlay", action="store_true", help="write only the label PNGs")
    segment.add_argument("--overwrite", action="store_true", help="segment again images whose outputs exist")
    segment.add_argument("--workers", type=int, default=0, help="image-decoding processes per rank")
    segment.add_argument("--quiet", action="store_true", help="no line per image, only progress and the summary")
    add_model_arguments(segment)


def run_segment(args: argparse.Namespace) -> int:
    from pacl_fast.bulk import already_done, collect_inputs, segment_bulk

    if not args.images and not args.file_list:
        raise UsageError("give images, folders, shards or --file-list")
    check_weights_files(args)
    inputs = collect_inputs(args.images, args.file_list)
    request = _model_request(args, "labels", "templates", "background_threshold", "sliding_window", "no_overlay")
    if not args.overwrite and "WORLD_SIZE" not in os.environ:
        skipped = already_done(inputs, args.out, not args.no_overlay, request)
        if skipped is not None:  # a finished rerun: no model to load, no text to encode
            print(f"0 written, {skipped} skipped (already written), 0 failed")
            return 0
    dist, device = _distributed(args)
    segmenter = _make_segmenter(args, device)

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


def _add_run_arguments(parser: argparse.ArgumentParser, default_save_every: int) -> None:
    """Options of long, resumable, shardable runs (eval, classify --image-folder)."""
    group = parser.add_argument_group("run")
    group.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    group.add_argument("--limit", type=int, default=None, help="only the first N images (a quick look, not comparable)")
    group.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="partial results for resuming (default: JSON.partial next to --json, else ./pacl-<task>.partial); "
        "removed when the run completes",
    )
    group.add_argument("--restart", action="store_true", help="discard saved partial results and start over")
    group.add_argument(
        "--save-every",
        type=_positive_int("--save-every"),
        default=default_save_every,
        help="images between state saves",
    )
    group.add_argument("--workers", type=int, default=2, help="image-decoding processes per rank")


def _state_dir(args: argparse.Namespace, task: str) -> Path:
    if args.state_dir is not None:
        return args.state_dir
    if args.json is not None:
        return args.json.with_name(args.json.name + ".partial")
    return Path(f"pacl-{task}.partial")


def _path_text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _write_json(path: Path | None, payload: dict) -> None:
    import json

    from pacl_fast.files import atomic_write

    if path is not None:
        atomic_write(path, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        formatter_class=HELP,
        help="mIoU on a segmentation benchmark (VOC, Context, COCO-Stuff, ADE20K, Cityscapes, synthetic)",
        description="Evaluate on a benchmark in mmsegmentation's layout; prints a per-class IoU table and "
        "mIoU / mAcc / aAcc. Partial results are saved as it goes: run the same command again to resume. "
        "Under torchrun the ranks share the images and the numbers equal a single process's.",
    )
    parser.add_argument("--dataset", required=True, choices=DATASET_CHOICES, help="benchmark")
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
        type=_sliding_window,
        default=None,
        metavar="CROP,STRIDE[,SHORT]",
        help="the training-free papers' protocol, e.g. 224,112,336 for a ViT-B/16 at 224 or 448,224,448; "
        "default: the whole image with its short side at --image-size",
    )
    parser.add_argument(
        "--background-threshold",
        type=_probability,
        default=None,
        help="pixels whose winning probability is under this are background (voc21, context60, cocoobject)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOL_CHOICES,
        default=None,
        help="a training-free paper's evaluation protocol for this dataset, exactly as its configs set it: class "
        "names and background, templates, short side, sliding window, logit scale, thresholds, PAMR "
        "(pacl_fast/protocols.py cites each value); then leave those options out",
    )
    _add_run_arguments(parser, default_save_every=20)
    add_model_arguments(parser)


def run_eval(args: argparse.Namespace) -> int:
    from pacl_fast.data.names import read_class_names
    from pacl_fast.data.segmentation import open_dataset
    from pacl_fast.evaluate import evaluate_segmentation
    from pacl_fast.runs import clear_state

    check_weights_files(args)
    protocol = None
    if args.protocol is not None:
        from pacl_fast.protocols import get_protocol

        set_by_protocol = ("class_names", "templates", "sliding_window", "background_threshold", "image_size")
        given = [f"--{name.replace('_', '-')}" for name in set_by_protocol if getattr(args, name) is not None]
        if given:
            raise UsageError(f"--protocol {args.protocol} sets {', '.join(given)}: leave them out")
        protocol = get_protocol(args.protocol, args.dataset)
        args.image_size = protocol.short_side
    dataset = open_dataset(args.dataset, args.root, args.split)
    names = read_class_names(args.class_names) if args.class_names else None
    dist, device = _distributed(args)
    state_dir = _state_dir(args, f"eval-{args.dataset}")
    if args.restart:
        clear_state(state_dir, dist)
    report = evaluate_segmentation(
        _make_segmenter(args, device, logit_scale=None if protocol is None else protocol.logit_scale),
        dataset,
        names=names,
        templates=args.templates,
        sliding_window=args.sliding_window,
        background_threshold=args.background_threshold,
        protocol=protocol,
        limit=args.limit,
        dist=dist,
        state_dir=state_dir,
        save_every=args.save_every,
        workers=args.workers,
    )
    if dist.is_main:
        print(report.metrics.table())
        print(f"{report.dataset}: {report.num_images} images, {len(report.failures)} failed")
        _write_json(
            args.json,
            {"model": {"clip": str(args.clip), "pacl_weights": _path_text(args.pacl_weights)}, **report.to_dict()},
        )
        for failure in report.failures:
            print(f"  failed: {failure['id']}: {failure['error']}", file=sys.stderr)
        if report.failures:
            print(f"{len(report.failures)} images failed; the numbers above leave them out", file=sys.stderr)
    clear_state(state_dir, dist)
    return 1 if report.failures else 0


def add_classify_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "classify",
        formatter_class=HELP,
        help="zero-shot classification with PACL's compatibility and with plain CLIP, side by side",
        description="Classify images into the given classes, or evaluate top-1 / top-5 on an ImageFolder "
        "(ROOT/CLASS/IMAGE) with --image-folder. Both scorers see the same pixels and prompts.",
    )
    parser.add_argument("images", nargs="*", help="image files")
    parser.add_argument("--labels", type=_labels, default=None, help="comma-separated class names: a,b,c")
    parser.add_argument(
        "--class-names",
        type=Path,
        default=None,
        help="class names file: one class per line, synonyms separated by commas (for --image-folder: one "
        "line per class folder, sorted; default: the folder names)",
    )
    parser.add_argument("--image-folder", type=Path, default=None, help="evaluate on ROOT/CLASS/IMAGE")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--templates", default="imagenet", help="imagenet (80), short (7), single, or 'a {} photo'")
    _add_run_arguments(parser, default_save_every=256)
    add_model_arguments(parser)


def run_classify(args: argparse.Namespace) -> int:
    from pacl_fast.zeroshot import METHODS, ZeroShotClassifier

    if (args.image_folder is None) == (not args.images):
        raise UsageError("give image files, or --image-folder ROOT (not both)")
    if args.method not in (None, "pacl"):
        raise UsageError("classify compares PACL's compatibility with CLIP: it runs --method pacl only")
    args.method = "pacl"
    check_weights_files(args)
    if args.image_folder is not None:
        from pacl_fast.data.classification import ImageFolder
        from pacl_fast.evaluate import evaluate_classification
        from pacl_fast.runs import clear_state

        folder = ImageFolder(args.image_folder, args.class_names)
        dist, device = _distributed(args)
        classifier = ZeroShotClassifier(_make_segmenter(args, device))
        state_dir = _state_dir(args, "classify")
        if args.restart:
            clear_state(state_dir, dist)
        report = evaluate_classification(
            classifier,
            folder,
            templates=args.templates,
            limit=args.limit,
            dist=dist,
            state_dir=state_dir,
            save_every=args.save_every,
            workers=args.workers,
        )
        if dist.is_main:
            print(report.table())
            _write_json(args.json, {"pacl_weights": _path_text(args.pacl_weights), **report.to_dict()})
            for failure in report.failures:
                print(f"  failed: {failure['id']}: {failure['error']}", file=sys.stderr)
        clear_state(state_dir, dist)
        return 1 if report.failures else 0

    from pacl_fast.data.names import read_class_names

    if (args.labels is None) == (args.class_names is None):
        raise UsageError("give --labels a,b,c or --class-names FILE")
    labels = args.labels if args.labels is not None else read_class_names(args.class_names)
    dist, device = _distributed(args)
    classifier = ZeroShotClassifier(_make_segmenter(args, device))
    results = classifier.classify(args.images, labels, templates=args.templates, top_k=args.top_k)
    payload = []
    for path, result in zip(args.images, results):
        print(path)
        print(f"  {'PACL':<32} CLIP")
        for (pacl_name, pacl_p), (clip_name, clip_p) in zip(result["pacl"], result["clip"]):
            print(f"  {pacl_name:<24} {pacl_p:6.1%}  {clip_name:<24} {clip_p:6.1%}")
        payload.append({"image": str(path), **{m: [{"class": n, "p": p} for n, p in result[m]] for m in METHODS}})
    _write_json(args.json, {"results": payload})
    return 0


def _image_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        try:
            height, _, width = part.strip().partition("x")
            sizes.append((int(height), int(width or height)))
        except ValueError as error:
            message = f"--image-sizes expects items like 224 or 448x336, comma-separated, got {text!r}"
            raise argparse.ArgumentTypeError(message) from error
    return sizes


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        formatter_class=HELP,
        help="export the encoders to ONNX, build TensorRT engines or OpenVINO (int8) models",
        description="Export the method's image tower (CLIP + PACL's embedder or a training-free last block; one "
        "graph per input size, dynamic batch) and the text tower to ONNX, or build TensorRT image engines or "
        "OpenVINO image models (fp32, bf16, or int8 quantised on calibration images) from those graphs. OUT is a "
        "cache folder: point an encoder at it (--encoder-cache OUT, or encoder_options={'cache_dir': OUT}) and it "
        "finds what was exported. Artifacts already there are reused, so an interrupted export resumes. Writes "
        "OUT/manifest.json.",
    )
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to export")
    export.add_argument("--out", required=True, type=Path, help="output (cache) folder")
    export.add_argument(
        "--image-sizes",
        type=_image_sizes,
        default=None,
        metavar="HxW,...",
        help="input sizes to export, e.g. 224,448x336 (default: the CLIP's native size)",
    )
    export.add_argument(
        "--max-batch", type=_positive_int("--max-batch"), default=32, help="TensorRT profile: batches 1..N"
    )
    export.add_argument(
        "--precision",
        "--dtype",
        dest="precision",
        default=None,
        choices=["fp32", "fp16", "bf16", "int8", "float32", "float16", "bfloat16"],
        help="onnx: fp32/fp16; tensorrt: fp16 (default)/fp32; openvino: fp32 (default)/bf16/int8",
    )
    calibration = export.add_mutually_exclusive_group()
    calibration.add_argument(
        "--calibration-images", type=Path, default=None, help="openvino int8: a folder of images like yours"
    )
    calibration.add_argument(
        "--calibration",
        choices=["synthetic"],
        default=None,
        help="openvino int8: calibrate on the synthetic world's scenes (the default for int8)",
    )
    export.add_argument(
        "--calibration-size", type=_positive_int("--calibration-size"), default=300, help="openvino int8: images"
    )
    group = export.add_argument_group("model")
    add_weights_arguments(group)


PRECISION_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def run_export(args: argparse.Namespace) -> int:
    from pacl_fast.build import build_model
    from pacl_fast.encoders import export_artifacts

    allowed, default = EXPORT_PRECISIONS[args.format]
    precision = PRECISION_NAMES.get(args.precision, args.precision) or default
    if precision not in allowed:
        raise UsageError(f"--format {args.format} builds {', '.join(allowed)}, not --precision {precision}")
    calibration = args.calibration_images or args.calibration
    if calibration is not None and precision != "int8":
        raise UsageError("--calibration-images / --calibration go with --format openvino --precision int8")
    check_weights_files(args)
    model, _ = build_model(args.clip, args.clip_weights, args.pacl_weights, method=args.method, device=args.device)
    size = model.backbone.image_size
    sizes = args.image_sizes or [(size, size)]
    export_artifacts(
        model,
        args.format,
        args.out,
        precision,
        sizes,
        max_batch=args.max_batch,
        calibration=calibration,
        calibration_size=args.calibration_size,
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "segment": run_segment,
    "eval": run_eval,
    "classify": run_classify,
    "export": run_export,
}


def run_demo_command(args: argparse.Namespace) -> int:
    from pacl_fast.demo import run_demo

    run_demo(args.out, num_images=args.num_images, seed=args.seed)
    return 0


COMMANDS["demo"] = run_demo_command


def run_command(name: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)`` as a command: logging to stderr, and errors as one line that says what to do
    (``PACL_FAST_DEBUG=1``: the traceback instead)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="pacl-fast: %(message)s", stream=sys.stderr)
    if os.environ.get("PACL_FAST_DEBUG"):
        return run(args)
    from pacl_fast.encoders.base import EncoderUnavailableError

    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"pacl-fast {name}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError, TypeError,
            EncoderUnavailableError) as error:  # fmt: skip
        print(f"pacl-fast {name}: error: {error}", file=sys.stderr)
        print("  (set PACL_FAST_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, COMMANDS[args.command], args)


if __name__ == "__main__":
    raise SystemExit(main())
