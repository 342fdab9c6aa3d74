"""End-to-end segmentation throughput: the naive peer against every encoder backend x head.

    python -m benchmarks.throughput                      # ViT-B-16 (random init), 224 px, batch 4,
                                                         # 150 classes, 512x512 outputs
    python -m benchmarks.throughput --backends torch:fp32,compile:bf16 --iters 20 --json out.json
    python -m benchmarks.throughput --methods pacl,naclip,sclip --heads none   # training-free towers' cost

What is timed, per round (all pipelines take turns each round, so a noisy shared machine slows
them alike; the first pipeline of a round rotates):

* **naive peer**: what public PACL re-implementations write: open_clip's ViT with
  ``output_tokens=True`` in eager fp32 and the PACL embedder (its encoder), then cosine logits,
  ``F.interpolate`` to the output size and ``argmax`` (its head).
* **encoders**: each method's model (``--methods``: PACL, or a training-free last block), built by
  ``pacl_fast.build``, through each backend's ``encode_image`` (``[B, 3, S, S]`` -> unit
  ``[B, h, w, E]``); ``openvino:int8`` is OpenVINO's NNCF-quantised graph.
* **heads**: ``Segmenter.segment_patches`` (the head's half of ``predict_torch``) for each head
  backend (``pacl_fast.head.BACKENDS``), from patch embeddings to int16 labels and float32 scores
  at the output size (similarity + upsample + argmax + score); ``name:labels`` is the same head
  without scores (``with_scores=False``): labels only, the job the naive peer's head does.
  A head's cost does not depend on which encoder made its input, so each head is timed once per
  round, on the fp32 patches of the random-init ViT: logits with no spatial structure, the
  pruning's worst case. ``scene:`` rows time the same heads on the scene-like logits of
  ``benchmarks.head`` (what trained models produce), labelled as such.
* **default**: ``Segmenter(model)`` with no speed options (``dtype`` and ``encoder`` ``"auto"``, the
  ``fast`` head with scores): what a user gets, its choice named in the row. It is built before any
  other encoder, so an export this run makes cannot change its choice (one cached by an earlier run
  can, as it would for the user: the row says so).
* **matmul ceiling**: a large fp32 and bf16 matmul (fp16 too on CUDA), in the same rounds.

A pipeline's end-to-end sample for a round is its encoder's time plus its head's time in that
round (the naive peer's two halves alike): the stages run back to back (synchronised on CUDA),
so this is what one call costs, and it shows where the time goes.

Speed-ups are ratios against the naive peer of the same run. FLOPs per image are counted
(``torch.utils.flop_counter``, attention included) on the encoder graph, so the table says what
fraction of the measured bf16 matmul ceiling each encoder reaches. Peak memory is the peak of
live tensors above the start (CUDA: ``max_memory_allocated``; CPU:
``pacl_fast.profiling.TensorMemoryTracker``), measured in one untimed pass of encoder then head.
On CPU the tracker cannot see inside onnxruntime or a compiled graph: there only their output
counts, which the head's peak dwarfs anyway.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. On a machine shared with other jobs a spinning
# thread burns the core that a descheduled peer needs, and every parallel op waits for the
# straggler: ViT-B-16 bf16 ran 2.7x slower that way here (552 against 206 ms/image, load ~3 on
# 2 cores) while a lone 2048^3 matmul did not change. Must be set before torch starts OpenMP;
# export OMP_WAIT_POLICY=ACTIVE to measure the other way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    encoder_flops,
    machine_line,
    matmul_seconds,
    matmul_size,
    parse_size,
    peak_bytes,
    timed,
    versions,
    write_results,
)
from benchmarks.head import scene_logits  # noqa: E402
from pacl_fast.backbone import RandomWeightsWarning  # noqa: E402
from pacl_fast.build import build_model  # noqa: E402
from pacl_fast.demo import TINY_CLIP_CONFIG  # noqa: E402
from pacl_fast.encoders import EncoderUnavailableError, make_encoder  # noqa: E402
from pacl_fast.head import BACKENDS, Head  # noqa: E402
from pacl_fast.segmenter import Segmenter  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Encoder precisions: torch dtypes, and ``int8`` (OpenVINO's NNCF quantisation; float32 outputs).
PRECISIONS = (*DTYPES, "int8")
#: Every backend this project has, by device: one that is not installed is skipped with the reason printed.
CPU_BACKENDS = "torch:fp32,torch:bf16,compile:bf16,onnxruntime:fp32,openvino:fp32,openvino:bf16,openvino:int8"
CUDA_BACKENDS = "torch:fp16,compile:fp16,onnxruntime:fp16,tensorrt:fp16"


# --- the pipelines ----------------------------------------------------------------------------------


class NaivePeer:
    """The straightforward PACL inference of public re-implementations, eager fp32.

    open_clip tokens (``output_tokens=True``; at a non-native size its positional embedding is
    resized first, as such code does when loading) -> PACL embedder -> cosine logits ->
    ``F.interpolate`` -> ``argmax``.
    """

    def __init__(self, model: torch.nn.Module, image_size: int):
        backbone = model.backbone
        self.visual = copy.deepcopy(backbone.visual).float().eval()
        grid = image_size // backbone.patch_size
        if (grid, grid) != tuple(backbone.visual.grid_size):
            resized = backbone.positional_embedding((grid, grid), torch.float32, backbone.visual.conv1.weight.device)
            self.visual.positional_embedding = torch.nn.Parameter(resized.clone())
        self.visual.output_tokens = True
        self.embedder = copy.deepcopy(model.embedder).float().eval()
        self.grid = grid

    @torch.no_grad()
    def tokens_to_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(pixels)  # [B, h*w, D]
        return F.normalize(self.embedder(tokens), dim=-1)  # [B, h*w, E]

    @torch.no_grad()
    def head(self, patches: torch.Tensor, classes: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        logits = patches @ classes.T  # [B, h*w, C]
        logits = logits.transpose(1, 2).reshape(patches.shape[0], -1, self.grid, self.grid)  # [B, C, h, w]
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)  # [B, C, H, W]
        return logits.argmax(dim=1)  # [B, H, W]

    def __call__(self, pixels: torch.Tensor, classes: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return self.head(self.tokens_to_embeddings(pixels), classes, out_size)


def parse_head(spec: str) -> tuple[Head, bool]:
    """``name`` or ``name:labels`` (no scores) -> the head and whether it computes scores."""
    name, _, mode = spec.partition(":")
    if mode not in ("", "labels"):
        raise ValueError(f"head {spec!r}: expected a backend of {BACKENDS}, optionally with ':labels'")
    return Head(name), mode != "labels"


def parse_methods(text: str) -> list[str]:
    from pacl_fast.methods import METHODS

    methods = [part.strip() for part in text.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"--methods takes names of {METHODS}, got {text!r}")
    return methods


@dataclass
class Timings:
    samples: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def parse_backends(text: str) -> list[tuple[str, str, bool]]:
    """``name:dtype[:cl]`` items -> (encoder name, dtype name, channels_last)."""
    specs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        bad_int8 = len(parts) > 1 and parts[1] == "int8" and parts[0] != "openvino"
        if len(parts) not in (2, 3) or parts[1] not in PRECISIONS or (len(parts) == 3 and parts[2] != "cl") or bad_int8:
            expected = f"name:dtype[:cl] with dtype in {list(PRECISIONS)} (int8: openvino only)"
            raise argparse.ArgumentTypeError(f"--backends items are {expected}, got {item!r}")
        specs.append((parts[0], parts[1], len(parts) == 3))
    return specs


def parse_batches(text: str) -> list[int]:
    batches = [int(part) for part in text.split(",")]
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"--batch expects positive sizes like 4 or 1,32,128, got {text!r}")
    return batches


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="ViT-B-16", help="open_clip model name, random init, or 'tiny' (default ViT-B-16)"
    )
    parser.add_argument(
        "--methods",
        type=parse_methods,
        default=["pacl"],
        help="methods whose encoders are timed, comma-separated (default pacl): pacl (untrained embedder, "
        "same cost as trained) or training-free last blocks (maskclip, sclip, clearclip, naclip)",
    )
    parser.add_argument("--image-size", type=int, default=224, help="square model input side (default 224)")
    parser.add_argument("--batch", type=parse_batches, default=[4], help="images per call, e.g. 4 or 1,32,128")
    parser.add_argument("--classes", type=int, default=150, help="number of classes (default 150)")
    parser.add_argument("--output-size", type=parse_size, default=(512, 512), help="HxW of the outputs (default 512)")
    parser.add_argument(
        "--backends",
        type=parse_backends,
        default=None,
        help=f"encoders as name:dtype[:cl] (cl: channels-last input), default on CPU {CPU_BACKENDS}, "
        f"on CUDA {CUDA_BACKENDS}",
    )
    parser.add_argument(
        "--heads",
        default=None,
        help=f"head backends of {BACKENDS}, comma-separated, each optionally name:labels (labels only, no "
        "scores), or none (default: reference, fast, tiled, fast:labels; triton too on CUDA)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    parser.add_argument("--iters", type=int, default=8, help="timed rounds (default 8)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cache", type=Path, default=None, help="ONNX/TensorRT cache (default ~/.cache/pacl-fast)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def default_heads(device: torch.device) -> list[str]:
    # The Triton backend on CPU tensors runs in Triton's interpreter: a correctness tool, not a speed.
    names = [name for name in BACKENDS if not (device.type == "cpu" and name == "triton")]
    return names + ["fast:labels"]


@dataclass
class Setup:
    """Everything built before timing: the model's FLOPs, the naive peer, encoders and heads."""

    device: torch.device
    flops: dict[str, int]  # method -> FLOPs per image
    naive: NaivePeer
    encoders: dict[str, object]  # "method/backend:dtype" (method omitted for pacl) -> encoder
    setup_seconds: dict[str, float]
    heads: dict[str, tuple[Segmenter, bool]]  # spec -> (segmenter with that head, with_scores)
    classes: torch.Tensor  # [C, E]
    skipped: dict[str, str]
    default: Segmenter | None  # Segmenter(model) as a user makes it; None with --heads none


def encoder_label(method: str, backend: str) -> str:
    return backend if method == "pacl" else f"{method}/{backend}"


def build(args: argparse.Namespace, device: torch.device) -> Setup:
    models = {}
    for method in dict.fromkeys(["pacl", *args.methods]):  # PACL always: the naive peer is PACL's
        torch.manual_seed(0)  # every method on the same random CLIP
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            models[method], _ = build_model(
                TINY_CLIP_CONFIG if args.model == "tiny" else args.model, method=method, device=device
            )
        models[method].eval()
    flops = {method: encoder_flops(models[method], args.image_size) for method in args.methods}
    for method, count in flops.items():
        print(f"{method} encoder FLOPs per image: {count / 1e9:.2f} GFLOP (counted, attention included)")
    pacl = models["pacl"]
    classes = F.normalize(torch.randn(args.classes, pacl.backbone.embed_dim, device=device), dim=-1)  # [C, E]
    probe = torch.randn(max(args.batch), 3, args.image_size, args.image_size, device=device)
    skipped: dict[str, str] = {}
    naive = NaivePeer(pacl, args.image_size)
    encoders, setup_seconds = {}, {}
    default = None
    if args.heads:  # first, so that no export of this run changes what "auto" picks
        start = time.perf_counter()
        default = Segmenter(pacl)
        for batch in args.batch:
            default.predict_torch(probe[:batch], classes, args.output_size)
        setup_seconds["default"] = time.perf_counter() - start
        print(f"ready default Segmenter(...): {default.choices} in {setup_seconds['default']:.1f} s", file=sys.stderr)
    for method in args.methods:
        for name, dtype_name, channels_last in args.backends:
            label = encoder_label(method, f"{name}:{dtype_name}" + (":cl" if channels_last else ""))
            options = {"channels_last": True} if channels_last else {}
            if name in ("onnxruntime", "tensorrt", "openvino"):
                options["cache_dir"] = args.cache
            if name == "tensorrt":
                options["max_batch"] = max(args.batch)
            dtype = DTYPES.get(dtype_name)
            if dtype_name == "int8":
                dtype, options["precision"] = None, "int8"
            start = time.perf_counter()
            try:
                encoder = make_encoder(name, models[method], dtype, **options)
                for batch in args.batch:  # exports / compiles / quantisation / engine builds happen here
                    encoder.encode_image(probe[:batch])
            except (EncoderUnavailableError, ValueError, TypeError) as error:
                skipped[label] = str(error)
                print(f"skip encoder {label}: {error}", file=sys.stderr)
                continue
            setup_seconds[label] = time.perf_counter() - start
            encoders[label] = encoder
            print(f"ready {label} in {setup_seconds[label]:.1f} s", file=sys.stderr)
    heads = {}
    patches = naive.tokens_to_embeddings(probe[:1]).reshape(1, naive.grid, naive.grid, -1)  # [1, h, w, E]
    for name in args.heads:
        try:
            head, with_scores = parse_head(name)
            segmenter = Segmenter(pacl, encoder=encoders.get("torch:fp32") or make_encoder("torch", pacl), head=head)
            segmenter.segment_patches(patches, classes, args.output_size, with_scores=with_scores)
            heads[name] = (segmenter, with_scores)
        except Exception as error:  # noqa: BLE001 - a head that cannot run here is reported, not fatal
            skipped[f"head {name}"] = f"{type(error).__name__}: {error}"
            print(f"skip head {name}: {error}", file=sys.stderr)
    return Setup(device, flops, naive, encoders, setup_seconds, heads, classes, skipped, default)


def time_rounds(setup: Setup, args: argparse.Namespace, batch: int) -> tuple[dict[str, Timings], dict[str, int]]:
    """Every job once per round, in a new (seeded) order each round; then one untimed pass each for peak memory."""
    device, naive, classes, out_size = setup.device, setup.naive, setup.classes, args.output_size
    pixels = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    naive_patches = naive.tokens_to_embeddings(pixels)  # [B, h*w, E]
    fp32_patches = naive_patches.reshape(batch, naive.grid, naive.grid, -1)  # [B, h, w, E]
    scene = scene_logits(args.classes, (naive.grid, naive.grid)).to(device).expand(batch, -1, -1, -1).contiguous()
    jobs: dict[str, Callable[[], object]] = {
        "naive/encoder": lambda: naive.tokens_to_embeddings(pixels),
        "naive/head": lambda: naive.head(naive_patches, classes, out_size),
    }
    for label, encoder in setup.encoders.items():
        jobs[f"encoder/{label}"] = lambda encoder=encoder: encoder.encode_image(pixels)
    for name, (segmenter, with_scores) in setup.heads.items():
        jobs[f"head/{name}"] = lambda s=segmenter, w=with_scores: s.segment_patches(
            fp32_patches, classes, out_size, with_scores=w
        )
        jobs[f"head/scene:{name}"] = lambda s=segmenter, w=with_scores: s.segment_logits(scene, out_size, with_scores=w)
    if setup.default is not None:  # its head runs on its own encoder's output, as in predict_torch
        default = setup.default
        default_patches = default.encoder.encode_image(pixels)  # [B, h, w, E]
        jobs["encoder/default"] = lambda: default.encoder.encode_image(pixels)
        jobs["head/default"] = lambda: default.segment_patches(default_patches, classes, out_size)
    for dtype_name in ceiling_dtypes(device):
        jobs[f"matmul/{dtype_name}"] = matmul_seconds(matmul_size(device), DTYPES[dtype_name], device)
    timings = {label: Timings() for label in jobs}
    order = list(jobs)
    # A new order each round (seeded): a job right after the reference head (1.2 GB of temporaries freed)
    # measured up to 1.45x slower than the same code elsewhere; a rotation kept that neighbour in every round.
    shuffler = random.Random(0)
    from tqdm.auto import tqdm

    for round_index in tqdm(range(args.warmup + args.iters), desc=f"batch {batch}", file=sys.stderr):
        shuffler.shuffle(order)
        for label in order:
            if label.startswith("matmul/"):
                seconds = jobs[label]()
            else:
                seconds, _ = timed(jobs[label], device)
            if round_index >= args.warmup:
                timings[label].add(seconds)
    peaks = {label: peak_bytes(job, device) for label, job in jobs.items() if not label.startswith("matmul/")}
    peaks["naive"] = peak_bytes(lambda: naive(pixels, classes, out_size), device)
    return timings, peaks


def ceiling_dtypes(device: torch.device) -> list[str]:
    return ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]


def summarize(setup: Setup, batch: int, timings: dict[str, Timings], peaks: dict[str, int]) -> tuple[dict, list]:
    """Matmul ceilings (FLOP/s, median round) and one row per pipeline."""
    size = matmul_size(setup.device)
    ceilings = {d: 2 * size**3 / timings[f"matmul/{d}"].median for d in ceiling_dtypes(setup.device)}
    naive_encoder, naive_head = timings["naive/encoder"], timings["naive/head"]
    naive = Timings([a + b for a, b in zip(naive_encoder.samples, naive_head.samples)])
    naive_rate = batch / naive.median

    def row(
        pipeline: str, e2e: Timings, encoder: Timings, head: Timings, peak: int, setup_s: float, flops: int
    ) -> dict:
        encoder_flops = flops * batch / encoder.median
        return {
            "pipeline": pipeline,
            "batch": batch,
            "images_per_s": batch / e2e.median,
            "speedup": batch / e2e.median / naive_rate,
            "p50_ms": e2e.median * 1e3,
            "p95_ms": e2e.percentile(0.95) * 1e3,
            "encoder_ms_per_image": encoder.median * 1e3 / batch,
            "encoder_vs_clip_tower": encoder.median / naive_encoder.median,
            "head_ms_per_image": head.median * 1e3 / batch,
            "encoder_gflops": encoder_flops / 1e9,
            **{f"encoder_pct_of_{d}_ceiling": 100 * encoder_flops / c for d, c in ceilings.items()},
            "peak_mib": peak / 2**20,
            "setup_s": setup_s,
        }

    pacl_flops = count = next(iter(setup.flops.values()))
    rows = [row("naive peer", naive, naive_encoder, naive_head, peaks["naive"], 0.0, setup.flops.get("pacl", count))]
    if setup.default is not None:
        encoder, head = timings["encoder/default"], timings["head/default"]
        e2e = Timings([a + b for a, b in zip(encoder.samples, head.samples)])
        peak = max(peaks["encoder/default"], peaks["head/default"])
        pipeline = f"default Segmenter(...): {default_pipeline(setup.default)}"
        rows.append(
            row(pipeline, e2e, encoder, head, peak, setup.setup_seconds["default"], setup.flops.get("pacl", count))
        )
    for label in setup.encoders:
        method = label.split("/")[0] if "/" in label else "pacl"
        flops, encoder = setup.flops.get(method, pacl_flops), timings[f"encoder/{label}"]
        if not setup.heads:  # --heads none: the encoders alone
            rows.append(
                row(f"{label} (encoder only)", encoder, encoder, Timings([0.0]), peaks[f"encoder/{label}"], 0, flops)
            )
            rows[-1]["setup_s"], rows[-1]["speedup"] = setup.setup_seconds[label], float("nan")
        for name in setup.heads:
            for data in ("", "scene:"):
                head = timings[f"head/{data}{name}"]
                e2e = Timings([a + b for a, b in zip(encoder.samples, head.samples)])
                peak = max(peaks[f"encoder/{label}"], peaks[f"head/{data}{name}"])
                pipeline = f"{label} + {name}" + (" (scene-like logits)" if data else "")
                rows.append(row(pipeline, e2e, encoder, head, peak, setup.setup_seconds[label], flops))
    return ceilings, rows


def default_pipeline(segmenter: Segmenter) -> str:
    """``openvino:bf16 + fast`` for the encoder and head a default segmenter chose (the head with scores)."""
    return f"{segmenter.encoder.name}:{segmenter.precision} + {segmenter.head.backend}"


#: Issue 20's end-to-end goals on the CPU, as (what, rows it takes the best of, least speed-up).
GOALS = (
    ("default Segmenter(...) with scores", lambda p: p.startswith("default "), 2.0),
    ("best row with scores", lambda p: not p.startswith("naive") and ":labels" not in p, 3.0),
    ("best labels-only row", lambda p: ":labels" in p, 4.5),
)


def goal_lines(rows: list[dict]) -> list[str]:
    """One line per goal: the best qualifying row of the run (random-logit rows only) and met or not."""
    lines = []
    for batch in dict.fromkeys(r["batch"] for r in rows):
        candidates = [r for r in rows if r["batch"] == batch and "scene-like" not in r["pipeline"]]
        candidates = [r for r in candidates if "encoder only" not in r["pipeline"]]
        for what, takes, least in GOALS:
            chosen = [r for r in candidates if takes(r["pipeline"])]
            if not chosen:
                continue
            best = max(chosen, key=lambda r: r["speedup"])
            verdict = "met" if best["speedup"] >= least else "NOT met"
            got = f"{best['speedup']:.2f}x ({best['pipeline']})"
            lines.append(f"goal batch {batch}: {what} >= {least:g}x naive: {got}: {verdict}")
    return lines


def speedup(row: dict) -> str:
    return "-" if math.isnan(row["speedup"]) else f"{row['speedup']:.2f}x"


def print_table(rows: list[dict], device: torch.device) -> None:
    half = "fp16" if device.type == "cuda" else "bf16"
    header = (
        f"| batch | pipeline | images/s | vs naive | p50 ms | p95 ms | encoder ms/img | encoder / CLIP tower "
        f"| head ms/img | encoder GFLOP/s | % fp32 ceiling | % {half} ceiling | peak MiB | setup s |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(
            f"| {r['batch']} | {r['pipeline']} | {r['images_per_s']:.2f} | {speedup(r)} | {r['p50_ms']:.0f} "
            f"| {r['p95_ms']:.0f} | {r['encoder_ms_per_image']:.1f} | {r['encoder_vs_clip_tower']:.3f} "
            f"| {r['head_ms_per_image']:.1f} "
            f"| {r['encoder_gflops']:.0f} | {r['encoder_pct_of_fp32_ceiling']:.0f}% "
            f"| {r[f'encoder_pct_of_{half}_ceiling']:.0f}% | {r['peak_mib']:.0f} | {r['setup_s']:.1f} |"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.backends = args.backends or parse_backends(CUDA_BACKENDS if device.type == "cuda" else CPU_BACKENDS)
    if args.heads == "none":
        args.heads = []
    else:
        args.heads = args.heads.split(",") if args.heads else default_heads(device)
    config = {
        "model": f"{args.model} (random init)",
        "methods": args.methods,
        "image_size": args.image_size,
        "batch": args.batch,
        "classes": args.classes,
        "output_size": list(args.output_size),
        "device": str(device),
        "backends": [":".join([n, d] + (["cl"] if cl else [])) for n, d, cl in args.backends],
        "heads": args.heads,
        "warmup": args.warmup,
        "iters": args.iters,
    }
    machine = machine_line(device)
    print(machine)
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    if device.type == "cuda":  # TensorRT (and good practice) want a non-default stream
        torch.cuda.set_stream(torch.cuda.Stream(device))
    setup = build(args, device)
    results = []
    for batch in args.batch:
        timings, peaks = time_rounds(setup, args, batch)
        ceilings, rows = summarize(setup, batch, timings, peaks)
        results.append(
            {
                "batch": batch,
                "ceilings": ceilings,
                "rows": rows,
                "samples_s": {label: t.samples for label, t in timings.items()},
                "peak_bytes": peaks,
            }
        )

    print()
    for result in results:
        print(
            f"batch {result['batch']}: matmul ceiling ({matmul_size(device)}^3, median round): "
            + ", ".join(f"{d} {c / 1e9:.0f} GFLOP/s" for d, c in result["ceilings"].items())
        )
    print(
        "encoder: "
        + ", ".join(f"{m} {f / 1e9:.2f}" for m, f in setup.flops.items())
        + f" GFLOP/image; head: {args.classes} classes to "
        f"{args.output_size[0]}x{args.output_size[1]}"
    )
    for label, reason in setup.skipped.items():
        print(f"skipped {label}: {reason}")
    print("end-to-end = encoder + head times of the same round; speed-ups against the naive peer of the same run.")
    print("encoder / CLIP tower: the encoder's time over the naive peer's (open_clip's plain fp32 tower + embedder).")
    print("rows marked (scene-like logits) time the head on benchmarks.head's scene logits, not the random ViT's.")
    print()
    all_rows = [row for result in results for row in result["rows"]]
    print_table(all_rows, device)
    print()
    for line in goal_lines(all_rows):
        print(line)
    if args.json:
        payload = {
            "machine": machine,
            "versions": versions(),
            "config": config,
            "command": "python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
            "encoder_flops_per_image": setup.flops,
            "setup_s": setup.setup_seconds,
            "default_choice": setup.default.choices if setup.default is not None else None,
            "skipped": setup.skipped,
            "results": results,
        }
        write_results(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
