"""The two training stages, each carrying its model, its loss and its export; the optimiser and schedule.

* :class:`ClipStage`: a small CLIP from scratch (open_clip's own classes, a custom config); every
  parameter trains, under ``torch.autocast`` for bf16/fp16; exports open_clip's local-dir layout.
* :class:`PaclStage`: PACL on a frozen CLIP. The frozen towers run without autograd in the chosen
  precision with their weights cast (the inference fast path: ``torch.autocast`` through
  ``nn.MultiheadAttention`` ran ViT-B-16 20x slower on a CPU); only the embedder and the loss see
  autocast and gradients. Exports ``pacl.safetensors``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import open_clip
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save as safetensors_bytes
from torch import nn

from pacl_fast.backbone import OPENAI_MEAN, OPENAI_STD, RandomWeightsWarning, config_digest, load_clip
from pacl_fast.defaults import training_defaults
from pacl_fast.distributed import DistInfo, all_gather_no_grad, all_gather_with_grad
from pacl_fast.encoders.base import resolve_dtype
from pacl_fast.files import NotARegularFileError, atomic_write, read_regular_bytes
from pacl_fast.model import PACL, PACLConfig, contrastive_loss
from pacl_fast.weights import metadata_for, nonfinite_tensors, save_pacl_weights
from train.config import TrainConfig

logger = logging.getLogger(__name__)

#: The distribution info of a process alone (no torchrun).
ALONE = DistInfo()
#: Largest --clip-config file read (an open_clip model_cfg is a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20

#: Parameter-name parts that get no weight decay (open_clip's rule), besides every tensor of < 2 dims.
NO_DECAY_NAMES = ("bn", "ln", "bias", "logit_scale", "positional", "class_emb")


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """``torch.autocast`` in ``precision`` on ``device``, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=resolve_dtype(precision))


class Stage:
    """What differs between the stages. ``module`` is what one training step calls (DDP wraps it);
    ``model`` is what is saved, checkpointed and exported."""

    name: str
    model: nn.Module
    module: nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tokenize: Callable[[list[str]], torch.Tensor]

    def loss(self, module: nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, info: DistInfo):
        """``(loss, metrics)`` of one batch, negatives gathered from every rank; metrics are detached
        scalar tensors (converted to numbers only when logged, so a step never waits on them)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What the model is, for the run signature: a resume with another model is refused."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model (what trains, never a frozen CLIP)."""
        return self.model.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(tensors)

    def frozen_names(self) -> list[str]:
        """Parameters and buffers of ``module`` that DDP must neither broadcast nor synchronise."""
        return []

    def export_paths(self, config: TrainConfig) -> list[Path]:
        """The files :meth:`export` writes: checked before the run, so that nothing is in their way."""
        raise NotImplementedError

    def export(self, config: TrainConfig, world_size: int) -> str:
        """Write the stage's export under ``config.out``; returns a line saying where."""
        raise NotImplementedError


class ClipStage(Stage):
    """A CLIP from scratch: open_clip's ``CLIP`` built from ``--clip-config``, trained whole."""

    name = "clip"

    def __init__(self, config: TrainConfig, device: torch.device, info: DistInfo = ALONE):
        path = config.clip_config
        try:
            self.model_cfg = json.loads(read_regular_bytes(path, MAX_CONFIG_BYTES).decode("utf-8"))
            self.model = open_clip.CLIP(**self.model_cfg).to(device)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--clip-config {path}: file not found") from error
        except NotARegularFileError as error:
            raise ValueError(f"--clip-config {error}") from None
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
            raise ValueError(f"--clip-config {path}: not an open_clip model_cfg JSON ({error})") from error
        self.module = self.model
        self.tokenize = open_clip.SimpleTokenizer(
            context_length=self.model_cfg.get("text_cfg", {}).get("context_length", 77)
        )
        self.image_size = int(self.model.visual.image_size[0])
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        # Built once: it caches its labels per device, which a new instance every step would rebuild.
        self.loss_fn = ClipLoss(gather_with_grad=True, cache_labels=True, rank=info.rank, world_size=info.world_size)

    def loss(self, module: nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, info: DistInfo):
        image_features, text_features, logit_scale = module(pixels, tokens)[:3]
        return self.loss_fn(image_features, text_features, logit_scale), {"logit_scale": logit_scale.detach()}

    def identity(self) -> dict:
        return {"clip_config": config_digest(self.model_cfg)}

    def export_paths(self, config: TrainConfig) -> list[Path]:
        folder = config.out / "export"
        return [folder, folder / "open_clip_model.safetensors", folder / "open_clip_config.json"]

    def export(self, config: TrainConfig, world_size: int) -> str:
        folder = export_clip(
            self.model, self.model_cfg, self.mean, self.std, config.out / "export", resolve_dtype(config.export_dtype)
        )
        return f"exported CLIP to local-dir:{folder}"


class PaclFeatures(nn.Module):
    """One PACL training forward as DDP wants it (one module call): the frozen CLIP towers without
    autograd or autocast, in their own (cast) precision, then the embedder with gradients.

    Returns what ``PACL.forward`` returns: unit patches ``[B, N, E]``, unit texts ``[B, E]``
    (float32), the logit scale and ``1 / tau_p``. In fp32 the numbers are ``PACL.forward``'s exactly.
    """

    def __init__(self, model: PACL):
        super().__init__()
        self.model = model

    def forward(
        self, pixels: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        with torch.no_grad(), torch.autocast(pixels.device.type, enabled=False):
            patch_tokens = model.backbone.patch_tokens(pixels)  # [B, h, w, D] in the CLIP's dtype
            texts = model.encode_text(tokens).float()  # [B, E]
        patches = model.embed_tokens(patch_tokens.to(model.embedder.linear.weight.dtype))  # [B, h, w, E]
        return patches.flatten(1, 2), texts, model.logit_scale, model.patch_logit_scale


class PaclStage(Stage):
    """PACL on a frozen CLIP (``--clip``, ``--clip-weights``): trains the embedder and the two temperatures."""

    name = "pacl"

    def __init__(self, config: TrainConfig, device: torch.device, info: DistInfo = ALONE):
        if config.clip_weights is None and not config.clip.startswith("local-dir:"):
            logger.warning("--clip-weights not given: training PACL on a RANDOM CLIP")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            backbone = load_clip(config.clip, config.clip_weights, device=device)
        pacl_config = PACLConfig(
            token_dim=backbone.token_dim,
            embed_dim=backbone.embed_dim,
            hidden_dim=config.embedder_hidden,
            patch_temperature=config.patch_temperature,
            learn_patch_temperature=not config.fixed_patch_temperature,
            logit_scale=config.init_logit_scale,
        )
        self.model = PACL(backbone, pacl_config).to(device)
        self.model.backbone.to(resolve_dtype(config.precision))  # the fast path: frozen weights in the run's precision
        self.module = PaclFeatures(self.model)
        # Captions past the context are cut, as open_clip's training does; a warning naming them would
        # repeat every step.
        self.tokenize = functools.partial(backbone.tokenize, warn=False)
        self.image_size = backbone.image_size
        self.mean, self.std = backbone.mean_std
        self.data_name = {"synthetic": f"synthetic world seed {config.world_seed}"}.get(config.data, config.train_data)

    def loss(self, module: nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, info: DistInfo):
        patches, texts, logit_scale, patch_logit_scale = module(pixels, tokens)
        extra = {}
        if info.enabled:
            extra = dict(
                all_texts=all_gather_no_grad(texts), gather_rows=all_gather_with_grad, offset=info.rank * texts.shape[0]
            )
        loss = contrastive_loss(patches, texts, logit_scale, patch_logit_scale, **extra)
        return loss, {"logit_scale": logit_scale.detach(), "patch_temperature": 1.0 / patch_logit_scale.detach()}

    def identity(self) -> dict:
        return {"clip": str(self.model.backbone.identity), "pacl_config": self.model.config.to_dict()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.trainable_state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_trainable_state_dict(tensors)

    def frozen_names(self) -> list[str]:
        prefix = "model.backbone."
        names = [n for n, _ in self.module.named_parameters()] + [n for n, _ in self.module.named_buffers()]
        return [n for n in names if n.startswith(prefix)]

    def export_paths(self, config: TrainConfig) -> list[Path]:
        return [config.out / "pacl.safetensors"]

    def export(self, config: TrainConfig, world_size: int) -> str:
        metadata = metadata_for(
            self.model,
            training_data=self.data_name,
            steps=config.steps,
            # The defaults of the data it trained on (e.g. the synthetic world's templates): every door reads them.
            extra={
                "batch_size": config.batch_size * world_size,
                "lr": config.lr,
                "defaults": training_defaults(config.data),
            },
        )
        path = save_pacl_weights(self.model, config.out / "pacl.safetensors", metadata)
        return f"exported PACL weights to {path}"


def make_stage(config: TrainConfig, device: torch.device, info: DistInfo = ALONE) -> Stage:
    return (ClipStage if config.stage == "clip" else PaclStage)(config, device, info)


# ------------------------------------------------------------------------------------ optimiser


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, scales and embeddings (open_clip's rule)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or any(part in name for part in NO_DECAY_NAMES)
        (no_decay if plain else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-6
    )


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate of step ``step`` (0-based) as a fraction of the peak: linear warm-up to 1
    over ``warmup`` steps, then a cosine down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :func:`lr_factor`, positioned after ``start_step`` steps (a resumed run). It is a
    function of the step and the config alone, so a checkpoint holds none of it."""
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup, config.steps, config.min_lr_ratio), start_step - 1
    )


OPTIMIZER_MOMENTS = ("step", "exp_avg", "exp_avg_sq")


def load_optimizer_moments(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load AdamW's per-parameter state (step count, moments) from a saved ``optimizer.state_dict()``.

    The hyperparameters (learning rate, betas, weight decay...) stay the config's: the run signature
    already says they match, and a file's own copy of them is not trusted. Every moment must have its
    parameter's shape; ``ValueError`` names what does not fit.
    """
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise ValueError("optimizer state must hold 'param_groups' (a list) and 'state' (a dict)")
    if len(groups) != len(optimizer.param_groups) or not all(isinstance(g, dict) for g in groups):
        raise ValueError(f"optimizer state has {len(groups)} parameter groups, this run {len(optimizer.param_groups)}")
    shapes = {}
    for mine, theirs in zip(optimizer.param_groups, groups):
        ids = theirs.get("params")
        if not isinstance(ids, list) or len(ids) != len(mine["params"]):
            raise ValueError("optimizer state's parameter groups do not fit this run's")
        shapes.update({index: param.shape for index, param in zip(ids, mine["params"])})
    for index, moments in state.items():
        if index not in shapes or not isinstance(moments, dict) or set(moments) != set(OPTIMIZER_MOMENTS):
            raise ValueError(f"optimizer state of parameter {index!r} is not AdamW's {OPTIMIZER_MOMENTS}")
        for name in ("exp_avg", "exp_avg_sq"):
            if not isinstance(moments[name], torch.Tensor) or moments[name].shape != shapes[index]:
                raise ValueError(f"optimizer moment {name} of parameter {index} does not have its shape")
        if not isinstance(moments["step"], torch.Tensor) or moments["step"].numel() != 1:
            raise ValueError(f"optimizer step count of parameter {index} is not a number")
    own = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(
        {"state": state, "param_groups": [{**o, "params": g["params"]} for o, g in zip(own, groups)]}
    )


# --------------------------------------------------------------------------------------- export


def export_clip(
    model: nn.Module,
    model_cfg: dict,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    folder: Path,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """open_clip's local-dir layout: ``open_clip.create_model("local-dir:FOLDER")`` loads it.

    ``dtype`` is the storage type (float16 halves the file; open_clip loads it into fp32 models).
    Both files are written atomically; ValueError, and nothing written, if a tensor holds NaN or Inf.
    """
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std)}}
    tensors = {k: v.detach().to(dtype).cpu().contiguous() for k, v in model.state_dict().items()}
    bad = nonfinite_tensors(tensors)
    if bad:
        listed = ", ".join(f"{name} ({count})" for name, count in sorted(bad.items())[:3])
        raise ValueError(f"not exporting the CLIP to {folder}: NaN/Inf values in {listed}")
    atomic_write(folder / "open_clip_model.safetensors", safetensors_bytes(tensors))
    atomic_write(folder / "open_clip_config.json", json.dumps(config, indent=2))
    return folder


def parameters_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (as float32): equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
