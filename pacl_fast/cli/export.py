"""``pacl-fast export``: the method's encoders as ONNX graphs, TensorRT engines or OpenVINO models."""

from __future__ import annotations

import argparse
from pathlib import Path

import pacl_fast.cli.common as common
from pacl_fast.choices import EXPORT_FORMATS, EXPORT_PRECISIONS


def image_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        try:
            height, _, width = part.strip().partition("x")
            sizes.append((int(height), int(width or height)))
        except ValueError as error:
            message = f"--image-sizes expects items like 224 or 448x336, comma-separated, got {text!r}"
            raise argparse.ArgumentTypeError(message) from error
    return sizes


def add_parser(sub: common.Subcommands) -> None:
    export = sub.add_parser(
        "export",
        formatter_class=common.HELP,
        help="export the encoders to ONNX, build TensorRT engines or OpenVINO (int8) models",
        description="Export the method's image tower (CLIP + PACL's embedder or a training-free last block; one "
        "graph per input size, dynamic batch) and the text tower to ONNX, or build TensorRT image engines or "
        "OpenVINO image models (fp32, bf16, or int8 quantised on calibration images) from those graphs. OUT is a "
        "cache folder: point an encoder at it (--encoder-cache OUT, or encoder_options={'cache_dir': OUT}) and it "
        "finds what was exported. Artifacts already there are reused, so an interrupted export resumes. Writes "
        "OUT/manifest.json.",
    )
    common.add_verbose(export)
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to export")
    export.add_argument("--out", required=True, type=Path, help="output (cache) folder")
    export.add_argument(
        "--image-sizes",
        type=image_sizes,
        default=None,
        metavar="HxW,...",
        help="input sizes to export, e.g. 224,448x336 (default: the model's input size, square)",
    )
    export.add_argument(
        "--max-batch", type=common.positive_int("--max-batch"), default=32, help="TensorRT profile: batches 1..N"
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
        "--calibration-size", type=common.positive_int("--calibration-size"), default=300, help="openvino int8: images"
    )
    group = export.add_argument_group("model")
    common.add_weights_arguments(group)


PRECISION_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def run(args: argparse.Namespace) -> int:
    from pacl_fast.build import build_model
    from pacl_fast.encoders import export_artifacts

    allowed, default = EXPORT_PRECISIONS[args.format]
    precision = PRECISION_NAMES.get(args.precision, args.precision) or default
    if precision not in allowed:
        raise common.UsageError(f"--format {args.format} builds {', '.join(allowed)}, not --precision {precision}")
    calibration = args.calibration_images or args.calibration
    if calibration is not None and precision != "int8":
        raise common.UsageError("--calibration-images / --calibration go with --format openvino --precision int8")
    common.check_weights_files(args)
    model, _ = build_model(
        args.clip, args.clip_weights, args.pacl_weights, method=args.method, device=args.device,
        strict_clip=args.strict_clip, vfm=args.vfm, vfm_weights=args.vfm_weights,
    )  # fmt: skip
    size = model.model_defaults.image_size  # the model's input size, as a Segmenter runs it by default
    sizes = args.image_sizes or [(size, size)]
    shown = ", ".join(f"{h}x{w}" for h, w in sizes)
    vfm = f", vfm={model.vfm.identity}" if getattr(model, "vfm", None) is not None else ""
    common.say(f"export {args.format} {precision} of method={model.method}, clip={model.display_name}{vfm}, "
        f"image sizes {shown} -> {args.out}")  # fmt: skip
    try:
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
    except KeyboardInterrupt:
        raise common.Interrupted(
            f"what was finished is in {args.out} and is reused: run the same command again to resume"
        ) from None
    return 0
