"""What turns a CLIP's image tower into class-comparable patch embeddings: the methods.

* ``"pacl"``: PACL's trained vision embedder on the final patch tokens (:class:`pacl_fast.model.PACL`).
* ``"maskclip"``, ``"sclip"``, ``"clearclip"``, ``"naclip"``: training-free methods that change
  only the **last** block of the image tower (:class:`TrainingFreeCLIP`, :class:`LastBlock`), for
  users with stock CLIP weights and no PACL weights.

Every model here has the same face, which the encoders (``pacl_fast.encoders``), the builder
and the segmenter rely on:

* ``method`` (str), ``backbone`` (the frozen :class:`~pacl_fast.backbone.ClipBackbone`, a registered submodule);
* ``encode_image(pixels [B, 3, H, W]) -> [B, h, w, E]`` unit patch embeddings;
* ``encode_text(tokens [T, L]) -> [T, E]`` unit text embeddings;
* ``encode_global(pixels [B, 3, S, S]) -> [B, E]``: CLIP's own pooled image embedding;
* ``logit_scale``: the scale that turns cosines into softmax logits;
* ``describe() -> dict``: what besides the weights defines the outputs (keys caches and exports);
* ``trainable_state_dict()``: what a weights file holds (empty for training-free methods).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pacl_fast.backbone import ClipBackbone, FrozenClipModel
from pacl_fast.choices import DEFAULT_TRAINING_FREE_METHOD as DEFAULT_TRAINING_FREE
from pacl_fast.choices import METHODS
from pacl_fast.choices import TRAINING_FREE_METHODS as TRAINING_FREE

#: NACLIP's Gaussian neighbourhood width, in patches: ``gaussian_std=5.``, the default of its segmentor
#: (sinahmr/NACLIP@0cac3a6 ``naclip.py`` l. 21, handed to the ViT by ``set_params`` at l. 44; the ViT's
#: own ``clip/model.py`` l. 83 starts it at 0, which ``set_params`` refuses for ``attn_strategy='naclip'``).
NACLIP_SIGMA = 5.0


def resolve_method(method: str | None, has_pacl_weights: bool) -> str:
    """The method to run: ``method`` checked, or the default (``"pacl"`` with weights, else NACLIP)."""
    if method is None:
        return "pacl" if has_pacl_weights else DEFAULT_TRAINING_FREE
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if has_pacl_weights and method != "pacl":
        raise ValueError(
            f"pacl_weights were given with method={method!r}: PACL weights are used only by method='pacl'. "
            f"Pick one: drop the PACL weights to run {method}, or use method='pacl'"
        )
    return method


#: Methods whose last block keeps CLIP's residual stream and FFN (the others return the attention branch alone).
RESIDUAL_METHODS = ("maskclip", "sclip")
#: How and when each method's code resizes positional embeddings to another grid (see ``TrainingFreeCLIP``
#: and :data:`pacl_fast.backbone.POSITIONAL_RESIZES`).
POSITIONAL_RESIZE = {
    "maskclip": "size_if_count_differs",
    "sclip": "scale_factor_if_count_differs",
    "clearclip": "scale_factor_if_count_differs",
    "naclip": "scale_factor_if_count_differs",
}


def gaussian_neighbourhood(
    grid: tuple[int, int], sigma: float, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """NACLIP's attention addition ``G`` ``[1 + h*w, 1 + h*w]`` for a patch grid ``(h, w)``.

    ``G[1+p, 1+q] = exp(-|grid(p) - grid(q)|^2 / (2 sigma^2))`` with patches in row-major order and
    distances in patch units: 1 on the diagonal, not normalised; the class token's row and column
    are 0. Written with torch ops on the grid only, so that it traces (torch.compile, ONNX export).
    Built in float32 and cast once, as NACLIP does (``.to(x.dtype)``, ``clip/model.py`` l. 194).
    """
    h, w = grid
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)  # [h*w]
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)  # [h*w]
    distance2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2  # [h*w, h*w]
    gauss = torch.exp(distance2 * (-0.5 / (sigma * sigma)))
    return F.pad(gauss, (1, 0, 1, 0)).to(dtype)  # [1 + h*w, 1 + h*w]: class row and column 0


def check_last_block(block: nn.Module) -> None:
    """Raise ``ValueError`` unless ``block`` is an open_clip ``ResidualAttentionBlock`` :class:`LastBlock` reads."""
    attn = getattr(block, "attn", None)
    problem = None
    if not isinstance(attn, nn.MultiheadAttention):
        problem = f"its attention is a {type(attn).__name__}, not nn.MultiheadAttention (a custom open_clip block)"
    elif not attn.batch_first:
        problem = "its attention is not batch first"
    elif not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        problem = "its attention has separate q/k/v widths, bias_k/bias_v or add_zero_attn"
    elif not all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")):
        problem = "it lacks one of ln_1, ln_2, mlp, ls_1, ls_2"
    if problem is not None:
        raise ValueError(
            f"the training-free methods need open_clip's ResidualAttentionBlock with nn.MultiheadAttention "
            f"as the last image block: {problem}"
        )


class LastBlock(nn.Module):
    """The last residual block of a CLIP ViT, computed the way one training-free method does.

    Input: the unchanged output of block ``L-1``, ``x`` ``[B, 1 + h*w, D]`` (batch first, class token
    first), and the patch grid ``(h, w)``. Output: ``[B, 1 + h*w, D]``, to which the caller applies
    ``ln_post`` and ``proj``. Parameters are the block's own, shared (never copied), and held
    directly rather than through its ``nn.MultiheadAttention``, so that ``encoders.graph``'s
    traceable view (which swaps MultiheadAttention modules) leaves this computation as it is.

    With ``y = ln_1(x)``, ``q, k, v = in_proj(y)`` split into heads of width ``d``, ``s = d**-0.5``,
    softmax over the last axis per head, the class token taking part like any other token:

    * ``maskclip`` (chongzhou96/MaskCLIP@245d31f ``mmseg/models/backbones/vit.py`` l. 96-104, run on
      the last layer by ``return_qkv=True`` in ``configs/_base_/models/maskclip_vit16.py`` l. 27):
      ``a = out_proj(v)`` (no query-key attention: each token its own value); ``x' = x + a``;
      ``out = x' + mlp(ln_2(x'))``. Residual and FFN kept.
    * ``sclip`` (wangf3014/SCLIP@b56bd30 ``clip/model.py`` l. 249-251 and 295-308, ``csa=True`` from
      ``clip_segmentor.py`` l. 63): ``A = softmax(q q^T s) + softmax(k k^T s)`` (summed, rows sum to
      2), ``a = out_proj(A v)``; ``x' = x + a``; ``out = x' + mlp(ln_2(x'))``.
    * ``clearclip`` (mc-lan/ClearCLIP@ad68a40 ``open_clip/transformer.py`` l. 523-536 with
      ``ignore_residual=True``, ``last_n_layers=1``, and l. 614-620 ``model_type='ClearCLIP'``):
      ``out = out_proj(softmax(q q^T s) v)``. No residual, no FFN.
    * ``naclip`` (sinahmr/NACLIP@0cac3a6 ``clip/model.py`` l. 118-119 ``arch='reduced'``, l. 189-207
      and 225-227 ``attn_strategy='naclip'``, defaults in ``naclip.py`` l. 21):
      ``out = out_proj(softmax(k k^T s + G) v)`` with ``G`` = :func:`gaussian_neighbourhood` (sigma 5
      patches, the same for every head, added after the scale). No residual, no FFN.

    LayerScale (``ls_1``/``ls_2``, absent from every CLIP these repos run) multiplies the branch it
    belongs to, as in the block itself: ``ls_1`` the attention output, ``ls_2`` the FFN's.
    """

    def __init__(self, block: nn.Module, method: str, sigma: float = NACLIP_SIGMA):
        super().__init__()
        if method not in TRAINING_FREE:
            raise ValueError(f"LastBlock computes one of {TRAINING_FREE}, not {method!r}")
        check_last_block(block)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0 (patches), got {sigma}")
        attn: nn.MultiheadAttention = block.attn
        self.method = method
        self.num_heads = int(attn.num_heads)
        self.sigma = float(sigma)
        self.residual = method in RESIDUAL_METHODS
        # Shared with the block (assignment registers the same Parameter / module, no copy).
        self.ln_1 = block.ln_1
        self.in_proj_weight = attn.in_proj_weight  # [3D, D]
        self.in_proj_bias = attn.in_proj_bias  # [3D] or None
        self.out_proj = attn.out_proj
        self.ls_1 = block.ls_1
        if self.residual:
            self.ln_2 = block.ln_2
            self.mlp = block.mlp
            self.ls_2 = block.ls_2
        self._neighbourhood_cache: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}

    def extra_repr(self) -> str:
        extra = f", sigma={self.sigma}" if self.method == "naclip" else ""
        return f"method={self.method!r}, heads={self.num_heads}{extra}"

    def neighbourhood(self, grid: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """NACLIP's ``G`` for this grid ``[1 + h*w, 1 + h*w]``, cached per (grid, dtype, device) when eager."""
        key = (grid[0], grid[1], dtype, device)
        cached = self._neighbourhood_cache.get(key)
        if cached is not None:
            return cached
        gauss = gaussian_neighbourhood(grid, self.sigma, dtype, device)
        if not torch.compiler.is_compiling():  # a traced (fake) tensor must not outlive its trace
            self._neighbourhood_cache[key] = gauss
        return gauss

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module hook: moving the model drops the cache
        self._neighbourhood_cache = {}
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, length, width = x.shape
        if length != 1 + grid[0] * grid[1]:
            raise ValueError(f"x has {length} tokens; a {grid[0]}x{grid[1]} grid needs {1 + grid[0] * grid[1]}")
        y = self.ln_1(x)  # [B, N, D]
        if self.method == "maskclip":  # value path only: in_proj's last third, then out_proj
            bias = None if self.in_proj_bias is None else self.in_proj_bias[2 * width :]
            attended = F.linear(y, self.in_proj_weight[2 * width :], bias)  # [B, N, D]
        else:
            heads = self.num_heads
            qkv = F.linear(y, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3D]
            q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
            # SDPA's default scale is d**-0.5; A @ v for a sum of softmaxes is the sum of the SDPAs.
            if self.method == "sclip":
                out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
            elif self.method == "clearclip":
                out = F.scaled_dot_product_attention(q, q, v)
            else:  # naclip: one additive [N, N] mask broadcast over batch and heads
                out = F.scaled_dot_product_attention(k, k, v, attn_mask=self.neighbourhood(grid, q.dtype, q.device))
            attended = out.transpose(1, 2).reshape(batch, length, width)  # [B, N, D]
        attended = self.ls_1(self.out_proj(attended))  # [B, N, D]
        if not self.residual:
            return attended
        x = x + attended
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class TrainingFreeCLIP(FrozenClipModel):
    """A frozen CLIP whose last image block is replaced by a training-free method's (see module docstring).

    Patch embeddings: blocks ``1..L-1`` unchanged, :class:`LastBlock`, ``ln_post`` and ``proj`` on
    every token, the class token dropped, L2-normalised. All four repos do exactly this (per-token
    steps, so the order of dropping the class token does not matter): NACLIP ``clip/model.py``
    l. 125-126 and ``naclip.py`` l. 58-60; SCLIP ``clip/model.py`` l. 254-255 and
    ``clip_segmentor.py`` l. 63-65; ClearCLIP ``open_clip/transformer.py`` l. 557-562 and
    ``clearclip_segmentor.py`` l. 123-124; MaskCLIP ``vit.py`` l. 434-437 (``final_norm`` is
    ``ln_post``), l. 455-460, ``decode_heads/maskclip_head.py`` l. 79-80 and 124 (``proj`` as a 1x1
    conv, then unit norm).

    Positional embeddings for another grid are resized as each method's code does
    (:data:`POSITIONAL_RESIZE`), and when it does: all four resize only when the number of patches
    differs from the native grid's (a 7 x 28 grid of a 14 x 14 CLIP gets the native table unresized,
    in row-major order: SCLIP ``clip/model.py`` l. 239-242, NACLIP ``clip/model.py`` l. 104-107,
    ClearCLIP ``open_clip/transformer.py`` l. 510-513, MaskCLIP ``vit.py`` l. 367-368). SCLIP, ClearCLIP
    and NACLIP then resize with ``scale_factor=((h + 0.1) / g0, (w + 0.1) / g1)``, bicubic,
    ``align_corners=False`` (:func:`pacl_fast.backbone.resize_positional_scale_factor`; SCLIP l. 263-281,
    NACLIP l. 134-151, ClearCLIP l. 569-587); MaskCLIP with ``size=(h, w)`` (``vit.py`` l. 377-378 and
    405-406, mmseg's ``resize`` = ``F.interpolate(size=..., mode="bicubic", align_corners=False)`` with
    ``interpolate_mode='bicubic'`` from ``configs/_base_/models/maskclip_vit16.py``). The class token's
    embedding is kept as it is in all four. They resize the table in the model's precision (fp16 on
    CUDA); the engine resizes in float32 and casts.
    """

    def __init__(self, backbone: ClipBackbone, method: str):
        super().__init__()
        if method not in TRAINING_FREE:
            raise ValueError(f"unknown training-free method {method!r}: choose one of {', '.join(TRAINING_FREE)}")
        if backbone.visual.proj is None:
            raise ValueError(f"CLIP {backbone.identity.arch} has no image projection; {method} needs one")
        try:
            last_block = LastBlock(backbone.blocks[-1], method)  # checks the block
        except ValueError as error:
            raise ValueError(f"CLIP {backbone.identity.arch} cannot run {method}: {error}") from None
        self.method = method
        self.backbone = backbone
        self.positional_resize = POSITIONAL_RESIZE[method]
        self.last_block = last_block

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's own logit scale (100 for OpenAI's and LAION's weights)."""
        return self.backbone.clip.logit_scale.detach().float().clamp(max=math.log(100.0)).exp()

    def describe(self) -> dict:
        """What defines the outputs besides the weights (keys ONNX/TensorRT/OpenVINO caches and text caches)."""
        details = {"method": self.method, "positional_resize": self.positional_resize}
        if self.method == "naclip":
            details["sigma"] = self.last_block.sigma
        return details

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, H, W]`` -> unit patch embeddings ``[B, h, w, E]``."""
        visual = self.backbone.visual
        with torch.no_grad():
            x, grid = self.backbone.embed_patches(pixels, resize=self.positional_resize)  # [B, 1 + N, D]
            for block in self.backbone.blocks[:-1]:
                x = block(x)
            x = self.last_block(x, grid)
            x = visual.ln_post(x) @ visual.proj  # [B, 1 + N, E]: every token, as these methods project them
            x = F.normalize(x[:, 1:], dim=-1)  # the class token is dropped last
        return x.reshape(x.shape[0], grid[0], grid[1], -1)
