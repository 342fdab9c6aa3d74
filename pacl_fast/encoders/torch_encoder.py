"""The PyTorch encoder: eager (the reference every other backend is held to) or ``torch.compile``."""

from __future__ import annotations

import torch
from torch import nn

from pacl_fast.encoders.base import SHORT_NAMES, cast_copy, check_pixels
from pacl_fast.encoders.graph import GlobalTower, ImageTower, TextTower, model_device


class TorchEncoder:
    """Runs a model (PACL or a training-free method) in ``dtype`` (fp32, bf16 or fp16) under inference mode.

    Args:
        model: the model; never modified: a model in another precision is run as a cast copy
            (``pacl_fast.build`` casts the model it builds first, so that no copy is made).
        dtype: weights and activations precision.
        compile: run the towers through ``torch.compile`` (Inductor). The batch axis is dynamic;
            each new input size compiles once. Weights are frozen into the compiled graph
            (Inductor's ``freezing``): build a new encoder after changing them.
        channels_last: feed pixels to the patch embedding in channels-last layout.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype = torch.float32,
        *,
        compile: bool = False,
        channels_last: bool = False,
    ):
        if dtype not in SHORT_NAMES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.model = cast_copy(model, dtype).eval()
        self.dtype = dtype
        self.device = model_device(self.model)
        self.compiled = compile
        self.channels_last = channels_last
        self.patch_size = self.model.backbone.patch_size
        if channels_last:
            conv = self.model.backbone.visual.conv1
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        self._image_tower = ImageTower(self.model)
        self._image, self._text, self._global = self._image_tower, TextTower(self.model), GlobalTower(self.model)
        if compile:
            # Freezing lets Inductor fold the weights as constants and, on CPU, pre-pack them for oneDNN.
            options = {"freezing": True}
            self._image = torch.compile(self._image_tower, dynamic=False, options=options)
            self._text = torch.compile(self._text, dynamic=False, options=options)
            self._global = torch.compile(self._global, dynamic=False, options=options)

    @property
    def name(self) -> str:
        return "compile" if self.compiled else "torch"

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        check_pixels(pixels, self.patch_size)
        pixels = pixels.to(self.device, self.dtype)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self.compiled:
            self._image_tower.prime(tuple(pixels.shape[-2:]))
            torch._dynamo.maybe_mark_dynamic(pixels, 0)
        return pixels

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, h, w, E]`` unit embeddings (in ``dtype``)."""
        pixels = self._pixels(pixels)
        return self._image(pixels) if self.compiled else self.model.encode_image(pixels)

    @torch.inference_mode()
    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> the CLIP's patch tokens ``[B, h, w, D]`` (in ``dtype``), eagerly: the fused
        PACL head (``Head.embed_similarity``) then applies the embedder, normalisation and similarity."""
        check_pixels(pixels, self.patch_size)
        return self.model.backbone.patch_tokens(pixels.to(self.device, self.dtype))

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, E]`` unit text embeddings (float32)."""
        tokens = tokens.to(self.device)
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(tokens, 0)
            return self._text(tokens).float()
        return self.model.encode_text(tokens).float()

    @torch.inference_mode()
    def encode_global(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` (native size) -> ``[B, E]`` CLIP's unit image embeddings (float32)."""
        pixels = pixels.to(self.device, self.dtype)
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(pixels, 0)
            return self._global(pixels).float()
        return self.model.encode_global(pixels).float()
