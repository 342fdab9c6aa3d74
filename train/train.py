"""Train PACL weights, and where no pretrained CLIP exists (the synthetic world), a CLIP first.

Stages:
  clip   a small CLIP from scratch with open_clip's own model classes and a custom config
         (--clip-config); exports an open_clip local-dir (OUT/export: open_clip_config.json +
         open_clip_model.safetensors), loadable with open_clip.create_model("local-dir:OUT/export").
  pacl   a frozen CLIP (--clip NAME --clip-weights TAG|FILE, or --clip local-dir:PATH); trains the
         vision embedder, the logit scale and the patch temperature; exports OUT/pacl.safetensors,
         loadable by pacl_fast.Segmenter(pacl_weights=...). The frozen CLIP runs without autograd
         in --precision (its weights cast), only the embedder under autocast.

Data: --data synthetic (the procedural world), csv (a CSV/TSV table of image paths and captions,
open_clip's convention) or wds (WebDataset shards, img2dataset's layout). Unreadable samples are
skipped and counted (log.jsonl and the progress bar).

One CPU, one GPU, or many through torchrun (DDP; NCCL on GPU, gloo on CPU):
  python train/train.py --stage clip --clip-config train/configs/synthetic_clip.json --out runs/clip
  python train/train.py --stage pacl --clip local-dir:runs/clip/export --out runs/pacl
  torchrun --nproc_per_node 8 train/train.py --stage pacl --clip ViT-B-16 --clip-weights laion2b_s34b_b88k \\
      --data wds --train-data 'shards/{00000..00099}.tar' --precision bf16 --out runs/pacl-b16

Checkpoints (trained tensors, optimiser moments, RNG, data positions) are written atomically
every --save-every steps and at the end; running the same command again (--resume auto) continues
a killed or interrupted run with no lost and no repeated step, and ends with the same weights.
A run whose loss or weights stop being finite ends with one line naming the step (exit 1),
keeping its last good checkpoint: nothing non-finite is ever checkpointed or exported.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: make the `train` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pacl_fast.data.pairs import CsvPairs, ShardPosition, WebDatasetPairs  # noqa: E402
from pacl_fast.data.stream import DataError, PairStream, collate_pairs  # noqa: E402
from pacl_fast.data.synthetic import SyntheticScenes, WorldConfig  # noqa: E402
from pacl_fast.distributed import (  # noqa: E402
    DistInfo,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    gather_objects,
    init_distributed,
)
from pacl_fast.files import atomic_write  # noqa: E402
from pacl_fast.images import normalize  # noqa: E402
from train.checkpoints import (  # noqa: E402
    CheckpointError,
    check_run_folder,
    checkpoint_path,
    choose_checkpoint,
    list_checkpoints,
    nonfinite_entries,
    remove_stale_temporaries,
    save_checkpoint,
    signature_differences,
    trim_log,
)
from train.config import ConfigError, TrainConfig, parse_config  # noqa: E402
from train.stages import (  # noqa: E402
    Stage,
    autocast_for,
    load_optimizer_moments,
    make_optimizer,
    make_scheduler,
    make_stage,
    parameters_digest,
)

#: ``Trainer.first_bad_step`` while every loss has been finite.
NO_STEP = 2**62


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; the message names the step and the last good checkpoint."""


class Trainer:
    """One training run: :meth:`setup`, :meth:`resume`, :meth:`train` (step, log, save), :meth:`export`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.info = DistInfo()
        self.step = 0  # optimiser steps done
        self.positions: dict[int, list[int]] = {}  # wds: stream -> position after its last consumed batch
        self.skipped = 0  # samples this rank skipped since the run began

    def run(self) -> None:
        self.setup()
        self.check_outputs()
        self.resume()
        self.train()
        self.export()

    def say(self, message: str) -> None:
        if self.info.is_main:
            print(message, file=sys.stderr, flush=True)

    # ----------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        config = self.config
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if config.precision == "fp16" and device.type != "cuda":
            raise ConfigError("--precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
        self.info = init_distributed(device.type)
        if device.type == "cpu" and config.precision == "bf16" and not _native_cpu_bf16():
            self.say(
                "warning: this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated, maybe slower than fp32"
            )
        if device.type == "cuda":
            device = torch.device("cuda", self.info.local_rank)
            torch.cuda.set_device(device)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self.device = device
        self.stage: Stage = make_stage(config, device, self.info)
        self.image_size = config.image_size or self.stage.image_size
        self.optimizer = make_optimizer(self.stage.model, config)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        # The first step whose loss was not finite, kept on the device: reading it is a host sync, so it
        # is read only where the run syncs anyway (logging) and before anything is written.
        self.first_bad_step = torch.full((), NO_STEP, dtype=torch.int64, device=device)

    def check_outputs(self) -> None:
        """Refuse, before any training, a run folder where something is in the way of what the run writes."""
        out = self.config.out
        files = [out / "log.jsonl", out / f"rank{self.info.rank}.json", *self.stage.export_paths(self.config)]
        check_run_folder(out, files)

    def signature(self) -> dict:
        """What must not change across a resume: the model, the data stream and what the optimiser's
        saved state would silently override."""
        c = self.config
        return {
            "stage": c.stage,
            "model": self.stage.identity(),
            "data": c.data,
            "train_data": c.train_data,
            "image_size": self.image_size,
            "world_seed": c.world_seed,
            "data_streams": c.streams if c.data == "wds" else None,
            "batch_size": c.batch_size,
            "world_size": self.info.world_size,
            "seed": c.seed,
            "steps": c.steps,
            "optimizer": {"lr": c.lr, "weight_decay": c.weight_decay, "betas": [c.beta1, c.beta2]},
            "schedule": {"warmup": c.warmup, "min_lr_ratio": c.min_lr_ratio},
        }

    # ---------------------------------------------------------------------------------- resume

    def resume(self) -> None:
        config, rank = self.config, self.info.rank
        if self.info.is_main:
            remove_stale_temporaries(config.out)
        found = choose_checkpoint(config.out, config.resume, warn=self.say)
        if found is None:
            return
        path, state = found
        differences = signature_differences(state["signature"], self.signature())
        if differences:
            raise CheckpointError(
                f"cannot resume from {path}: this run differs in {'; '.join(differences)}. "
                "Run with the same options, or use another --out or --resume none"
            )
        try:
            self.stage.load_state_dict(state["model"])
            load_optimizer_moments(self.optimizer, state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"][rank])
            self.restore_cuda_rng(state["cuda_rng"][rank], path)
            self.positions, self.skipped = _data_state(state["data"][rank])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as error:
            raise CheckpointError(f"{path} does not fit this run: {error}") from error
        self.step = state["step"]
        self.scheduler = make_scheduler(self.optimizer, config, start_step=self.step)
        if self.info.is_main:
            trim_log(config.out / "log.jsonl", self.step)
        self.say(f"resuming from {path} at step {self.step}")

    def restore_cuda_rng(self, states: list[torch.Tensor], path: Path) -> None:
        """Put back the CUDA RNG of every device this process sees, as the checkpoint holds them."""
        if self.device.type != "cuda":
            return  # a CPU run draws nothing from CUDA's generators
        if not states:
            self.say(f"warning: {path} comes from a CPU run: the CUDA random numbers restart from --seed")
            return
        if len(states) != torch.cuda.device_count():
            raise CheckpointError(
                f"{path} holds the CUDA RNG states of {len(states)} device(s), this process sees "
                f"{torch.cuda.device_count()}: resume with the devices it ran on (CUDA_VISIBLE_DEVICES), "
                "or use --resume none"
            )
        torch.cuda.set_rng_state_all(states)

    # ------------------------------------------------------------------------------------ data

    def loader(self) -> DataLoader:
        """Batches from step ``self.step`` on, a pure function of (seed, step, rank) for every source."""
        c, info = self.config, self.info
        ranks = dict(rank=info.rank, world_size=info.world_size)
        batching: dict = dict(batch_size=c.batch_size, collate_fn=collate_pairs)
        if c.data == "synthetic":
            config = WorldConfig(image_size=self.image_size)
            dataset = SyntheticScenes(c.batch_size, seed=c.world_seed, config=config, start_step=self.step, **ranks)
        elif c.data == "csv":
            source = CsvPairs(
                c.train_data,
                self.image_size,
                image_key=c.csv_img_key,
                caption_key=c.csv_caption_key,
                separator=c.csv_separator,
            )
            dataset = PairStream(source, c.batch_size, seed=c.seed, start_step=self.step, **ranks)
        else:
            positions = {stream: ShardPosition(*position) for stream, position in self.positions.items()}
            dataset = WebDatasetPairs(
                c.train_data,
                self.image_size,
                c.batch_size,
                streams=c.streams,
                seed=c.seed,
                start_step=self.step,
                positions=positions,
                max_member_bytes=c.max_member_bytes,
                **ranks,
            )
            batching = dict(batch_size=None)  # the dataset makes whole batches
        return DataLoader(
            dataset,
            num_workers=c.workers,
            persistent_workers=c.workers > 0,
            prefetch_factor=4 if c.workers > 0 else None,
            pin_memory=self.device.type == "cuda",  # so that train_step's non_blocking copies overlap
            # The loader's base seed comes from its own generator, not the global RNG: a resumed run makes its
            # loader after restoring the RNG, an uninterrupted one before its first step.
            generator=torch.Generator().manual_seed(c.seed),
            **batching,
        )

    # ----------------------------------------------------------------------------------- train

    def train(self) -> None:
        config, info = self.config, self.info
        module = self.stage.module
        if info.enabled:  # the frozen CLIP is neither broadcast nor synchronised
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, self.stage.frozen_names())
            module = DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None)
        config.out.mkdir(parents=True, exist_ok=True)
        log = open(config.out / "log.jsonl", "a") if info.is_main else None  # noqa: SIM115 - open for the run
        progress = tqdm(total=config.steps, initial=self.step, disable=not info.is_main, desc=config.stage, unit="step")
        window_start, window_images = time.perf_counter(), 0
        self.stage.model.train()
        batches = iter(self.loader())
        try:
            while self.step < config.steps:
                batch = next(batches)
                loss, metrics = self.train_step(module, batch)
                self.step += 1
                window_images += batch["images"].shape[0] * info.world_size
                if self.step % config.log_every == 0 or self.step == config.steps:
                    self.check_finite(weights=False)
                    skipped = int(all_reduce_sum(torch.tensor([self.skipped]))[0])
                    record = {
                        "step": self.step,
                        "loss": loss.item(),
                        "lr": self.last_lr,
                        "images_per_s": window_images / (time.perf_counter() - window_start),
                        "skipped": skipped,
                        **{name: value.item() for name, value in metrics.items()},
                    }
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    progress.set_postfix(loss=f"{record['loss']:.3f}", skipped=skipped, refresh=False)
                    window_start, window_images = time.perf_counter(), 0
                progress.update(1)
                if (config.save_every and self.step % config.save_every == 0) or self.step == config.steps:
                    self.save()
        finally:
            progress.close()
            if log is not None:
                log.close()

    def train_step(self, module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser step on ``batch``; returns the detached loss and the stage's metrics."""
        config = self.config
        pixels = batch["images"].to(self.device, non_blocking=True).float().div_(255)  # [B, 3, S, S] in 0..1
        pixels = normalize(pixels, self.stage.mean, self.stage.std)
        tokens = self.stage.tokenize(batch["captions"])  # [B, L] int64, made here from the batch's strings
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()  # from torch's cached pinned blocks: the copy below does not block
        tokens = tokens.to(self.device, non_blocking=True)
        with autocast_for(self.device, config.precision):
            loss, metrics = self.stage.loss(module, pixels, tokens, self.info)
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step == NO_STEP)
        self.first_bad_step = torch.where(bad, self.first_bad_step.new_full((), self.step + 1), self.first_bad_step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.stage.model.parameters(), config.grad_clip)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # what this step used
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if "stream" in batch:
            self.positions[int(batch["stream"])] = [int(v) for v in batch["position"]]
        self.skipped += int(batch["skipped"])
        return loss.detach(), metrics

    def check_finite(self, weights: bool) -> None:
        """TrainingDiverged (on every rank alike) if a loss so far, or with ``weights`` a trained tensor or
        optimiser moment, is not finite. A host sync: called where the run syncs anyway."""
        first = int(all_reduce_min(self.first_bad_step.reshape(1))[0])
        if first != NO_STEP:
            raise TrainingDiverged(f"training diverged: the loss is NaN or Inf from step {first}{self._advice()}")
        if weights:
            bad = nonfinite_entries(self.stage.state_dict(), self.optimizer.state_dict())
            if bad:
                raise TrainingDiverged(
                    f"training diverged: after step {self.step}, {', '.join(sorted(bad)[:3])} hold NaN or Inf"
                    f"{self._advice()}"
                )

    def _advice(self) -> str:
        kept = [p for p in list_checkpoints(self.config.out) if p.is_file()]
        last = f"the last good checkpoint is {kept[0]}" if kept else "no checkpoint was written"
        return f"; stopped at step {self.step}, {last} (try a lower --lr than {self.config.lr:g})"

    def save(self) -> None:
        """Checkpoint of ``self.step`` (every rank's RNG and data position; rank 0 writes); never of a
        diverged run, so the last good checkpoint stays."""
        self.check_finite(weights=True)
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        data = {"positions": self.positions, "skipped": self.skipped}
        states = gather_objects((torch.get_rng_state(), cuda_rng, data))
        if self.info.is_main:
            state = {
                "step": self.step,
                "model": self.stage.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": [rng for rng, _, _ in states],
                "cuda_rng": [cuda for _, cuda, _ in states],
                "data": [data for _, _, data in states],
                "signature": self.signature(),
            }
            try:
                save_checkpoint(self.config.out, state)
            except OSError as error:
                raise CheckpointError(
                    f"cannot write {checkpoint_path(self.config.out, self.step)}: {error.strerror or error}"
                ) from error

    # ---------------------------------------------------------------------------------- export

    def export(self) -> None:
        config, info = self.config, self.info
        digest = {"rank": info.rank, "step": self.step, "parameters_sha256": parameters_digest(self.stage.state_dict())}
        atomic_write(config.out / f"rank{info.rank}.json", json.dumps(digest))
        if info.is_main:
            print(self.stage.export(config, info.world_size))
        if info.enabled:
            barrier()
            torch.distributed.destroy_process_group()


def _native_cpu_bf16() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None) or all(check is None for check in checks)


def _data_state(value: object) -> tuple[dict[int, list[int]], int]:
    """A rank's checkpointed data state, checked: ``({stream: [epoch, shard, sample]}, skipped)``."""
    if not isinstance(value, dict) or not isinstance(value.get("positions"), dict):
        raise ValueError("its data state is malformed")
    positions = value["positions"]
    for stream, position in positions.items():
        fine = isinstance(stream, int) and isinstance(position, (list, tuple)) and len(position) == 3
        if not fine or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in position):
            raise ValueError(f"its data position {stream!r}: {position!r} is malformed")
    skipped = value.get("skipped")
    if not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"its skipped count {skipped!r} is malformed")
    return {stream: list(position) for stream, position in positions.items()}, skipped


def _one_line(error: BaseException) -> str:
    """An error's own message: for one re-raised from a DataLoader worker, the original's last line."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    name = type(error).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last and len(lines) > 1 else last


def main(argv: list[str] | None = None) -> int:
    """Parse, train, report: one line for a bad option, file or data, and for Ctrl-C."""
    config = parse_config(argv, __doc__)
    trainer = Trainer(config)
    try:
        trainer.run()
    except KeyboardInterrupt:
        trainer.say(f"interrupted at step {trainer.step}; run the same command to resume")
        return 130
    except TrainingDiverged as error:
        print(f"train/train.py: error: {error}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, DataError, OSError, ValueError) as error:  # OSError: a file, a folder
        print(f"train/train.py: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
