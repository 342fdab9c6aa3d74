"""A model's two towers as plain modules that trace well: what torch.compile and ONNX export see.

:class:`ImageTower` is the model's ``encode_image`` (CLIP and the method's last step as one graph:
PACL's embedder, or a training-free last block) and :class:`TextTower` its ``encode_text``, both
calling the model's own code on a *view* of the model whose ``nn.MultiheadAttention`` blocks run
as one batch-first SDPA call. Parameters are shared with the model, never copied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pacl_fast.backbone import ClipBackbone

#: Input and output names of the exported graphs (ONNX, TensorRT engines, OpenVINO models) and their manifests.
IMAGE_INPUT, IMAGE_OUTPUT = "pixels", "patches"
TEXT_INPUT, TEXT_OUTPUT = "tokens", "texts"
GLOBAL_OUTPUT = "images"


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention, batch first, as one ``scaled_dot_product_attention``.

    Why a second attention path: traced graphs (torch.compile, torch.export) cannot take
    MultiheadAttention's fused inference fast path, and its traceable path transposes the
    batch-first input and runs the in-projection as a broadcast ``bmm`` over a copy of the weight
    per token. ViT-B-16 in bf16 on a 2-core CPU ran at 0.35 images/s compiled against 9 eager;
    this module computes the same function with the same parameters at eager speed or better.
    """

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        if not supports_sdpa(attention):
            raise ValueError("SelfAttention needs a batch-first MultiheadAttention without bias_k/bias_v/add_zero_attn")
        self.attention = attention

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        mha = self.attention
        if not (query is key and key is value) or need_weights or kwargs:  # cross-attention etc.: the module's own path
            return mha(query, key, value, need_weights=need_weights, attn_mask=attn_mask, **kwargs)
        batch, length, width = query.shape
        heads = mha.num_heads
        qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)  # [B, L, 3D]
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, d]
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # MultiheadAttention: True = masked out; SDPA: True = attend
                attn_mask = ~attn_mask
            if attn_mask.ndim == 3:  # [B*H, L, L]
                attn_mask = attn_mask.view(batch, heads, length, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, L, d]
        return mha.out_proj(out.transpose(1, 2).reshape(batch, length, width)), None


def supports_sdpa(attention: nn.Module) -> bool:
    """Whether :class:`SelfAttention` computes exactly what this module computes (in eval mode)."""
    return (
        isinstance(attention, nn.MultiheadAttention)
        and attention.batch_first
        and attention._qkv_same_embed_dim
        and attention.bias_k is None
        and not attention.add_zero_attn
    )


def replace_modules(root: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """A view of ``root`` where every submodule ``m`` with ``make(m)`` not None is replaced by it.

    Only the modules on the way down to a replacement are copied (shallowly, each with its own
    child table); everything else, parameters and buffers included, is shared with ``root``.
    ``root`` itself is left untouched.
    """
    replacement = make(root)
    if replacement is not None:
        return replacement
    changed = {}
    for name, child in root._modules.items():
        if child is not None:
            new_child = replace_modules(child, make)
            if new_child is not child:
                changed[name] = new_child
    if not changed:
        return root
    view = copy.copy(root)
    view._modules = {**root._modules, **changed}
    return view


def traceable_view(model: nn.Module) -> nn.Module:
    """``model`` with its CLIP's self-attention blocks as :class:`SelfAttention`; weights shared."""
    return replace_modules(model, lambda m: SelfAttention(m) if supports_sdpa(m) else None)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The precision the model runs in: its CLIP's (every method casts with it)."""
    return model.backbone.visual.conv1.weight.dtype


def model_device(model: nn.Module) -> torch.device:
    return model.backbone.visual.conv1.weight.device


class ImageTower(nn.Module):
    """Normalised pixels ``[B, 3, H, W]`` -> the model's unit patch embeddings ``[B, h, w, E]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = traceable_view(model)
        self._primed: set[tuple[int, int, torch.dtype, torch.device]] = set()

    @property
    def backbone(self) -> ClipBackbone:
        return self.model.backbone

    def prime(self, image_size: tuple[int, int]) -> None:
        """Fill the backbone's positional-embedding cache for this input size, eagerly.

        Export traces with fake tensors: a cache miss during tracing would store a fake tensor in
        the cache that the eager model shares. Priming makes tracing read a real constant.
        """
        multiple = self.model.pixel_multiple
        if image_size[0] % multiple or image_size[1] % multiple:
            raise ValueError(f"image size {image_size} must be a multiple of the model's pixel multiple {multiple}")
        weight = self.backbone.visual.conv1.weight
        key = (image_size[0], image_size[1], weight.dtype, weight.device)
        if key not in self._primed:  # one eager pass fills every cache the model's method reads
            with torch.no_grad():
                self.model.encode_image(torch.zeros(1, 3, *image_size, dtype=weight.dtype, device=weight.device))
            self._primed.add(key)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class TextTower(nn.Module):
    """Token ids ``[T, L]`` (int64) -> unit CLIP text embeddings ``[T, E]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = traceable_view(model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


class GlobalTower(nn.Module):
    """Normalised pixels at the CLIP's native size ``[B, 3, S, S]`` -> CLIP's own unit image embeddings ``[B, E]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = traceable_view(model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_global(pixels)
