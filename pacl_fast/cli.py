"""The ``pacl-fast`` command line: ``segment``, ``demo`` and ``export``."""

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
    group.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="encoder precision (default: float16 for tensorrt, else float32)",
    )
    group.add_argument("--image-size", type=int, default=None, help="short side the model sees (default: CLIP's)")
    group.add_argument("--backend", default="reference", help="head backend (default: reference)")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument(
        "--encoder",
        default="torch",
        choices=["torch", "compile", "onnxruntime", "tensorrt"],
        help="image/text encoder backend (default: torch, eager)",
    )
    group.add_argument(
        "--encoder-cache", type=Path, default=None, help="exported graphs / engines (default ~/.cache/pacl-fast)"
    )


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
    add_export_parser(sub)
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
        encoder=args.encoder,
        encoder_options={"cache_dir": args.encoder_cache} if args.encoder in ("onnxruntime", "tensorrt") else None,
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
        help="export the encoders to ONNX or build TensorRT engines",
        description="Export PACL's image tower (one graph per input size, dynamic batch) and text tower to ONNX, "
        "or build TensorRT image engines from those graphs. OUT is a cache folder: point an encoder at it "
        "(--encoder-cache OUT, or encoder_options={'cache_dir': OUT}) and it finds what was exported. "
        "Artifacts already there are reused, so an interrupted export resumes. Writes OUT/manifest.json.",
    )
    export.add_argument("--format", required=True, choices=["onnx", "tensorrt"])
    export.add_argument("--out", required=True, type=Path, help="output (cache) folder")
    export.add_argument(
        "--image-sizes",
        type=_image_sizes,
        default=None,
        metavar="HxW,...",
        help="input sizes to export, e.g. 224,448x336 (default: the CLIP's native size)",
    )
    export.add_argument("--max-batch", type=int, default=32, help="TensorRT profile: batches 1..N (default 32)")
    group = export.add_argument_group("model")
    group.add_argument("--clip", default="ViT-B-16", help="open_clip model name or local-dir:PATH (default ViT-B-16)")
    group.add_argument("--clip-weights", default=None, help="pretrained tag (hub) or local checkpoint file")
    group.add_argument("--pacl-weights", default=None, help="PACL weights (.safetensors)")
    group.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    group.add_argument(
        "--dtype", default=None, choices=["float32", "float16"], help="graph precision (default: float16 for tensorrt)"
    )


def run_export(args: argparse.Namespace) -> int:
    import json

    from tqdm.auto import tqdm

    from pacl_fast.encoders import DEFAULT_DTYPES, EncoderUnavailableError
    from pacl_fast.encoders.export import IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT, OnnxCache
    from pacl_fast.segmenter import Segmenter, resolve_dtype

    backend = "onnxruntime" if args.format == "onnx" else "tensorrt"
    dtype = resolve_dtype(args.dtype) if args.dtype else DEFAULT_DTYPES[backend]
    segmenter = Segmenter(args.clip, args.clip_weights, args.pacl_weights, device=args.device, dtype="float32")
    model = segmenter.model
    sizes = args.image_sizes or [(segmenter.image_size, segmenter.image_size)]
    try:
        onnx = OnnxCache(model, dtype, args.out)
        if args.format == "tensorrt":
            from pacl_fast.encoders.tensorrt_encoder import TensorRTEncoder

            trt_encoder = TensorRTEncoder(model, dtype, max_batch=args.max_batch, cache_dir=args.out)
    except EncoderUnavailableError as error:
        print(f"pacl-fast export: {error}", file=sys.stderr)
        return 2
    dtype_name = str(dtype).removeprefix("torch.")
    manifest = {"format": args.format, "dtype": dtype_name, "key": onnx.key, "artifacts": []}
    steps = [("image", size) for size in sizes] + ([("text", None)] if args.format == "onnx" else [])
    embed_dim = model.config.embed_dim
    for tower, size in tqdm(steps, desc=f"export {args.format}", unit="graph"):
        if tower == "text":
            path = onnx.text()
            entry = {
                "input": {"name": TEXT_INPUT, "shape": ["T", model.backbone.context_length], "dtype": "int64"},
                "output": {"name": TEXT_OUTPUT, "shape": ["T", embed_dim], "dtype": dtype_name},
            }
        else:
            if args.format == "tensorrt":
                path = trt_encoder.engine_path(size)
                if not path.is_file():
                    trt_encoder.build(size)
            else:
                path = onnx.image(size)
            grid = [size[0] // segmenter.patch_size, size[1] // segmenter.patch_size]
            entry = {
                "input": {"name": IMAGE_INPUT, "shape": ["B", 3, *size], "dtype": dtype_name},
                "output": {"name": IMAGE_OUTPUT, "shape": ["B", *grid, embed_dim], "dtype": dtype_name},
            }
            if args.format == "tensorrt":
                entry["batch_range"] = [1, args.max_batch]
        manifest["artifacts"].append({"tower": tower, "path": str(path.relative_to(args.out)), **entry})
        tqdm.write(f"{tower}{' ' + 'x'.join(map(str, size)) if size else ''}: {path}")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "segment":
        return run_segment(args)
    if args.command == "demo":
        from pacl_fast.demo import run_demo

        run_demo(args.out, num_images=args.num_images, seed=args.seed)
        return 0
    if args.command == "export":
        return run_export(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
