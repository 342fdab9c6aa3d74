"""Interchangeable image/text encoders (DESIGN §5).

Every encoder has the same two methods:

* ``encode_image(pixels)``: normalised pixels ``[B, 3, H, W]`` -> unit PACL patch embeddings
  ``[B, h, w, E]`` (backbone and embedder as one graph);
* ``encode_text(tokens)``: token ids ``[T, L]`` -> unit CLIP text embeddings ``[T, E]``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pacl_fast.encoders.torch_encoder import TorchEncoder


class Encoder(Protocol):
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


__all__ = ["Encoder", "TorchEncoder"]
