"""The training options: one dataclass, parsed once from the command line, checked once.

Each :class:`TrainConfig` field declares its own command-line option (help text, group, type,
choices), so the parser, its ``--help`` (every option with its default) and the config cannot
drift apart. Nothing below :func:`parse_config` sees argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacl_fast.data.shards import DEFAULT_MAX_MEMBER_BYTES

STAGES = ("clip", "pacl")
DATA_KINDS = ("synthetic", "csv", "wds")
PRECISIONS = ("fp32", "bf16", "fp16")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """Options that cannot work together; the message names them."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    group: str,
    type: Any = str,
    choices: tuple[str, ...] | None = None,
    flag: bool = False,
) -> Any:
    """A :class:`TrainConfig` field that is also a command-line option (``--field-name``)."""
    metadata = {"help": help, "group": group, "type": type, "choices": choices, "flag": flag}
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a training run is told. Fields map one to one to ``train/train.py`` options."""

    stage: str = option(
        help="what to train: clip (from scratch) or pacl (on a frozen CLIP)", group="run", choices=STAGES
    )
    out: Path = option(help="run folder: checkpoints/, log.jsonl, exports", group="run", type=Path)

    data: str = option("synthetic", help="pair source", group="data", choices=DATA_KINDS)
    train_data: str | None = option(None, help="csv/tsv table, or shard pattern 'dir/{00000..00099}.tar'", group="data")
    csv_img_key: str = option("filepath", help="image path column of the table", group="data")
    csv_caption_key: str = option("title", help="caption column of the table", group="data")
    csv_separator: str | None = option(None, help="table separator (default: tab for .tsv, else comma)", group="data")
    image_size: int | None = option(None, help="training image side (default: the CLIP's)", group="data", type=int)
    world_seed: int = option(0, help="synthetic world seed (validation uses 1)", group="data", type=int)
    workers: int = option(
        1, help="DataLoader worker processes per rank (0: load in the training process)", group="data", type=int
    )
    data_streams: int | None = option(
        None,
        help="wds: shard streams per rank, a multiple of --workers, fixed for the whole run "
        "(default: --workers, or 1 without workers)",
        group="data",
        type=int,
    )
    max_member_bytes: int = option(
        DEFAULT_MAX_MEMBER_BYTES, help="wds: skip a sample with a tar member larger than this", group="data", type=int
    )

    clip_config: Path | None = option(None, help="stage clip: open_clip model_cfg JSON file", group="model", type=Path)
    clip: str | None = option(None, help="stage pacl: open_clip name or local-dir:PATH", group="model")
    clip_weights: str | None = option(None, help="stage pacl: pretrained tag or checkpoint file", group="model")
    embedder_hidden: int | None = option(
        None, help="PACL MLP hidden width (default: E, the CLIP embedding width)", group="model", type=int
    )
    patch_temperature: float = option(1.0, help="initial tau_p of the patch softmax", group="model", type=float)
    fixed_patch_temperature: bool = option(False, help="do not learn tau_p", group="model", flag=True)
    init_logit_scale: float = option(1 / 0.07, help="initial InfoNCE logit scale", group="model", type=float)

    steps: int = option(1000, help="total optimiser steps", group="optimisation", type=int)
    batch_size: int = option(128, help="pairs per rank per step", group="optimisation", type=int)
    lr: float = option(1e-3, help="peak learning rate (AdamW)", group="optimisation", type=float)
    min_lr_ratio: float = option(0.0, help="cosine floor as a fraction of --lr", group="optimisation", type=float)
    weight_decay: float = option(
        0.1, help="AdamW weight decay (not on gains, biases, scales, embeddings)", group="optimisation", type=float
    )
    warmup: int = option(100, help="linear warm-up steps", group="optimisation", type=int)
    beta1: float = option(0.9, help="AdamW beta1", group="optimisation", type=float)
    beta2: float = option(0.98, help="AdamW beta2", group="optimisation", type=float)
    grad_clip: float | None = option(
        None, help="clip the gradient norm to this (default: no clipping)", group="optimisation", type=float
    )
    precision: str = option(
        "fp32",
        help="pacl: the frozen CLIP runs in this precision (weights cast, no autograd), the embedder under "
        "autocast; clip: autocast. fp16 needs CUDA",
        group="optimisation",
        choices=PRECISIONS,
    )

    device: str | None = option(None, help="cuda or cpu (default: cuda if available)", group="run")
    seed: int = option(0, help="seed of model init and data order", group="run", type=int)
    threads: int | None = option(None, help="torch CPU threads per process (default: torch's)", group="run", type=int)
    save_every: int = option(500, help="checkpoint every K steps; 0: only at the end", group="run", type=int)
    log_every: int = option(10, help="a log.jsonl line every K steps", group="run", type=int)
    export_dtype: str = option(
        "float32", help="stage clip: storage type of the exported weights", group="run", choices=EXPORT_DTYPES
    )
    resume: str = option(
        "auto", help="auto (the newest readable checkpoint in OUT, if any), none, or a checkpoint file", group="run"
    )

    def check(self) -> None:
        """ConfigError naming the option when a value or a combination cannot work."""
        positive = ("steps", "batch_size", "log_every", "max_member_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "warmup", "save_every", "world_seed", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("threads", "image_size", "embedder_hidden", "data_streams"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"--grad-clip must be > 0, got {self.grad_clip}")
        if not self.patch_temperature > 0:
            raise ConfigError(f"--patch-temperature must be > 0, got {self.patch_temperature}")
        if not self.init_logit_scale > 0:
            raise ConfigError(f"--init-logit-scale must be > 0, got {self.init_logit_scale}")
        if self.stage == "clip" and self.clip_config is None:
            raise ConfigError("--stage clip needs --clip-config (an open_clip model_cfg JSON file)")
        if self.stage == "pacl" and self.clip is None:
            raise ConfigError("--stage pacl needs --clip (an open_clip name or local-dir:PATH)")
        if self.data in ("csv", "wds") and not self.train_data:
            example = "TABLE.csv|.tsv" if self.data == "csv" else "'dir/{00000..00099}.tar'"
            raise ConfigError(f"--data {self.data} needs --train-data {example}")
        if self.data_streams is not None and self.data != "wds":
            raise ConfigError("--data-streams applies to --data wds only")
        if self.streams % max(1, self.workers):
            raise ConfigError(f"--data-streams {self.streams} must be a multiple of --workers {self.workers}")

    @property
    def streams(self) -> int:
        """WebDataset streams per rank (:class:`pacl_fast.data.pairs.WebDatasetPairs`)."""
        return self.data_streams if self.data_streams is not None else max(1, self.workers)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _describe_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The command line of ``train/train.py``: one option per :class:`TrainConfig` field, with its default."""
    parser = argparse.ArgumentParser(
        prog="train/train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    groups: dict[str, Any] = {}
    for spec in dataclasses.fields(TrainConfig):
        meta = spec.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kwargs: dict[str, Any] = {"dest": spec.name}
        if spec.default is dataclasses.MISSING:
            kwargs.update(required=True, help=f"{meta['help']} (required)")
        elif meta["flag"]:
            kwargs.update(action="store_true", default=spec.default, help=f"{meta['help']} (default: off)")
        else:
            described = "" if "(default:" in meta["help"] else f" (default: {_describe_default(spec.default)})"
            kwargs.update(default=spec.default, help=meta["help"] + described)
        if not meta["flag"]:
            kwargs.update(type=meta["type"], choices=meta["choices"])
            if meta["type"] in (int, float):
                kwargs["metavar"] = "N" if meta["type"] is int else "X"
        group.add_argument(f"--{_flag(spec.name)}", **kwargs)
    return parser


def parse_config(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    """Command line -> checked :class:`TrainConfig` (argparse's usage error, exit 2, on a bad option)."""
    parser = build_parser(description)
    config = TrainConfig(**vars(parser.parse_args(argv)))
    try:
        config.check()
    except ConfigError as error:
        parser.error(str(error))
    return config
