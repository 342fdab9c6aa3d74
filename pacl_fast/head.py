"""The one door into ``kernels/``: patch similarity, then upsample + argmax, per backend.

``backend="reference"`` runs ``kernels/reference.py``: plain PyTorch that materialises
``[B, C, H, W]``. Faster backends are held to it by tests.
"""

from __future__ import annotations

import torch

from kernels import reference

BACKENDS = ("reference",)


class Head:
    """Turns unit patch embeddings and class embeddings into labels and scores."""

    def __init__(self, backend: str = "reference"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def similarity(self, patch_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, h, w, E] x [C, E] -> [B, h, w, C]`` cosine logits (float32)."""
        return reference.patch_logits(patch_embeddings, class_embeddings)

    def segment(
        self,
        logits: torch.Tensor,
        out_size: tuple[int, int],
        *,
        grid_extent: tuple[float, float] | None = None,
        logit_scale: float = 100.0,
        background_threshold: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, h, w, C]`` -> labels ``[B, H, W]`` int16 and scores ``[B, H, W]`` float32.

        See :func:`kernels.reference.segment_reference` for the exact semantics.
        """
        return reference.segment_reference(
            logits,
            out_size,
            grid_extent=grid_extent,
            logit_scale=logit_scale,
            background_threshold=background_threshold,
        )
