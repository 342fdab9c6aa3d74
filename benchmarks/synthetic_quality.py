"""The paper's claim in miniature: on held-out synthetic scenes, how well do CLIP's frozen patch
tokens segment through (i) PACL, (ii) CLIP's own projection of the final tokens, (iii) the
training-free last blocks (MaskCLIP, SCLIP, ClearCLIP, NACLIP: ``pacl_fast.methods``), (iv)
linear and MLP probes trained with the true masks (the upper bound), (v) chance?

    python -m benchmarks.synthetic_quality --clip local-dir:pacl_fast/assets/demo/clip \\
        --pacl-weights pacl_fast/assets/demo/pacl.safetensors --json benchmarks/results/synthetic_quality.json

mIoU is over the shape classes with background pixels ignored (VOC20 / Context59-style);
foreground accuracy is the share of object pixels labelled right. All methods are scored by the
same head: logits on the patch grid, bilinear upsampling to the image, argmax.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import machine_line, write_results
from kernels.reference import upsample_logits
from pacl_fast.backbone import RandomWeightsWarning
from pacl_fast.build import build_model
from pacl_fast.cli import HELP
from pacl_fast.data.synthetic import (
    CLASS_NAMES,
    IGNORE_INDEX,
    SYNTHETIC_TEMPLATES,
    SyntheticSegmentation,
    WorldConfig,
)
from pacl_fast.images import normalize
from pacl_fast.methods import TRAINING_FREE
from pacl_fast.metrics import SegmentationMetrics, confusion_matrix
from pacl_fast.prompts import ensemble_text_embeddings

VALIDATION_SEED = 1  # training uses seed 0
PROBE_TRAIN_SEED = 2


@dataclass
class Tokens:
    """Frozen CLIP patch tokens of a set of scenes, with their masks (and the model inputs)."""

    tokens: torch.Tensor  # [M, h, w, D]
    masks: torch.Tensor  # [M, H, W] int64, IGNORE_INDEX on background
    pixels: torch.Tensor | None = None  # [M, 3, S, S] normalised, kept for methods that change the tower


def encode_scenes(backbone, dataset: SyntheticSegmentation, batch_size: int, desc: str, keep_pixels: bool) -> Tokens:
    """Scenes are rendered at the CLIP's size, so preprocessing is only ``images.normalize``."""
    tokens, masks, kept = [], [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch"):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image, _ in items]).float() / 255
        pixels = normalize(images, *backbone.mean_std)  # [b, 3, S, S]
        with torch.no_grad():
            tokens.append(backbone.patch_tokens(pixels))
        masks.append(torch.stack([torch.from_numpy(mask.astype(np.int64)) for _, mask in items]))
        if keep_pixels:
            kept.append(pixels)
    return Tokens(torch.cat(tokens), torch.cat(masks), torch.cat(kept) if keep_pixels else None)


def score(logits_fn, data: Tokens, batch_size: int = 100, on_pixels: bool = False) -> SegmentationMetrics:
    """Metrics over object pixels of ``argmax(upsample(logits_fn(x)))``, x the tokens (or the pixels)."""
    confusion = torch.zeros(len(CLASS_NAMES), len(CLASS_NAMES), dtype=torch.int64)
    out_size = tuple(data.masks.shape[-2:])
    inputs = data.pixels if on_pixels else data.tokens
    for start in range(0, len(inputs), batch_size):
        with torch.no_grad():
            logits = logits_fn(inputs[start : start + batch_size])  # [b, h, w, C]
            predictions = upsample_logits(logits, out_size).argmax(1)
        confusion += confusion_matrix(
            predictions, data.masks[start : start + batch_size], len(CLASS_NAMES), IGNORE_INDEX
        )
    return SegmentationMetrics(CLASS_NAMES, confusion.numpy())


def train_probe(probe: torch.nn.Module, data: Tokens, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Fit ``probe`` (tokens -> class logits) with per-pixel cross-entropy through the same upsampling."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    out_size = tuple(data.masks.shape[-2:])
    for _ in tqdm(range(steps), desc=f"probe {type(probe).__name__}", unit="step"):
        batch = torch.randint(len(data.tokens), (batch_size,), generator=generator)
        logits = upsample_logits(probe(data.tokens[batch]), out_size)  # [b, C, H, W]
        loss = F.cross_entropy(logits, data.masks[batch], ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


class MLPProbe(torch.nn.Module):
    def __init__(self, width: int, hidden: int, classes: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.synthetic_quality", description=__doc__.split("\n\n")[0], formatter_class=HELP
    )
    parser.add_argument("--clip", required=True, help="the synthetic-world CLIP: local-dir:PATH")
    parser.add_argument("--pacl-weights", required=True, type=Path, help="the PACL weights (.safetensors)")
    parser.add_argument("--num-images", type=int, default=500, help="validation scenes (seed 1)")
    parser.add_argument("--probe-images", type=int, default=6000, help="scenes (seed 2) the probes train on")
    parser.add_argument("--probe-steps", type=int, default=1500, help="optimiser steps of each probe")
    parser.add_argument("--probe-batch", type=int, default=64, help="scenes per probe step")
    parser.add_argument("--probe-lr", type=float, default=3e-3, help="the probes' learning rate")
    parser.add_argument("--mlp-hidden", type=int, default=512, help="hidden width of the MLP probe")
    parser.add_argument("--batch-size", type=int, default=100, help="scenes per forward pass when scoring")
    parser.add_argument(
        "--seed", type=int, default=0, help="torch seed of the run (the probes' initialisation and batches)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model, metadata = build_model(args.clip, pacl_weights=args.pacl_weights, device="cpu")
    model.eval()
    backbone = model.backbone
    config = WorldConfig(image_size=backbone.image_size)
    num_classes = len(CLASS_NAMES)
    classes = ensemble_text_embeddings(
        lambda prompts: backbone.encode_text(backbone.tokenize(prompts)), CLASS_NAMES, SYNTHETIC_TEMPLATES
    )  # [C, E]

    started = time.perf_counter()
    validation = encode_scenes(
        backbone,
        SyntheticSegmentation(args.num_images, seed=VALIDATION_SEED, config=config),
        args.batch_size,
        "validation scenes",
        keep_pixels=True,
    )
    probe_data = encode_scenes(
        backbone,
        SyntheticSegmentation(args.probe_images, seed=PROBE_TRAIN_SEED, config=config),
        args.batch_size,
        "probe scenes",
        keep_pixels=False,
    )

    def cosine(embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, dim=-1) @ classes.T

    linear = torch.nn.Linear(backbone.token_dim, num_classes)
    mlp = MLPProbe(backbone.token_dim, args.mlp_hidden, num_classes)
    train_probe(linear, probe_data, args.probe_steps, args.probe_batch, args.probe_lr, args.seed)
    train_probe(mlp, probe_data, args.probe_steps, args.probe_batch, args.probe_lr, args.seed)
    chance_generator = torch.Generator().manual_seed(args.seed)

    methods = {
        "PACL": lambda tokens: cosine(model.embedder(tokens)),
        "CLIP projection of the final tokens": lambda tokens: cosine(tokens @ backbone.visual.proj),
    }
    on_pixels = set()
    for method in TRAINING_FREE:  # the same CLIP, its last block changed
        tower = build_model(args.clip, method=method, device="cpu")[0].eval()
        methods[f"{method} (training-free)"] = lambda pixels, tower=tower: cosine(tower.encode_image(pixels))
        on_pixels.add(f"{method} (training-free)")
    methods.update(
        {
            "linear probe (true masks)": linear,
            "MLP probe (true masks)": mlp,
            "chance": lambda tokens: torch.rand(*tokens.shape[:-1], num_classes, generator=chance_generator),
        }
    )
    results = {}
    for name, fn in methods.items():
        metrics = score(fn, validation, args.batch_size, on_pixels=name in on_pixels)
        # background is ignored, so all-pixel accuracy is the foreground accuracy
        results[name] = {
            "mIoU": metrics.miou,
            "fg_accuracy": metrics.aacc,
            "per_class_IoU": dict(zip(CLASS_NAMES, metrics.iou.tolist())),
        }

    bound = max(results["linear probe (true masks)"]["mIoU"], results["MLP probe (true masks)"]["mIoU"])
    pacl, baseline = results["PACL"]["mIoU"], results["CLIP projection of the final tokens"]["mIoU"]
    summary = {
        "machine": machine_line(torch.device("cpu")),
        "clip": str(backbone.identity),
        "pacl_steps": metadata.steps,
        "patch_temperature": 1 / float(model.patch_logit_scale.detach()),
        "validation": f"{args.num_images} scenes, seed {VALIDATION_SEED}",
        "results": results,
        "upper_bound_mIoU": bound,
        "pacl_over_bound": pacl / bound,
        "pacl_over_baseline": pacl / baseline if baseline > 0 else float("inf"),
        "seconds": time.perf_counter() - started,
    }
    print("| method | mIoU | fg accuracy |\n|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {values['mIoU']:.3f} | {values['fg_accuracy']:.3f} |")
    print(
        f"PACL / upper bound = {summary['pacl_over_bound']:.2f}; PACL / baseline = {summary['pacl_over_baseline']:.2f}"
    )
    if args.json:
        write_results(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
