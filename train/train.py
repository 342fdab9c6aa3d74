"""Train PACL weights, and where no pretrained CLIP exists (the synthetic world), a CLIP first.

Stages:
  clip   a small CLIP from scratch with open_clip's own model classes and a custom config
         (--clip-config); exports an open_clip local-dir (OUT/export: open_clip_config.json +
         open_clip_model.safetensors), loadable with open_clip.create_model("local-dir:OUT/export").
  pacl   a frozen CLIP (--clip NAME --clip-weights TAG|FILE, or --clip local-dir:PATH); trains the
         vision embedder, the logit scale and the patch temperature; exports OUT/pacl.safetensors,
         loadable by pacl_fast.Segmenter(pacl_weights=...).

Data: --data synthetic (the procedural world), csv (a CSV/TSV table of image paths and captions,
open_clip's convention) or wds (WebDataset shards, img2dataset's layout).

One CPU, one GPU, or many through torchrun (DDP; NCCL on GPU, gloo on CPU):
  python train/train.py --stage clip --clip-config train/configs/synthetic_clip.json --out runs/clip
  python train/train.py --stage pacl --clip local-dir:runs/clip/export --out runs/pacl
  torchrun --nproc_per_node 8 train/train.py --stage pacl --clip ViT-B-16 --clip-weights laion2b_s34b_b88k \\
      --data wds --train-data 'shards/{00000..00099}.tar' --precision bf16 --out runs/pacl-b16

Checkpoints (model, optimiser, scheduler, RNG, data position) are written every --save-every
steps atomically; --resume auto continues a killed run with no lost and no repeated step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from pacl_fast.backbone import OPENAI_MEAN, OPENAI_STD, RandomWeightsWarning, load_clip
from pacl_fast.data.pairs import CsvPairs, WebDatasetPairs
from pacl_fast.data.stream import PairStream, collate_pairs
from pacl_fast.data.synthetic import SyntheticScenes, WorldConfig
from pacl_fast.distributed import DistInfo, all_gather_no_grad, all_gather_with_grad, init_distributed
from pacl_fast.model import PACL, PACLConfig, contrastive_loss
from pacl_fast.weights import metadata_for, save_pacl_weights

CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", required=True, choices=["clip", "pacl"], help="what to train (see above)")
    parser.add_argument("--out", required=True, type=Path, help="run folder: checkpoints, log.jsonl, exports")

    data = parser.add_argument_group("data")
    data.add_argument("--data", default="synthetic", choices=["synthetic", "csv", "wds"], help="pair source")
    data.add_argument("--train-data", default=None, help="csv/tsv table, or shard pattern 'dir/{00000..00099}.tar'")
    data.add_argument("--csv-img-key", default="filepath", help="image path column of the table")
    data.add_argument("--csv-caption-key", default="title", help="caption column of the table")
    data.add_argument("--csv-separator", default=None, help="table separator (default: tab for .tsv, else comma)")
    data.add_argument("--image-size", type=int, default=None, help="training image side (default: the CLIP's)")
    data.add_argument("--world-seed", type=int, default=0, help="synthetic world seed (validation uses 1)")
    data.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")

    model = parser.add_argument_group("model")
    model.add_argument("--clip-config", type=Path, default=None, help="stage clip: open_clip model_cfg JSON file")
    model.add_argument("--clip", default=None, help="stage pacl: open_clip name or local-dir:PATH")
    model.add_argument("--clip-weights", default=None, help="stage pacl: pretrained tag or checkpoint file")
    model.add_argument("--embedder-hidden", type=int, default=None, help="PACL MLP hidden width (default E)")
    model.add_argument("--patch-temperature", type=float, default=1.0, help="initial tau_p of the patch softmax")
    model.add_argument("--fixed-patch-temperature", action="store_true", help="do not learn tau_p")
    model.add_argument("--init-logit-scale", type=float, default=1 / 0.07, help="initial InfoNCE logit scale")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=1000, help="total optimiser steps")
    optim.add_argument("--batch-size", type=int, default=128, help="pairs per rank per step")
    optim.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    optim.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    optim.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not on gains/biases)")
    optim.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    optim.add_argument("--beta1", type=float, default=0.9)
    optim.add_argument("--beta2", type=float, default=0.98)
    optim.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm")
    optim.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="autocast precision (fp16 on CUDA only; bf16 also on CPUs with bf16 support)",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    run.add_argument("--seed", type=int, default=0, help="seed of model init and data order")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every K steps")
    run.add_argument("--log-every", type=int, default=10, help="log.jsonl line every K steps")
    run.add_argument(
        "--export-dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="stage clip: storage type of the exported weights",
    )
    run.add_argument("--resume", default="auto", help="auto (latest checkpoint in OUT if any), none, or a path")
    return parser


# ----------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """What differs between the two stages: the module to train and how it scores a batch."""

    model: torch.nn.Module  # what the optimiser updates (DDP wraps it)
    tokenize: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def build_clip_stage(args: argparse.Namespace, device: torch.device) -> Stage:
    if args.clip_config is None:
        raise SystemExit("--stage clip needs --clip-config (an open_clip model_cfg JSON)")
    model_cfg = json.loads(args.clip_config.read_text())
    model = open_clip.CLIP(**model_cfg).to(device)
    context = model_cfg.get("text_cfg", {}).get("context_length", 77)
    tokenizer = open_clip.SimpleTokenizer(context_length=context)
    image_size = model_cfg["vision_cfg"]["image_size"]
    return Stage(model, tokenizer, image_size, OPENAI_MEAN, OPENAI_STD)


def build_pacl_stage(args: argparse.Namespace, device: torch.device) -> Stage:
    if args.clip is None:
        raise SystemExit("--stage pacl needs --clip (open_clip name or local-dir:PATH)")
    with warnings.catch_warnings():
        if args.clip_weights is None and not args.clip.startswith("local-dir:"):
            print("WARNING: --clip-weights not given: training PACL on a RANDOM CLIP", file=sys.stderr)
        warnings.simplefilter("ignore", RandomWeightsWarning)
        backbone = load_clip(args.clip, args.clip_weights, device=device)
    config = PACLConfig(
        token_dim=backbone.token_dim,
        embed_dim=backbone.embed_dim,
        hidden_dim=args.embedder_hidden,
        patch_temperature=args.patch_temperature,
        learn_patch_temperature=not args.fixed_patch_temperature,
        logit_scale=args.init_logit_scale,
    )
    model = PACL(backbone, config).to(device)
    mean, std = backbone.mean_std
    return Stage(model, backbone.tokenize, backbone.image_size, mean, std)


def batch_loss(
    stage_name: str, model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, info: DistInfo
) -> tuple[torch.Tensor, dict[str, float]]:
    """The stage's contrastive loss for one batch, negatives gathered from every rank."""
    if stage_name == "clip":
        image_features, text_features, logit_scale = model(pixels, tokens)[:3]
        loss_fn = ClipLoss(gather_with_grad=True, rank=info.rank, world_size=info.world_size)
        return loss_fn(image_features, text_features, logit_scale), {"logit_scale": float(logit_scale.detach())}
    patches, texts, logit_scale, patch_logit_scale = model(pixels, tokens)
    extra = {}
    if info.enabled:
        extra = dict(
            all_texts=all_gather_no_grad(texts), gather_rows=all_gather_with_grad, offset=info.rank * texts.shape[0]
        )
    loss = contrastive_loss(patches, texts, logit_scale, patch_logit_scale, **extra)
    return loss, {
        "logit_scale": float(logit_scale.detach()),
        "patch_temperature": 1.0 / float(patch_logit_scale.detach()),
    }


# ------------------------------------------------------------------------------------ optimiser


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, scales and embeddings-of-position (open_clip's rule)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale", "positional", "class_emb"))
        (no_decay if plain else decay).append(param)
    return torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": args.weight_decay}],
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=1e-6,
    )


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------- data


def build_loader(args: argparse.Namespace, stage: Stage, info: DistInfo, start_step: int) -> DataLoader:
    image_size = args.image_size or stage.image_size
    common = dict(rank=info.rank, world_size=info.world_size)
    if args.data == "synthetic":
        dataset = SyntheticScenes(
            args.batch_size,
            seed=args.world_seed,
            config=WorldConfig(image_size=image_size),
            start_step=start_step,
            **common,
        )
    elif args.data == "csv":
        if not args.train_data:
            raise SystemExit("--data csv needs --train-data TABLE.csv|.tsv")
        source = CsvPairs(
            args.train_data,
            image_size,
            image_key=args.csv_img_key,
            caption_key=args.csv_caption_key,
            separator=args.csv_separator,
        )
        dataset = PairStream(source, args.batch_size, seed=args.seed, start_step=start_step, **common)
    else:
        if not args.train_data:
            raise SystemExit("--data wds needs --train-data 'dir/{00000..00099}.tar'")
        dataset = WebDatasetPairs(args.train_data, image_size, seed=args.seed, start_epoch=start_step, **common)
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=collate_pairs,
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )


# ---------------------------------------------------------------------------------- checkpoints


def checkpoint_path(out: Path, step: int) -> Path:
    return out / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINT_DIR).glob("step_*.pt"))
    return found[-1] if found else None


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a killed process leaves either the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(path.parent.glob("step_*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink()


def run_signature(args: argparse.Namespace, info: DistInfo) -> dict:
    """What must not change across a resume for the data stream to continue exactly."""
    return {
        "stage": args.stage,
        "data": args.data,
        "batch_size": args.batch_size,
        "world_size": info.world_size,
        "seed": args.seed,
        "world_seed": args.world_seed,
        "steps": args.steps,
    }


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: PACL's trainable tensors (never the frozen CLIP), or the CLIP."""
    return model.trainable_state_dict() if isinstance(model, PACL) else model.state_dict()


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    if isinstance(model, PACL):
        model.load_trainable_state_dict(tensors)
    else:
        model.load_state_dict(tensors)


def parameters_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(trainable_state(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- export


def export_clip(
    model: torch.nn.Module, model_cfg: dict, mean, std, folder: Path, dtype: torch.dtype = torch.float32
) -> Path:
    """open_clip's local-dir layout: ``open_clip.create_model("local-dir:FOLDER")`` loads it.

    ``dtype`` is the storage type (float16 halves the file; open_clip loads it into fp32 models).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().to(dtype).cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / "open_clip_model.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "open_clip_model.safetensors")
    return folder


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "fp16" and device.type != "cuda":
        raise SystemExit("--precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    stage = build_clip_stage(args, device) if args.stage == "clip" else build_pacl_stage(args, device)
    model = stage.model
    optimizer = make_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.warmup, args.steps, args.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")

    start_step = 0
    resume_from = (
        None if args.resume == "none" else latest_checkpoint(args.out) if args.resume == "auto" else Path(args.resume)
    )
    if resume_from is not None:
        if not resume_from.is_file():
            raise SystemExit(f"--resume {args.resume}: no checkpoint at {resume_from}")
        state = torch.load(resume_from, map_location=device, weights_only=True)
        if state["signature"] != run_signature(args, info):
            raise SystemExit(
                f"cannot resume from {resume_from}: it was made by {state['signature']}, this run is "
                f"{run_signature(args, info)}; use another --out or --resume none"
            )
        load_trainable_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"][info.rank].cpu())
        start_step = state["step"]
        if info.is_main:
            print(f"resuming from {resume_from} at step {start_step}", file=sys.stderr)

    ddp_model = DistributedDataParallel(model) if info.enabled else model
    loader = build_loader(args, stage, info, start_step)
    mean = torch.tensor(stage.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(stage.std, device=device).view(1, 3, 1, 1)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)
        if args.precision != "fp32"
        else nullcontext()
    )
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "log.jsonl", "a") if info.is_main else None  # noqa: SIM115 - open for the whole run
    progress = tqdm(total=args.steps, initial=start_step, disable=not info.is_main, desc=f"{args.stage}", unit="step")
    skipped_total, window_start, window_images = 0, time.perf_counter(), 0

    model.train()
    batches = iter(loader)
    for step in range(start_step, args.steps):
        batch = next(batches)
        pixels = (batch["images"].to(device, non_blocking=True).float() / 255.0 - mean) / std
        tokens = stage.tokenize(batch["captions"]).to(device)
        with autocast:
            loss, metrics = batch_loss(args.stage, ddp_model, pixels, tokens, info)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        skipped_total += batch["skipped"]
        window_images += pixels.shape[0] * info.world_size
        done = step + 1

        if info.is_main and (done % args.log_every == 0 or done == args.steps):
            elapsed = time.perf_counter() - window_start
            record = {
                "step": done,
                "loss": float(loss),
                "lr": scheduler.get_last_lr()[0],
                "images_per_s": window_images / elapsed,
                "skipped": skipped_total,
                **metrics,
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            window_start, window_images = time.perf_counter(), 0
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        progress.update(1)

        if done % args.save_every == 0 or done == args.steps:
            rng_states = all_gather_object(torch.get_rng_state(), info)
            if info.is_main:
                save_checkpoint(
                    checkpoint_path(args.out, done),
                    {
                        "step": done,
                        "model": trainable_state(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": rng_states,
                        "signature": run_signature(args, info),
                    },
                )
    progress.close()

    (args.out / f"rank{info.rank}.json").write_text(
        json.dumps({"rank": info.rank, "step": args.steps, "parameters_sha256": parameters_digest(model)})
    )
    if info.is_main:
        if args.stage == "clip":
            folder = export_clip(
                model,
                json.loads(args.clip_config.read_text()),
                stage.mean,
                stage.std,
                args.out / "export",
                dtype=getattr(torch, args.export_dtype),
            )
            print(f"exported CLIP to local-dir:{folder}")
        else:
            data_name = {"synthetic": f"synthetic world seed {args.world_seed}"}.get(args.data, args.train_data)
            metadata = metadata_for(
                model,
                training_data=data_name,
                steps=args.steps,
                extra={"batch_size": args.batch_size * info.world_size, "lr": args.lr},
            )
            path = save_pacl_weights(model, args.out / "pacl.safetensors", metadata)
            print(f"exported PACL weights to {path}")
        log.close()
    if info.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def all_gather_object(value, info: DistInfo) -> list:
    """Every rank's ``value`` (the RNG states go into rank 0's checkpoint)."""
    if not info.enabled:
        return [value]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


if __name__ == "__main__":
    raise SystemExit(main())
