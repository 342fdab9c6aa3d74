"""PACL: a trainable vision embedder on a frozen CLIP, its compatibility function and loss.

Maths (DESIGN §3). Patch tokens ``x_i`` ``[B, N, D]``; embedder
``v_i = W_lin x_i + W_2 GELU(W_1 x_i + b_1) + b_2`` (``[B, N, E]``); with unit ``v``, ``t``:
``a = softmax_i(<v_i, t> / tau_p)``, ``p = sum_i a_i v_i``, ``phi = <p / |p|, t>``. Training is
CLIP's symmetric InfoNCE over ``phi`` with a learnable logit scale.

For all ``B x T`` image-text pairs ``phi`` is single-query attention (query ``t``, keys and
values the image's ``v``), so :func:`compatibility` runs ``F.scaled_dot_product_attention``
instead of building the ``[B, T, N]`` weights that ``kernels.reference.compatibility_reference``
spells out, in blocks of images recomputed in backward: only ``[B, T]`` is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pacl_fast.backbone import ClipBackbone, FrozenClipModel

# Elements of one [block, T, E] tensor of pooled embeddings in compatibility(): 2**18 fp32 = 1 MiB.
COMPAT_BLOCK_ELEMENTS = 1 << 18
MAX_LOG_SCALE = math.log(100.0)


@dataclass
class PACLConfig:
    """Shape and initial values of the trainable part of PACL."""

    token_dim: int  # D: width of the CLIP patch tokens
    embed_dim: int  # E: width of CLIP's joint embedding (text side)
    hidden_dim: int | None = None  # MLP hidden width; None means E
    patch_temperature: float = 1.0  # initial tau_p of the softmax over patches
    learn_patch_temperature: bool = True
    logit_scale: float = 1 / 0.07  # initial InfoNCE logit scale (CLIP's init)
    init_from_clip_proj: bool = True  # start the linear path at CLIP's proj: PACL starts as MaskCLIP

    def __post_init__(self) -> None:
        if self.hidden_dim is None:
            self.hidden_dim = self.embed_dim
        for name in ("token_dim", "embed_dim", "hidden_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PACLConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.patch_temperature > 0:
            raise ValueError(f"PACLConfig.patch_temperature must be > 0, got {self.patch_temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


class VisionEmbedder(nn.Module):
    """``v = W_lin x + W_2 GELU(W_1 x + b_1) + b_2``: ``[..., D] -> [..., E]``."""

    def __init__(self, token_dim: int, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.linear = nn.Linear(token_dim, embed_dim, bias=False)
        self.fc1 = nn.Linear(token_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)
        nn.init.zeros_(self.fc2.weight)  # the residual MLP branch starts silent
        nn.init.zeros_(self.fc2.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens) + self.fc2(F.gelu(self.fc1(tokens)))


def _compatibility_block(patches: torch.Tensor, texts: torch.Tensor, patch_logit_scale: torch.Tensor) -> torch.Tensor:
    """phi for one block of images: patches ``[b, N, E]``, texts ``[T, E]`` -> ``[b, T]``."""
    # SDPA's `scale` is a float, so a learnable 1/tau_p goes into the query instead. One head:
    # [b, 1, T, E] queries against [b, 1, N, E] keys = values (4-D, so SDPA copies nothing).
    query = (texts * patch_logit_scale).to(patches.dtype).expand(patches.shape[0], 1, -1, -1)
    keys = patches.unsqueeze(1)
    pooled = F.scaled_dot_product_attention(query, keys, keys, scale=1.0).squeeze(1)  # [b, T, E]
    return (F.normalize(pooled.float(), dim=-1) * texts.float()).sum(-1)


def compatibility(
    patches: torch.Tensor,
    texts: torch.Tensor,
    patch_logit_scale: torch.Tensor | float,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """PACL compatibility ``phi`` of every image with every text.

    Images go through SDPA in blocks; with gradients on, each block is recomputed in backward
    (activation checkpointing), so neither ``[B, T, N]`` nor ``[B, T, E]`` is ever kept: memory is
    ``O(block * T * E)``. Splitting over images (not texts) keeps backward as cheap as one call:
    each block's key/value gradient covers only its own images.

    Args:
        patches: unit patch embeddings ``[B, N, E]``.
        texts: unit text embeddings ``[T, E]``.
        patch_logit_scale: ``1 / tau_p`` (scalar tensor or float).
        block: images per SDPA call; default keeps each ``[block, T, E]`` near 1 MiB in fp32.
    Returns:
        ``[B, T]`` float32, in ``[-1, 1]``.
    """
    if patches.ndim != 3 or texts.ndim != 2 or patches.shape[-1] != texts.shape[-1]:
        raise ValueError(
            f"expected patches [B, N, E] and texts [T, E], got {tuple(patches.shape)}, {tuple(texts.shape)}"
        )
    scale = torch.as_tensor(patch_logit_scale, dtype=torch.float32, device=patches.device)
    if block is None:
        block = max(1, COMPAT_BLOCK_ELEMENTS // max(1, texts.shape[0] * texts.shape[1]))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (patches, texts, scale))
    rows = []
    for patches_block in patches.split(block):  # split: backward concatenates once
        if needs_grad:
            rows.append(checkpoint(_compatibility_block, patches_block, texts, scale, use_reentrant=False))
        else:
            rows.append(_compatibility_block(patches_block, texts, scale))
    return torch.cat(rows, dim=0)


def contrastive_loss(
    patches: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor,
    patch_logit_scale: torch.Tensor,
    *,
    all_texts: torch.Tensor | None = None,
    gather_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE over PACL compatibilities, for one process or many.

    With several ranks, each rank scores its own images against every text in the global batch
    (``all_texts``, ``[B', E]``), giving its rows of the global ``[B', B']`` compatibility
    matrix; ``gather_rows`` all-gathers those rows *with gradient* (see
    ``pacl_fast.distributed.all_gather_with_grad``), and the text-side loss reads this rank's
    columns. Only texts and ``[B, B']`` rows cross ranks, never ``[B, N, E]`` patches.

    Args:
        patches: this rank's unit patch embeddings ``[B, N, E]``.
        texts: this rank's unit text embeddings ``[B, E]``; pair i is (patches[i], texts[i]).
        logit_scale: the InfoNCE scale (exponentiated).
        patch_logit_scale: ``1 / tau_p`` (exponentiated).
        all_texts: the global batch's texts ``[B', E]``; None for one process.
        gather_rows: ``[B, B'] -> [B', B']`` across ranks, with gradient; needed with ``all_texts``.
        offset: index of this rank's first pair in the global batch.
    """
    batch = patches.shape[0]
    labels = torch.arange(batch, device=patches.device) + offset
    if all_texts is None:
        logits_per_image = logit_scale * compatibility(patches, texts, patch_logit_scale)  # [B, B]
        logits_per_text = logits_per_image.T
    else:
        if gather_rows is None:
            raise ValueError("all_texts needs gather_rows to collect the other ranks' compatibility rows")
        rows = compatibility(patches, all_texts, patch_logit_scale)  # [B, B']
        logits_per_image = logit_scale * rows
        logits_per_text = logit_scale * gather_rows(rows)[:, offset : offset + batch].T  # [B, B']
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class PACL(FrozenClipModel):
    """Frozen CLIP + trainable :class:`VisionEmbedder`, logit scale and patch temperature.

    The CLIP is a registered submodule (``backbone``) whose parameters never require grad;
    :meth:`trainable_state_dict` holds only what PACL trains (``embedder.*``,
    ``log_logit_scale``, ``log_patch_logit_scale``), which is what weight files and
    checkpoints store: the CLIP stays open_clip's own weights.
    """

    method = "pacl"

    def __init__(self, backbone: ClipBackbone, config: PACLConfig | None = None):
        super().__init__()
        if config is None:
            config = PACLConfig(token_dim=backbone.token_dim, embed_dim=backbone.embed_dim)
        if (config.token_dim, config.embed_dim) != (backbone.token_dim, backbone.embed_dim):
            raise ValueError(
                f"PACLConfig (token_dim={config.token_dim}, embed_dim={config.embed_dim}) does not fit CLIP "
                f"{backbone.identity.arch} (token_dim={backbone.token_dim}, embed_dim={backbone.embed_dim})"
            )
        self.config = config
        self.backbone = backbone
        self.embedder = VisionEmbedder(config.token_dim, config.embed_dim, config.hidden_dim)
        if config.init_from_clip_proj and backbone.visual.proj is not None:
            with torch.no_grad():
                self.embedder.linear.weight.copy_(backbone.visual.proj.detach().T.float())
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale)))
        self.log_patch_logit_scale = nn.Parameter(
            torch.tensor(-math.log(config.patch_temperature)), requires_grad=config.learn_patch_temperature
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What PACL trains, by name: the embedder and the two temperatures (never the CLIP)."""
        return {name: tensor for name, tensor in self.state_dict().items() if not name.startswith("backbone.")}

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load :meth:`trainable_state_dict` tensors; every name must be there, nothing else."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"PACL tensors do not match: missing {missing}, unexpected {unexpected}")
        self.load_state_dict(tensors, strict=False)

    def describe(self) -> dict:
        """What, besides the weights, defines this model's outputs (keys caches and exports)."""
        return {"method": self.method, "pacl_config": self.config.to_dict()}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=MAX_LOG_SCALE).exp()

    @property
    def patch_logit_scale(self) -> torch.Tensor:
        """1 / tau_p."""
        return self.log_patch_logit_scale.clamp(max=MAX_LOG_SCALE).exp()

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP patch tokens ``[..., D]`` -> unit PACL embeddings ``[..., E]``."""
        return F.normalize(self.embedder(tokens), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, H, W]`` -> unit patch embeddings ``[B, h, w, E]``."""
        with torch.no_grad():
            tokens = self.backbone.patch_tokens(pixels)  # [B, h, w, D], frozen
        return self.embed_tokens(tokens.to(self.embedder.linear.weight.dtype))

    def forward(
        self, pixels: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training features, as open_clip's CLIP.forward returns them: unit patches ``[B, N, E]``,
        unit texts ``[B, E]``, the logit scale and ``1 / tau_p`` (so that DDP sees every parameter used)."""
        patches = self.encode_image(pixels)
        return patches.flatten(1, 2), self.encode_text(tokens), self.logit_scale, self.patch_logit_scale

    def loss(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Single-process InfoNCE loss of a batch of image-caption pairs."""
        return contrastive_loss(*self(pixels, tokens))

    def compatibility(self, patches: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """phi for all pairs: unit patches ``[B, N, E]`` x unit texts ``[T, E]`` -> ``[B, T]``."""
        return compatibility(patches, texts, self.patch_logit_scale)
