"""PACL training throughput against inference of the same image encoder, in the same run.

    python -m benchmarks.train_throughput                 # ViT-B-16 (random init), 224 px, batch 16
    python -m benchmarks.train_throughput --rounds 5 --autocast-baseline --json out.json

What is timed, per round (each path takes its turn every round, so a noisy shared machine slows
them alike; the median over rounds is reported):

* **train bf16 / train fp32**: one optimiser step of ``train/train.py --stage pacl`` as a run makes
  it (``Trainer.train_step``: normalisation, tokenisation, the frozen CLIP's image and text towers
  without autograd in the run's precision, the embedder forward and backward under autocast,
  AdamW, the schedule) on a fixed batch of synthetic scenes. Decoding and cropping run in
  DataLoader workers in a real run and are not timed.
* **infer bf16 / infer fp32**: the ``torch`` encoder's ``encode_image`` (CLIP + embedder) on the
  same pixels: what a trained model's users get.
* **train bf16, autocast** (``--autocast-baseline``): the previous formulation, the whole PACL
  forward under ``torch.autocast`` with fp32 weights, for the record (slow: one round only).

The goal (issue 15): training bf16 >= 70% of inference bf16 images/s, and faster than training fp32.
FLOPs of the image tower are counted once (``torch.utils.flop_counter``, attention included) and
each path's rate is given as a fraction of a 2048^3 bf16 matmul's rate, timed in the same rounds.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (see benchmarks/throughput.py): on a CPU shared with
# other jobs a spinning thread burns the core a descheduled peer needs. Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    encoder_flops,
    machine_line,
    matmul_seconds,
    matmul_size,
    timed,
    versions,
    write_results,
)
from pacl_fast.data.synthetic import WorldConfig, render_scene  # noqa: E402
from pacl_fast.encoders.torch_encoder import TorchEncoder  # noqa: E402
from pacl_fast.images import normalize  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.train import Trainer  # noqa: E402

GOAL_RATIO = 0.70


def make_trainer(args: argparse.Namespace, precision: str, out: Path) -> Trainer:
    """A PACL-stage trainer set up as ``train/train.py`` does (random-init CLIP, seed 0)."""
    config = TrainConfig(
        stage="pacl",
        out=out,
        clip=args.model,
        precision=precision,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=args.device,
        steps=10_000,
        warmup=10,
    )
    trainer = Trainer(config)
    trainer.setup()
    trainer.stage.model.train()
    return trainer


def scene_batch(batch_size: int, image_size: int) -> dict:
    scenes = [render_scene(i, seed=0, config=WorldConfig(image_size=image_size)) for i in range(batch_size)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])  # [B, 3, S, S] uint8
    return {"images": images, "captions": [s.caption for s in scenes], "skipped": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model, random init (default: ViT-B-16)")
    parser.add_argument("--image-size", type=int, default=224, help="training image side (default: 224)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step (default: 16)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, after a warm-up (default: 3)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--autocast-baseline", action="store_true", help="also time the previous autocast formulation (default: off)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here (default: none)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)  # the random-CLIP warning is the point here
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = device.type
    print(machine_line(device))
    print(
        f"PACL stage, {args.model} (random init), {args.image_size} px, batch {args.batch_size}, {args.rounds} rounds"
    )

    with tempfile.TemporaryDirectory() as scratch:
        trainers = {p: make_trainer(args, p, Path(scratch)) for p in ("bf16", "fp32")}
        batch = scene_batch(args.batch_size, args.image_size)
        pixels = normalize(batch["images"].float() / 255, trainers["fp32"].stage.mean, trainers["fp32"].stage.std)
        encoders = {
            p: TorchEncoder(trainers["fp32"].stage.model, dtype)
            for p, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
        }
        paths: dict[str, Callable[[], object]] = {
            f"train {p}": (lambda t=t: t.train_step(t.stage.module, batch)) for p, t in trainers.items()
        }
        paths.update({f"infer {p}": (lambda e=e: e.encode_image(pixels)) for p, e in encoders.items()})
        paths["matmul bf16"] = matmul_seconds(matmul_size(device), torch.bfloat16, device)
        samples: dict[str, list[float]] = {name: [] for name in paths}
        # Both trainers start from the same weights (seed 0): their first losses compare the two paths.
        first_loss = {p: t.train_step(t.stage.module, batch)[0].item() for p, t in trainers.items()}
        for round_index in range(args.rounds):
            names = list(paths)
            names = names[round_index % len(names) :] + names[: round_index % len(names)]  # rotate who goes first
            if round_index == 0:
                for name in names:  # warm-up (the trainers had theirs above)
                    if not name.startswith("train"):
                        paths[name]()
            for name in names:
                samples[name].append(timed(paths[name], device)[0])
        if args.autocast_baseline:  # the whole PACL.forward under autocast, fp32 weights: the old path
            old = make_trainer(args, "bf16", Path(scratch))
            old.stage.model.backbone.float()
            old.stage.module = old.stage.model
            timed(lambda: old.train_step(old.stage.module, batch), device)
            samples["train bf16, autocast (previous)"] = [
                timed(lambda: old.train_step(old.stage.module, batch), device)[0]
            ]
            del old
        flops = encoder_flops(encoders["fp32"].model, args.image_size)
    ceiling = 2 * matmul_size(device) ** 3 / statistics.median(samples.pop("matmul bf16"))

    rows = []
    inference_bf16 = args.batch_size / statistics.median(samples["infer bf16"])
    for name, times in samples.items():
        seconds = statistics.median(times)
        rate = args.batch_size / seconds
        rows.append(
            {
                "path": name,
                "seconds_per_batch": seconds,
                "images_per_s": rate,
                "vs_infer_bf16": rate / inference_bf16,
                "tower_pct_of_bf16_ceiling": 100 * rate * flops / ceiling,
                "samples": times,
            }
        )
    print(f"\nimage tower + embedder: {flops / 1e9:.1f} GFLOP/image; bf16 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s\n")
    print("| path | s / batch | images/s | vs infer bf16 | tower FLOPs, % of bf16 ceiling |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['path']} | {r['seconds_per_batch']:.2f} | {r['images_per_s']:.2f} | {r['vs_infer_bf16']:.2f} "
            f"| {r['tower_pct_of_bf16_ceiling']:.0f}% |"
        )
    by_name = {r["path"]: r for r in rows}
    ratio = by_name["train bf16"]["vs_infer_bf16"]
    faster = by_name["train bf16"]["images_per_s"] / by_name["train fp32"]["images_per_s"]
    loss_gap = abs(first_loss["bf16"] - first_loss["fp32"])
    print(f"\nfirst-step loss, same weights and batch: bf16 {first_loss['bf16']:.5f}, fp32 {first_loss['fp32']:.5f}")
    print(
        f"training bf16 = {100 * ratio:.0f}% of inference bf16 (goal >= {100 * GOAL_RATIO:.0f}%: "
        f"{'met' if ratio >= GOAL_RATIO else 'NOT met'}); {faster:.2f}x training fp32 "
        f"({'faster' if faster > 1 else 'NOT faster'})"
    )
    if args.json:
        payload = {
            "machine": machine_line(device),
            "versions": versions(),
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "image_tower_flops_per_image": flops,
            "bf16_matmul_flops_per_s": ceiling,
            "rows": rows,
            "train_bf16_vs_infer_bf16": ratio,
            "train_bf16_vs_train_fp32": faster,
            "first_step_loss": first_loss,
            "first_step_loss_gap": loss_gap,
        }
        write_results(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
