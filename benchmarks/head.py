"""Head micro-benchmark: reference vs tiled (eager torch) vs native vs (on CUDA) Triton, labels only and with scores.

    python -m benchmarks.head                      # CPU: reference vs tiled vs native
    python -m benchmarks.head --device cuda        # CUDA: reference vs tiled vs Triton, + patch similarity

``tiled`` is the CPU head in eager torch (``PACL_FAST_NATIVE=off``); ``native`` the same head with the
native kernel (``kernels/native.py``; absent where no C compiler builds it), what ``Head("fast")`` runs on
CPUs where it builds. The config line gives the kernel's build time in a fresh cache folder (compile,
load, self-test) and its load from the cache (a new process's cost).

For C in {21, 150, 171}, outputs 512x512 and 1024x2048 from a 32x32 grid and scene-like and random
logits (C=21: scene only), every backend runs twice: labels only (``with_scores=False``) and with
scores (what ``predict`` returns by default). Each row gives the median of ``--repeats`` runs, the
peak of live tensors (CPU: ``TensorMemoryTracker`` in a separate, untimed run, the workspace the
CPU heads keep between calls included; CUDA: ``max_memory_allocated``), the speed-up over the
reference in the same mode and, with scores, ``x labels``: the time over the same backend's labels
only (issue 20's goal: at most 2), and ``x tiled labels``: over the eager tiled head's labels only
(the labels-only head that goal was set against). All in one run, as a markdown table and JSON.

Work is counted first. Any head must read the logits (``h*w*C*4`` bytes) and write labels (and
scores): ``H*W*2`` (``*6``) bytes: that is the floor, and ``x floor`` is the time over the time a
large copy (measured in the same run) would take to move those bytes. The reference's own
algorithm moves at least ``16*C*H*W`` bytes (float32 upsample, argmax) and, with scores, twice that
in float64. The fused heads instead evaluate ``K`` classes per pixel (``classes/px``) and are bound
by that arithmetic, not by bytes: labels only, the classes that can win there (the tiled head: on
the upper envelope of each row of each cell, ``kernels/separable.py``); with scores, the classes
whose terms can reach ``1e-7 / C`` of the winner's (``kernels/scores.py``; every class on random
logits). ``x exp floor`` is the time over ``K * H * W`` exps at the rate of a large in-place
``exp_`` measured in the same run.

Data: ``scene`` logits are cosines of synthetic CLIP-like embeddings (unit class embeddings in
512-d; the 32x32 patch grid is split into 6 regions, each patch mixes its region's class (cosine
~0.30), a similar "confuser" class (~0.22) and iid noise (other classes ~N(0, 0.04))). ``random``
is iid noise of the same spread: no spatial structure, the pruning's worst case. Logit scale 100
(CLIP's).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import machine_line, parse_size, peak_bytes, synchronize, write_results
from kernels import cells, fine_grid, native, scores, separable
from kernels.reference import segment_reference
from kernels.tiled import segment_tiled

GRID = (32, 32)
LOGIT_SCALE = 100.0
MIB = 2**20


def scene_logits(classes: int, grid: tuple[int, int] = GRID, *, seed: int = 0, embed_dim: int = 512) -> torch.Tensor:
    """CLIP-like cosine logits ``[1, h, w, C]`` of a 6-region scene (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    h, w = grid
    text = F.normalize(torch.randn(classes, embed_dim, generator=generator), dim=-1)  # [C, E]
    seeds = torch.rand(6, 2, generator=generator) * torch.tensor([h, w])
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    owner = ((yy - seeds[:, 0, None, None]) ** 2 + (xx - seeds[:, 1, None, None]) ** 2).argmin(0)  # [h, w]
    own, confuser = torch.randint(classes, (2, 6), generator=generator)
    noise = F.normalize(torch.randn(h, w, embed_dim, generator=generator), dim=-1)
    patches = 0.30 * text[own[owner]] + 0.22 * text[confuser[owner]] + 0.93 * noise  # [h, w, E]
    return torch.einsum("hwe,ce->hwc", F.normalize(patches, dim=-1), text)[None]


def random_logits(classes: int, grid: tuple[int, int] = GRID, *, seed: int = 0) -> torch.Tensor:
    """iid cosines with the spread of ``scene_logits``'s noise: ``[1, h, w, C]``."""
    generator = torch.Generator().manual_seed(seed)
    return 0.041 * torch.randn(1, *grid, classes, generator=generator)


def median_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    run()  # warm-up (compilation, allocator)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Bytes/s of a large tensor copy (read + write), best of 5: the memory ceiling of this run."""
    source = torch.empty(megabytes * MIB // 4, device=device)
    target = torch.empty_like(source)
    best = min(median_seconds(lambda: target.copy_(source), device, 1) for _ in range(5))
    return 2 * source.numel() * 4 / best


def exp_rate(device: torch.device, megabytes: int = 64) -> float:
    """Elements/s of an in-place ``exp_`` over a large tensor: the arithmetic ceiling of the fused heads,
    which evaluate (interpolate, exp, sum) ``classes/px`` classes per pixel."""
    values = torch.rand(megabytes * MIB // 4, device=device)
    return values.numel() / min(median_seconds(values.exp_, device, 1) for _ in range(5))


@contextlib.contextmanager
def native_mode(mode: str) -> Iterator[None]:
    """``$PACL_FAST_NATIVE`` set to ``mode`` for the block (the CPU head reads it at every call)."""
    previous = os.environ.get(native.ENV)
    os.environ[native.ENV] = mode
    try:
        yield
    finally:
        if previous is None:
            del os.environ[native.ENV]
        else:
            os.environ[native.ENV] = previous


def in_mode(mode: str, segment: Callable) -> Callable:
    """``segment`` run with ``$PACL_FAST_NATIVE=mode``."""

    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with native_mode(mode):
            return segment(*args, **kwargs)

    return run


def native_build_seconds() -> tuple[float, float] | None:
    """Seconds to build the native kernel in an empty cache folder (compile, load, self-test), and to load
    it from there again (a new process's cost); None where it cannot be built (the reason is logged)."""
    previous_cache = os.environ.get("PACL_FAST_CACHE")
    with tempfile.TemporaryDirectory(prefix="pacl-bench-native-") as folder:
        os.environ["PACL_FAST_CACHE"] = folder
        try:
            seconds = []
            for _ in range(2):  # (load_or_build keeps no process state: each is a fresh load or build)
                start = time.perf_counter()
                try:
                    native.load_or_build()
                except native.NativeUnavailable as error:
                    print(f"native kernel unavailable: {error}")
                    return None
                seconds.append(time.perf_counter() - start)
            return seconds[0], seconds[1]
        finally:
            if previous_cache is None:
                del os.environ["PACL_FAST_CACHE"]
            else:
                os.environ["PACL_FAST_CACHE"] = previous_cache


def classes_per_pixel(name: str, logits: torch.Tensor, out_size: tuple[int, int], with_scores: bool) -> float:
    """Mean number of classes backend ``name`` evaluates per output pixel (padding included)."""
    if name == "reference":
        return float(logits.shape[-1])
    grid_h, grid_w = logits.shape[1:3]
    rows = cells.axis_sampling(grid_h, out_size[0], grid_h, logits.device)
    cols = cells.axis_sampling(grid_w, out_size[1], grid_w, logits.device)
    values = logits.float().contiguous()
    if name == "native":  # the blocks' lanes (spare lanes of a block's last vector included) times their classes
        with native_mode("on"):
            kernel = native.kernel()
        labels, tally = torch.empty((logits.shape[0], *out_size), dtype=torch.int16, device=logits.device), [0, 0]
        if with_scores:
            probabilities = torch.empty(labels.shape, device=logits.device)
            tolerance = cells.DEFAULT_SCORE_TOLERANCE
            scores.segment(values, rows, cols, labels, probabilities, LOGIT_SCALE, tolerance, tally, kernel)
        else:
            scores.segment(values, rows, cols, labels, None, LOGIT_SCALE, cells.DEFAULT_SCORE_TOLERANCE, tally, kernel)
        return tally[0] / tally[1]
    if name == "tiled":
        labels, tally = torch.empty((logits.shape[0], *out_size), dtype=torch.int16, device=logits.device), [0, 0]
        if with_scores:
            probabilities = torch.empty(labels.shape, device=logits.device)
            scores.segment(values, rows, cols, labels, probabilities, LOGIT_SCALE, cells.DEFAULT_SCORE_TOLERANCE, tally)
            return tally[0] / tally[1]
        # kernels.separable: the classes kept along each (row, cell); one where a grid column's winner is the label
        separable.segment_labels(values, rows, cols, labels, tally)
        return (labels.numel() - tally[1] + tally[0]) / labels.numel()
    # Triton: each cell's candidates (on the refined, shifted grid with scores), at every pixel of the cell.
    if with_scores:
        values = fine_grid.relative_logits(values, range(fine_grid.refined_size(grid_h)), LOGIT_SCALE)
        rows, cols = fine_grid.refine_sampling(rows, grid_h), fine_grid.refine_sampling(cols, grid_w)
    scale, tolerance = (1.0, cells.DEFAULT_SCORE_TOLERANCE) if with_scores else (LOGIT_SCALE, None)
    count = cells.cell_candidates(values, range(values.shape[1]), scale, tolerance).count[0]  # [h', w']
    return float(count[rows.index0][:, cols.index0].float().mean())


def head_backends(device: torch.device) -> dict[str, Callable]:
    backends = {"reference": segment_reference, "tiled": in_mode("off", segment_tiled)}
    with native_mode("on"):
        if device.type == "cpu" and native.kernel() is not None:
            backends["native"] = in_mode("on", segment_tiled)
    if device.type == "cuda":
        from kernels.upsample_argmax import segment_triton

        backends["triton"] = segment_triton
    return backends


def bench_head(args: argparse.Namespace, device: torch.device, bandwidth: float, exps: float) -> list[dict]:
    configs = [
        (c, size, data)
        for c in args.classes
        for size in args.sizes
        for data in (("scene", "random") if c >= 150 else ("scene",))
    ]
    rows = []
    for classes, out_size, data in tqdm(configs, desc="head", unit="config"):
        maker = scene_logits if data == "scene" else random_logits
        logits = maker(classes).to(device)
        height, width = out_size
        times: dict[tuple[str, bool], float] = {}
        peaks: dict[bool, int] = {}
        for with_scores, (name, segment) in itertools.product((False, True), head_backends(device).items()):
            floor = logits.numel() * 4 + height * width * (6 if with_scores else 2)
            kept = classes_per_pixel(name, logits, out_size, with_scores)
            run = partial(segment, logits, out_size, logit_scale=LOGIT_SCALE, with_scores=with_scores)
            seconds = median_seconds(run, device, args.repeats)
            separable.release_workspace()  # so that the peak counts the workspaces the CPU heads keep
            scores.release_workspace()
            peak = peak_bytes(run, device)
            times[name, with_scores] = seconds
            if name == "reference":
                peaks[with_scores] = peak
            rows.append(
                {
                    "device": device.type,
                    "classes": classes,
                    "out_size": list(out_size),
                    "data": data,
                    "backend": name if with_scores else f"{name}:labels",
                    "with_scores": with_scores,
                    "median_ms": seconds * 1e3,
                    "speedup": times["reference", with_scores] / seconds,
                    "times_labels": seconds / times[name, False] if with_scores else None,
                    "times_tiled_labels": seconds / times["tiled", False] if with_scores else None,
                    "peak_mib": peak / MIB,
                    "memory_ratio": peaks[with_scores] / max(peak, 1),
                    "classes_per_pixel": kept,
                    "floor_mb": floor / 1e6,
                    "times_floor": seconds / (floor / bandwidth),
                    # exps are the score's cost; labels only, none are needed
                    "times_exp_floor": seconds / (kept * height * width / exps) if with_scores else None,
                    "reference_algorithm_mb": (48 if with_scores else 16) * classes * height * width / 1e6,
                }
            )
    return rows


def bench_patch_similarity(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], float]:
    """CUDA only: the embedder + cosine (ViT-B/16 widths), torch vs the two Triton variants."""
    from kernels.patch_similarity import EmbedderWeights, embed_torch, patch_similarity

    token_dim, hidden_dim, embed_dim, classes, tokens_per_image = 768, 512, 512, 150, 196
    big = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    matmul_seconds = median_seconds(lambda: big @ big, device, 5)
    matmul_flops = 2 * 8192**3 / matmul_seconds
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        weights = EmbedderWeights(
            *(
                torch.randn(*shape, device=device, dtype=dtype) * 0.04
                for shape in (
                    (embed_dim, token_dim),
                    (hidden_dim, token_dim),
                    (hidden_dim,),
                    (embed_dim, hidden_dim),
                    (embed_dim,),
                )
            )
        )
        class_embeddings = F.normalize(torch.randn(classes, embed_dim, device=device), dim=-1)
        for batch in (1, 64):
            tokens = torch.randn(batch, tokens_per_image, token_dim, device=device, dtype=dtype)
            flops = (
                2
                * batch
                * tokens_per_image
                * (token_dim * embed_dim + token_dim * hidden_dim + hidden_dim * embed_dim + embed_dim * classes)
            )

            def unfused(tokens=tokens, weights=weights, class_embeddings=class_embeddings) -> torch.Tensor:
                flat = tokens.reshape(-1, token_dim)
                return F.normalize(embed_torch(flat, weights).float(), dim=-1) @ class_embeddings.T

            runs = {"torch (unfused)": unfused}
            for variant in ("fused", "cublas"):
                runs[variant] = partial(patch_similarity, tokens, weights, class_embeddings, variant=variant)
            baseline = None
            for name, run in runs.items():
                seconds = median_seconds(run, device, args.repeats)
                baseline = baseline or seconds
                rows.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "batch": batch,
                        "backend": name,
                        "median_us": seconds * 1e6,
                        "speedup": baseline / seconds,
                        "tflops": flops / seconds / 1e12,
                        "fraction_of_matmul": flops / seconds / matmul_flops,
                    }
                )
    return rows, matmul_flops


def variant_verdict(rows: list[dict]) -> str:
    """Which embedder variant (``pacl_fast.head.EMBEDDER_VARIANTS``) won how many (dtype, batch) cases:
    the measurement the Head's ``embedder_variant`` switch waits for (the loser should then go)."""
    wins = {"fused": 0, "cublas": 0}
    cases = {(r["dtype"], r["batch"]) for r in rows}
    for case in sorted(cases):
        times = {
            r["backend"]: r["median_us"] for r in rows if (r["dtype"], r["batch"]) == case and r["backend"] in wins
        }
        wins[min(times, key=times.get)] += 1
    winner = max(wins, key=wins.get)
    return (
        f"embedder variant: {winner} wins {wins[winner]} of {len(cases)} cases (fused {wins['fused']}, cublas "
        f"{wins['cublas']}); set PACL_FAST_EMBEDDER_VARIANT={winner}, or make it the default"
    )


def head_table(rows: list[dict]) -> str:
    header = (
        "device | C | output | data | backend | median ms | speed-up | x labels | x tiled labels | peak MiB"
        " | memory ÷ | classes/px | floor MB | x floor | x exp floor"
    )
    lines = [f"| {header} |", "|---" * 15 + "|"]
    for r in rows:
        labels = f"{r['times_labels']:.2f}" if r["times_labels"] is not None else "-"
        tiled_labels = f"{r['times_tiled_labels']:.2f}" if r.get("times_tiled_labels") is not None else "-"
        exp_floor = f"{r['times_exp_floor']:.1f}" if r["times_exp_floor"] is not None else "-"
        lines.append(
            f"| {r['device']} | {r['classes']} | {r['out_size'][0]}x{r['out_size'][1]} | {r['data']} | {r['backend']} "
            f"| {r['median_ms']:.1f} | {r['speedup']:.1f}x | {labels} | {tiled_labels} | {r['peak_mib']:.1f} "
            f"| {r['memory_ratio']:.0f}x "
            f"| {r['classes_per_pixel']:.1f} | {r['floor_mb']:.2f} | {r['times_floor']:.0f} | {exp_floor} |"
        )
    return "\n".join(lines)


def similarity_table(rows: list[dict]) -> str:
    lines = [
        "| dtype | batch | backend | median us | speed-up | TFLOP/s | of matmul |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['backend']} | {r['median_us']:.0f} | {r['speedup']:.2f}x "
            f"| {r['tflops']:.1f} | {r['fraction_of_matmul']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.head", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 150, 171])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(512, 512), (1024, 2048)], help="HxW")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per config (median; default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/results/head_<device>.json")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of fewer runs are noise on a shared machine)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")

    machine = machine_line(device)
    bandwidth = copy_bandwidth(device)
    exps = exp_rate(device)
    build = native_build_seconds() if device.type == "cpu" else None
    built = f"native kernel build {build[0]:.2f} s, load {build[1]:.3f} s" if build else "no native kernel"
    print(f"machine: {machine}")
    print(
        f"config: grid {GRID[0]}x{GRID[1]}, batch 1, logit scale {LOGIT_SCALE}, C {args.classes}, "
        f"outputs {[f'{h}x{w}' for h, w in args.sizes]}, median of {args.repeats}; "
        f"copy {bandwidth / 1e9:.1f} GB/s, exp {exps / 1e9:.2f} G/s; {built}"
    )
    summary = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.head " + " ".join(argv if argv is not None else sys.argv[1:]),
        "copy_bytes_per_s": bandwidth,
        "exp_per_s": exps,
        "native_build_seconds": build[0] if build else None,
        "native_load_seconds": build[1] if build else None,
        "head": bench_head(args, device, bandwidth, exps),
    }
    if device.type == "cuda":
        summary["patch_similarity"], summary["matmul_flops"] = bench_patch_similarity(args, device)
        ceiling = summary["matmul_flops"] / 1e12
        print(f"\npatch similarity (B x 196 tokens, D=768, E=512, C=150); fp16 matmul ceiling {ceiling:.0f} TFLOP/s")
        print(similarity_table(summary["patch_similarity"]))
        print(variant_verdict(summary["patch_similarity"]))
    print()
    print(head_table(summary["head"]))
    path = args.json or Path("benchmarks/results") / f"head_{device.type}.json"
    write_results(path, summary)
    return summary


if __name__ == "__main__":
    main()
