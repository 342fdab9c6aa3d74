"""The OpenVINO encoder (issue 15): its speed against torch eager, and the int8 accuracy guard.

    python -m benchmarks.openvino_check --json benchmarks/results/openvino_check.json
    python -m benchmarks.openvino_check --part speed --iters 8 --calibration-size 32
    python -m benchmarks.openvino_check --part accuracy --scenes 500

**speed**: ViT-B-16 (random init), 224 px, batch 4, 2 threads. Each round runs every job once
(the first job rotating, so a noisy shared machine slows all alike): the image encoder of
OpenVINO fp32, bf16 (where the CPU has bf16), int8 (NNCF on ``--calibration-size`` synthetic
training scenes) and torch eager fp32 / bf16, and 2048^3 matmuls in fp32, bf16 and int8
(``torch._int_mm``) for the machine's ceilings. The table gives images/s (median round), the
counted FLOPs per second and their fraction of each ceiling, and the cosine of every output
patch embedding to torch fp32's, on random pixels and on held-out synthetic scenes.

**accuracy**: the shipped demo CLIP + PACL on the synthetic world's held-out scenes (dataset
``synthetic``, split ``val``, seed 1; calibration uses training scenes, seed 0): mIoU through
``pacl_fast.evaluate.evaluate_segmentation`` with the torch fp32 encoder and OpenVINO fp32, bf16
(where the CPU has it) and int8. Goal: int8 within 1 mIoU point of torch fp32.

The machine line names the CPU and whether it has AVX512-BF16 / AMX / VNNI; the first run builds
the OpenVINO models (int8: quantization, minutes for ViT-B-16) into the cache, later runs load them.
"""

from __future__ import annotations

import os

# As in benchmarks.throughput: idle OpenMP threads sleep rather than spin (set before torch starts OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import encoder_flops, machine_line, matmul_seconds, versions, write_results  # noqa: E402
from benchmarks.throughput import Timings  # noqa: E402
from pacl_fast.backbone import RandomWeightsWarning, load_clip  # noqa: E402
from pacl_fast.data.synthetic import WorldConfig, render_scene  # noqa: E402
from pacl_fast.demo import TINY_CLIP_CONFIG  # noqa: E402
from pacl_fast.encoders import EncoderUnavailableError, TorchEncoder  # noqa: E402
from pacl_fast.images import normalize  # noqa: E402
from pacl_fast.model import PACL  # noqa: E402

MATMUL = 2048


def cpu_flags() -> str:
    """The bf16/int8 matrix instructions this CPU reports (``/proc/cpuinfo`` flags)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "flags unknown"
    present = set(flags.split(":", 1)[1].split())
    wanted = ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")
    return "CPU flags: " + ", ".join(f"{flag} {'yes' if flag in present else 'no'}" for flag in wanted)


def int8_matmul_seconds(size: int) -> Callable[[], float] | None:
    """A timer of one ``size``^3 int8 x int8 -> int32 matmul (``torch._int_mm``), or None where torch has none."""
    a = torch.randint(-128, 128, (size, size), dtype=torch.int8)
    b = torch.randint(-128, 128, (size, size), dtype=torch.int8)
    try:
        torch._int_mm(a, b)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None

    def run() -> float:
        start = time.perf_counter()
        torch._int_mm(a, b)
        return time.perf_counter() - start

    return run


def scenes(count: int, size: int, mean, std) -> torch.Tensor:  # noqa: ANN001
    """Normalised ``[count, 3, size, size]`` held-out scenes (validation seed 1), rendered at ``size``."""
    images = np.stack([render_scene(i, 1, WorldConfig(image_size=size)).image for i in range(count)])
    return normalize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, mean, std)


def cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    values = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return values.min().item(), values.mean().item()


# --- speed ----------------------------------------------------------------------------------------------


def run_speed(args: argparse.Namespace) -> dict:
    from pacl_fast.encoders.openvino_encoder import OpenVINOEncoder

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = PACL(load_clip(TINY_CLIP_CONFIG if args.model == "tiny" else args.model)).eval()
    size = args.image_size
    flops = encoder_flops(model, size)
    print(f"encoder: {flops / 1e9:.2f} GFLOP per image (counted: backbone + embedder, attention included)")
    torch.manual_seed(1)
    pixels = torch.randn(args.batch, 3, size, size)
    held_out = scenes(args.batch, size, *model.backbone.mean_std)

    encoders: dict[str, object] = {}
    setup: dict[str, float] = {}
    skipped: dict[str, str] = {}
    specs = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]
    for name, precision in specs:
        label = f"{name}:{precision}"
        start = time.perf_counter()
        try:
            if name == "torch":
                dtype = torch.float32 if precision == "fp32" else torch.bfloat16
                encoder = TorchEncoder(copy.deepcopy(model), dtype)
            else:
                options = {"calibration": "synthetic", "calibration_size": args.calibration_size}
                encoder = OpenVINOEncoder(
                    model,
                    precision,
                    cache_dir=args.cache,
                    threads=args.threads,
                    hint=args.hint,
                    **(options if precision == "int8" else {}),
                )
            encoder.encode_image(pixels)  # exports, conversion, quantization happen here
        except EncoderUnavailableError as error:
            skipped[label] = str(error)
            print(f"skip {label}: {error}", file=sys.stderr)
            continue
        setup[label] = time.perf_counter() - start
        encoders[label] = encoder
        print(f"ready {label} in {setup[label]:.1f} s", file=sys.stderr)

    reference = {
        "random": encoders["torch:fp32"].encode_image(pixels),
        "scenes": encoders["torch:fp32"].encode_image(held_out),
    }
    cosines = {
        label: {
            kind: cosine(encoder.encode_image(inputs), reference[kind])
            for kind, inputs in (("random", pixels), ("scenes", held_out))
        }
        for label, encoder in encoders.items()
    }

    jobs: dict[str, Callable[[], float]] = {}
    for label, encoder in encoders.items():

        def job(encoder=encoder) -> float:  # noqa: ANN001
            start = time.perf_counter()
            encoder.encode_image(pixels)
            return time.perf_counter() - start

        jobs[label] = job
    ceilings_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for dtype_name, dtype in ceilings_dtypes.items():
        jobs[f"matmul/{dtype_name}"] = matmul_seconds(MATMUL, dtype, torch.device("cpu"))
    int8_timer = int8_matmul_seconds(MATMUL)
    if int8_timer is not None:
        jobs["matmul/int8"] = int8_timer
    timings = {label: Timings() for label in jobs}
    order = list(jobs)
    from tqdm.auto import tqdm

    for round_index in tqdm(range(args.warmup + args.iters), desc="rounds", file=sys.stderr):
        shift = round_index % len(order)
        for label in order[shift:] + order[:shift]:
            seconds = jobs[label]()
            if round_index >= args.warmup:
                timings[label].add(seconds)
    ceilings = {
        name.removeprefix("matmul/"): 2 * MATMUL**3 / t.median
        for name, t in timings.items()
        if name.startswith("matmul/")
    }
    base = args.batch / timings["torch:fp32"].median
    rows = []
    for label in encoders:
        median = timings[label].median
        rate = flops * args.batch / median
        rows.append(
            {
                "encoder": label,
                "images_per_s": args.batch / median,
                "vs_torch_fp32": args.batch / median / base,
                "ms_per_image": median * 1e3 / args.batch,
                "p95_ms_per_image": timings[label].percentile(0.95) * 1e3 / args.batch,
                "gflops": rate / 1e9,
                **{f"pct_of_{name}_ceiling": 100 * rate / ceiling for name, ceiling in ceilings.items()},
                "cosine_random_min": cosines[label]["random"][0],
                "cosine_random_mean": cosines[label]["random"][1],
                "cosine_scenes_min": cosines[label]["scenes"][0],
                "cosine_scenes_mean": cosines[label]["scenes"][1],
                "setup_s": setup[label],
            }
        )
    print()
    print(
        f"matmul ceilings ({MATMUL}^3, median round): "
        + ", ".join(
            f"{name} {value / 1e9:.0f} G{'OP' if name == 'int8' else 'FLOP'}/s" for name, value in ceilings.items()
        )
    )
    for label, reason in skipped.items():
        print(f"skipped {label}: {reason}")
    names = list(ceilings)
    header = (
        "| encoder | images/s | vs torch fp32 | ms/img | p95 ms/img | GFLOP/s | "
        + " | ".join(f"% {n} ceiling" for n in names)
        + " | cos min (random) | cos mean (random) | cos min (scenes) | cos mean (scenes) | setup s |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(
            f"| {r['encoder']} | {r['images_per_s']:.2f} | {r['vs_torch_fp32']:.2f}x | {r['ms_per_image']:.1f} "
            f"| {r['p95_ms_per_image']:.1f} | {r['gflops']:.0f} | "
            + " | ".join(f"{r[f'pct_of_{n}_ceiling']:.0f}%" for n in names)
            + f" | {r['cosine_random_min']:.5f} | {r['cosine_random_mean']:.5f} | {r['cosine_scenes_min']:.5f} "
            f"| {r['cosine_scenes_mean']:.5f} | {r['setup_s']:.1f} |"
        )
    return {
        "config": {
            "model": f"{args.model} (random init)",
            "image_size": size,
            "batch": args.batch,
            "threads": args.threads,
            "hint": args.hint,
            "calibration": f"synthetic, {args.calibration_size} scenes",
            "warmup": args.warmup,
            "iters": args.iters,
        },
        "encoder_flops_per_image": flops,
        "ceilings": ceilings,
        "rows": rows,
        "skipped": skipped,
        "samples_s": {label: t.samples for label, t in timings.items()},
    }


# --- accuracy -------------------------------------------------------------------------------------------


def miou_by_hand(segmenter, dataset, limit: int) -> float:  # noqa: ANN001
    """mIoU over ``Segmenter.predict`` outputs with the project's confusion matrix (if ``evaluate`` is unusable)."""
    from pacl_fast.metrics import SegmentationMetrics, confusion_matrix

    confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64)
    for index in range(limit):
        image, mask = dataset[index]
        result = segmenter.predict(image, list(dataset.classes), templates=dataset.templates)
        confusion += confusion_matrix(result.labels, mask, dataset.num_classes, dataset.ignore_index)
    return SegmentationMetrics(tuple(dataset.classes), confusion.numpy()).miou


def run_accuracy(args: argparse.Namespace) -> dict:
    from pacl_fast.build import DEMO_CLIP, DEMO_PACL
    from pacl_fast.data.segmentation import open_dataset
    from pacl_fast.segmenter import Segmenter

    dataset = open_dataset("synthetic", None, "val")
    limit = min(args.scenes, len(dataset))
    specs = [
        ("torch fp32", "torch", {}),
        ("openvino fp32", "openvino", {"precision": "fp32"}),
        ("openvino bf16", "openvino", {"precision": "bf16"}),
        (
            "openvino int8",
            "openvino",
            {"precision": "int8", "calibration": "synthetic", "calibration_size": args.calibration_size},
        ),
    ]
    results, skipped = {}, {}
    for label, encoder, options in specs:
        if encoder == "openvino":
            options = {**options, "cache_dir": args.cache, "threads": args.threads}
        start = time.perf_counter()
        try:
            segmenter = Segmenter(  # named choices: the rows are these precisions, not what "auto" would pick
                f"local-dir:{DEMO_CLIP}",
                pacl_weights=DEMO_PACL,
                device="cpu",
                dtype="float32" if encoder == "torch" else None,
                encoder=encoder,
                encoder_options=options,
            )
        except EncoderUnavailableError as error:
            skipped[label] = str(error)
            print(f"skip {label}: {error}", file=sys.stderr)
            continue
        try:
            from pacl_fast.evaluate import evaluate_segmentation

            report = evaluate_segmentation(segmenter, dataset, limit=limit, progress=True)
            miou, how = report.metrics.miou, "evaluate_segmentation"
        except Exception as error:  # noqa: BLE001 - the evaluate API may be mid-refactor: count by hand
            print(f"evaluate_segmentation failed ({type(error).__name__}: {error}); counting by hand", file=sys.stderr)
            miou, how = miou_by_hand(segmenter, dataset, limit), "Segmenter.predict + metrics.confusion_matrix"
        results[label] = {"miou": 100 * miou, "seconds": time.perf_counter() - start, "computed_with": how}
        print(f"{label}: mIoU {100 * miou:.2f} ({limit} scenes, {results[label]['seconds']:.0f} s)", file=sys.stderr)
    reference = results["torch fp32"]["miou"]
    print()
    for label, reason in skipped.items():
        print(f"skipped {label}: {reason}")
    print(f"| encoder | mIoU ({limit} held-out scenes) | vs torch fp32 (points) | seconds |")
    print("|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['miou']:.2f} | {r['miou'] - reference:+.2f} | {r['seconds']:.0f} |")
    if "openvino int8" in results:
        gap = abs(results["openvino int8"]["miou"] - reference)
        verdict = "met" if gap <= 1.0 else "NOT met"
        print(f"int8 accuracy guard (within 1 point of torch fp32): {verdict} ({gap:.2f} points)")
    return {
        "config": {
            "model": "shipped demo CLIP + PACL",
            "dataset": "synthetic val (seed 1)",
            "scenes": limit,
            "calibration": f"synthetic training scenes (seed 0), {args.calibration_size}",
        },
        "results": results,
        "skipped": skipped,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.openvino_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["speed", "accuracy", "both"], default="both")
    parser.add_argument(
        "--model",
        default="ViT-B-16",
        help="open_clip model for the speed part, random init, or 'tiny' (default ViT-B-16)",
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenVINO threads (default 2)")
    parser.add_argument(
        "--hint", default="LATENCY", choices=["LATENCY", "THROUGHPUT"], help="OpenVINO performance hint"
    )
    parser.add_argument("--calibration-size", type=int, default=300, help="synthetic scenes for int8 (default 300)")
    parser.add_argument("--scenes", type=int, default=500, help="held-out scenes for the accuracy part (default 500)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=None, help="encoder cache (default ~/.cache/pacl-fast)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_line(torch.device("cpu"))
    print(machine)
    print(cpu_flags())
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}, load average: {os.getloadavg()[0]:.1f} (1 min)")
    payload: dict = {
        "machine": machine,
        "cpu_flags": cpu_flags(),
        "versions": {**versions(), "openvino": _version("openvino"), "nncf": _version("nncf")},
        "command": "python -m benchmarks.openvino_check " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.part in ("speed", "both"):
        payload["speed"] = run_speed(args)
    if args.part in ("accuracy", "both"):
        payload["accuracy"] = run_accuracy(args)
    payload["load_average_end"] = os.getloadavg()
    if args.json:
        write_results(args.json, payload)
    return 0


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    raise SystemExit(main())
