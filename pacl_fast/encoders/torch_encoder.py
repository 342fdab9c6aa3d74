"""The eager PyTorch encoder: the reference every other encoder backend is held to."""

from __future__ import annotations

import torch

from pacl_fast.model import PACL


class TorchEncoder:
    """Runs a :class:`PACL` eagerly in ``dtype`` (fp32, bf16 or fp16) under inference mode."""

    def __init__(self, model: PACL, dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.model = model.eval()
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.model.to(dtype)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, h, w, E]`` unit embeddings (in ``dtype``)."""
        return self.model.encode_image(pixels.to(self.device, self.dtype))

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, E]`` unit text embeddings (float32)."""
        return self.model.encode_text(tokens.to(self.device)).float()
