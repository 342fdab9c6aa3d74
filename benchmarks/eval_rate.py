"""Evaluation speed against the pipeline it runs: is ``pacl-fast eval`` as fast as the engine?

    python -m benchmarks.eval_rate                     # ViT-B-16 (random init), 224 px, batch 4, synthetic world
    python -m benchmarks.eval_rate --model tiny --image-size 64 --images 32

In one run, on the same model, input size, batch size and classes:

* **pipeline**: ``Segmenter.predict_torch`` on already prepared ``[B, 3, S, S]`` pixels, labels only
  (what ``benchmarks.throughput`` times: no decoding, no per-image Python);
* **eval**: ``evaluate_segmentation`` on the synthetic world's validation scenes (render, decode and
  resize in DataLoader workers, the batched model call, confusion matrices, run state), images/s.

The ratio eval / pipeline is the share of the engine's speed the evaluation loop keeps
(issue 15's goal: at least 80%). Rounds alternate, the median counts.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/throughput.py

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import machine_line, write_results  # noqa: E402
from pacl_fast.backbone import RandomWeightsWarning  # noqa: E402
from pacl_fast.data.segmentation import open_dataset  # noqa: E402
from pacl_fast.data.synthetic import SYNTHETIC_TEMPLATES  # noqa: E402
from pacl_fast.demo import TINY_CLIP_CONFIG  # noqa: E402
from pacl_fast.evaluate import evaluate_segmentation  # noqa: E402
from pacl_fast.segmenter import Segmenter  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_rate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip name (random init) or 'tiny'")
    parser.add_argument("--method", default="pacl", help="method (default pacl)")
    parser.add_argument("--image-size", type=int, default=224, help="short side the model sees (default 224)")
    parser.add_argument("--batch", type=int, default=4, help="images per encoder call (default 4)")
    parser.add_argument("--images", type=int, default=48, help="validation scenes per eval round (default 48)")
    parser.add_argument("--workers", type=int, default=2, help="eval's DataLoader workers (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each (default 3)")
    parser.add_argument("--encoder", default="torch", help="encoder backend (default torch)")
    parser.add_argument("--dtype", default="bfloat16", help="encoder precision (default bfloat16)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        segmenter = Segmenter(
            TINY_CLIP_CONFIG if args.model == "tiny" else args.model,
            method=args.method,
            device="cpu",
            dtype=args.dtype,
            encoder=args.encoder,
            image_size=args.image_size,
            batch_size=args.batch,
            text_cache=False,
        )
    world = open_dataset("synthetic", None, "val")
    classes = segmenter.encode_labels(world.classes, SYNTHETIC_TEMPLATES)  # [C, E]
    image, _ = world[0]
    prepared = segmenter.preprocessor()(image)
    pixels = prepared.pixels[None].expand(args.batch, -1, -1, -1).contiguous()  # [B, 3, S, S]
    out_size = prepared.geometry.original_size
    print(machine_line(torch.device("cpu")))
    print(f"config: {args.model} ({args.method}, random init) {args.encoder}:{args.dtype}, {args.image_size} px, "
          f"batch {args.batch}, {len(world.classes)} classes, outputs {out_size[0]}x{out_size[1]}, "
          f"eval over {args.images} scenes with {args.workers} workers")  # fmt: skip

    def pipeline() -> float:
        start = time.perf_counter()
        for _ in range(max(1, args.images // args.batch)):
            segmenter.predict_torch(pixels, classes, out_size, with_scores=False)
        return max(1, args.images // args.batch) * args.batch / (time.perf_counter() - start)

    def evaluation() -> float:
        start = time.perf_counter()
        report = evaluate_segmentation(segmenter, world, limit=args.images, workers=args.workers, progress=False)
        assert report.num_images == args.images and not report.failures
        return args.images / (time.perf_counter() - start)

    pipeline()  # warm-up: allocations, first-call costs
    rates = {"pipeline": [], "eval": []}
    for _ in range(args.rounds):
        rates["pipeline"].append(pipeline())
        rates["eval"].append(evaluation())
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["eval"] / medians["pipeline"]
    print("| what | images/s (median) | rounds |\n|---|---:|---|")
    for name, values in rates.items():
        print(f"| {name} | {medians[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print(f"eval / pipeline = {ratio:.2f} (goal >= 0.80)")
    summary = {"machine": machine_line(torch.device("cpu")), "config": vars(args) | {"json": None},
               "rates": rates, "medians": medians, "ratio": ratio}  # fmt: skip
    if args.json:
        write_results(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
