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

from pacl_fast.backbone import ClipBackbone

METHODS = ("pacl", "maskclip", "sclip", "clearclip", "naclip")
TRAINING_FREE = METHODS[1:]
#: What runs without PACL weights: the best of the four on the eight standard benchmarks (NACLIP's paper).
DEFAULT_TRAINING_FREE = "naclip"
#: NACLIP's Gaussian neighbourhood width, in patches (``clip/model.py``: ``gaussian_std=5``).
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


class LastBlock(nn.Module):
    """The last residual block of a CLIP ViT, computed the way one training-free method does.

    Input: the unchanged output of block ``L-1``, ``x`` ``[B, 1 + h*w, D]`` (batch first, class token
    first), and the patch grid ``(h, w)``. Output: ``[B, 1 + h*w, D]``, to which the caller applies
    ``ln_post`` and ``proj``. Parameters are the block's own, shared (never copied), and held
    directly rather than through its ``nn.MultiheadAttention``, so that ``encoders.graph``'s
    traceable view (which swaps MultiheadAttention modules) leaves this computation as it is.
    """

    def __init__(self, block: nn.Module, method: str):
        super().__init__()
        if method not in TRAINING_FREE:
            raise ValueError(f"LastBlock computes one of {TRAINING_FREE}, not {method!r}")
        self.method = method
        raise NotImplementedError("LastBlock variants are being written (issue 12)")

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


class TrainingFreeCLIP(nn.Module):
    """A frozen CLIP whose last image block is replaced by a training-free method's (see module docstring).

    Patch embeddings: blocks ``1..L-1`` unchanged, :class:`LastBlock`, ``ln_post`` and ``proj`` on
    every token, the class token dropped, L2-normalised. Positional embeddings are resized as
    these methods' code does (``resize="scale_factor"``, see
    :func:`pacl_fast.backbone.resize_positional_scale_factor`).
    """

    def __init__(self, backbone: ClipBackbone, method: str):
        super().__init__()
        if method not in TRAINING_FREE:
            raise ValueError(f"unknown training-free method {method!r}: choose one of {', '.join(TRAINING_FREE)}")
        if backbone.visual.proj is None:
            raise ValueError(f"CLIP {backbone.identity.arch} has no image projection; {method} needs one")
        self.method = method
        self.backbone = backbone
        self.last_block = LastBlock(backbone.blocks[-1], method)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's own logit scale (100 for OpenAI's and LAION's weights)."""
        return self.backbone.clip.logit_scale.detach().float().clamp(max=math.log(100.0)).exp()

    def describe(self) -> dict:
        return {"method": self.method}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, H, W]`` -> unit patch embeddings ``[B, h, w, E]``."""
        visual = self.backbone.visual
        with torch.no_grad():
            x, grid = self.backbone.embed_patches(pixels, resize="scale_factor")  # [B, 1 + N, D]
            for block in self.backbone.blocks[:-1]:
                x = block(x)
            x = self.last_block(x, grid)
            x = visual.ln_post(x) @ visual.proj  # [B, 1 + N, E]: every token, as these methods project them
            x = F.normalize(x[:, 1:], dim=-1)  # the class token is dropped last
        return x.reshape(x.shape[0], grid[0], grid[1], -1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.encode_text(tokens)

    def encode_global(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.encode_global(pixels)
