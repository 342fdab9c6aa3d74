"""What a compiled or OpenVINO encoder costs to start and saves per image: the numbers behind the
``encoder="auto"`` rule (:mod:`pacl_fast.encoders.auto`).

For each candidate encoder: the start-up with an empty cache (construction + the first batch:
ONNX export, OpenVINO conversion, ``torch.compile``), the start-up with its artifact cached, and
the steady time per image; then the break-even: how many images of one input size pay the build
back against eager torch in the same precision. Random-init open_clip ViT-B-16 through PACL.

    python -m benchmarks.encoder_startup                     # ViT-B-16, 224x224, batch 8
    python -m benchmarks.encoder_startup --size 448 --batch 4 --candidates torch:bf16,openvino:bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import machine_line, write_results
from pacl_fast.backbone import RandomWeightsWarning, load_clip
from pacl_fast.encoders import EncoderUnavailableError, make_encoder
from pacl_fast.model import PACL

DEFAULT_CANDIDATES = "torch:fp32,torch:bf16,compile:bf16,openvino:fp32,openvino:bf16"


def per_image_ms(encoder, pixels: torch.Tensor, rounds: int) -> float:  # noqa: ANN001
    """Median milliseconds per image over ``rounds`` batches (after the first, which builds)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        encoder.encode_image(pixels)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / pixels.shape[0]


def start_seconds(name: str, dtype: str, model: PACL, pixels: torch.Tensor, cache: Path) -> tuple[float, object]:
    """Construction + the first batch (which exports, converts or compiles on an empty cache)."""
    start = time.perf_counter()
    encoder = (
        make_encoder(name, model, dtype, cache_dir=cache) if name == "openvino" else make_encoder(name, model, dtype)
    )
    encoder.encode_image(pixels)
    return time.perf_counter() - start, encoder


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = PACL(load_clip(args.clip)).eval()
    pixels = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="encoder-startup-") as cache:
        for candidate in args.candidates.split(","):
            name, dtype = candidate.split(":")
            try:
                fresh = Path(cache) / candidate.replace(":", "-")  # each candidate builds from nothing
                cold, encoder = start_seconds(name, dtype, model, pixels, fresh)
            except EncoderUnavailableError as error:
                print(f"{candidate}: skipped ({error})", file=sys.stderr)
                continue
            warm = None
            if name == "openvino":  # the artifact is cached now: what a second process pays
                warm, encoder = start_seconds(name, dtype, model, pixels, fresh)
            ms = per_image_ms(encoder, pixels, args.rounds)
            rows.append({"encoder": candidate, "cold_s": cold, "cached_s": warm, "ms_per_image": ms})
            print(f"{candidate}: start {cold:.1f} s (cached {warm} s), {ms:.1f} ms/image", flush=True)
            del encoder
    eager = {row["encoder"].split(":")[1]: row["ms_per_image"] for row in rows if row["encoder"].startswith("torch:")}
    for row in rows:
        base = eager.get(row["encoder"].split(":")[1])
        saving = None if base is None else base - row["ms_per_image"]
        row["saving_ms_per_image"] = saving
        row["break_even_images"] = (
            None
            if row["encoder"].startswith("torch:") or not saving or saving <= 0
            else round(1000 * row["cold_s"] / saving)
        )
    return {"machine": machine_line(torch.device("cpu")), "load": os.getloadavg(), "config": vars(args), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--candidates", default=DEFAULT_CANDIDATES)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoder_startup.json"))
    args = parser.parse_args(argv)
    results = measure(args)
    print(results["machine"], f"load {results['load']}")
    print(f"{'encoder':<16}{'cold s':>8}{'cached s':>10}{'ms/img':>9}{'saves ms':>10}{'break-even':>12}")
    for row in results["rows"]:
        cached = "-" if row["cached_s"] is None else f"{row['cached_s']:.1f}"
        saving = "-" if row["saving_ms_per_image"] is None else f"{row['saving_ms_per_image']:.1f}"
        print(
            f"{row['encoder']:<16}{row['cold_s']:>8.1f}{cached:>10}{row['ms_per_image']:>9.1f}{saving:>10}"
            f"{row['break_even_images'] if row['break_even_images'] is not None else '-':>12}"
        )
    write_results(args.out, {**results, "config": {k: str(v) for k, v in results["config"].items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
