"""The PyTorch encoder: eager (the reference every other backend is held to) or ``torch.compile``."""

from __future__ import annotations

import torch

from pacl_fast.encoders.graph import ImageTower, TextTower
from pacl_fast.model import PACL

TORCH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TorchEncoder:
    """Runs a :class:`PACL` in ``dtype`` (fp32, bf16 or fp16) under inference mode.

    Args:
        model: the PACL model; it is cast to ``dtype`` in place.
        dtype: weights and activations precision.
        compile: run both towers through ``torch.compile`` (Inductor). The batch axis is dynamic;
            each new input size compiles once. Weights are frozen into the compiled graph
            (Inductor's ``freezing``): build a new encoder after changing them.
        channels_last: feed pixels to the patch embedding in channels-last layout.
    """

    def __init__(
        self,
        model: PACL,
        dtype: torch.dtype = torch.float32,
        *,
        compile: bool = False,
        channels_last: bool = False,
    ):
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.model = model.eval()
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.model.to(dtype)
        self.compiled = compile
        self.channels_last = channels_last
        if channels_last:
            conv = self.model.backbone.visual.conv1
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        self._image = self._text = None
        if compile:
            # Freezing lets Inductor fold the weights as constants and, on CPU, pre-pack them for oneDNN.
            options = {"freezing": True}
            self._image = torch.compile(ImageTower(self.model), dynamic=False, options=options)
            self._text = torch.compile(TextTower(self.model), dynamic=False, options=options)
            self._image_tower = self._image._orig_mod

    @property
    def name(self) -> str:
        return "compile" if self.compiled else "torch"

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, h, w, E]`` unit embeddings (in ``dtype``)."""
        pixels = pixels.to(self.device, self.dtype)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self._image is None:
            return self.model.encode_image(pixels)
        self._image_tower.prime(tuple(pixels.shape[-2:]))
        torch._dynamo.maybe_mark_dynamic(pixels, 0)
        return self._image(pixels)

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, E]`` unit text embeddings (float32)."""
        tokens = tokens.to(self.device)
        if self._text is None:
            return self.model.encode_text(tokens).float()
        torch._dynamo.maybe_mark_dynamic(tokens, 0)
        return self._text(tokens).float()
