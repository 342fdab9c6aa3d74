"""The one door into ``kernels/``: patch similarity, then upsample + argmax, per backend.

* ``"reference"``: ``kernels/reference.py``, plain PyTorch that materialises ``[B, C, H, W]``.
* ``"fast"`` (default): the Triton kernels on CUDA tensors, the tiled path elsewhere.
* ``"tiled"``: ``kernels/tiled.py`` on any device (bands of rows, pruned classes). On CPU tensors it
  runs the native kernel where one is built (``kernels/native.py``: compiled once per machine with the
  system's C compiler, ``$PACL_FAST_NATIVE`` = ``auto`` | ``on`` | ``off``), else eager torch.
* ``"triton"``: the Triton kernels on any tensors; CPU tensors run in the Triton interpreter,
  which needs ``TRITON_INTERPRET=1`` before triton is first imported (tests do this).

The fast backends are held to the reference by ``tests/test_head_kernels.py``.
"""

from __future__ import annotations

import os

import torch

from kernels import native, reference
from kernels.reference import BACKGROUND
from pacl_fast.choices import HEAD_BACKENDS as BACKENDS

#: The fused PACL embedder kernel's two variants (kernels/patch_similarity.py): one Triton kernel, or
#: cuBLAS GEMMs + a Triton epilogue. Which is faster is for benchmarks/gpu_check.sh to measure on a
#: GPU; until then both stay, behind this one switch (env PACL_FAST_EMBEDDER_VARIANT).
EMBEDDER_VARIANTS = ("fused", "cublas")

__all__ = ["BACKENDS", "BACKGROUND", "EMBEDDER_VARIANTS", "Head"]


class Head:
    """Turns unit patch embeddings and class embeddings into labels and scores.

    Args:
        backend: see the module docstring.
        embedder_variant: ``"fused"`` or ``"cublas"`` for :meth:`embed_similarity` on Triton (default
            ``$PACL_FAST_EMBEDDER_VARIANT`` or ``"fused"``).
    """

    def __init__(self, backend: str = "fast", embedder_variant: str | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        embedder_variant = embedder_variant or os.environ.get("PACL_FAST_EMBEDDER_VARIANT", "fused")
        if embedder_variant not in EMBEDDER_VARIANTS:
            raise ValueError(f"embedder_variant must be one of {EMBEDDER_VARIANTS}, got {embedder_variant!r}")
        self.backend = backend
        self.embedder_variant = embedder_variant
        if backend in ("fast", "tiled"):
            native.prepare()  # the CPU kernel loads (or compiles, once per machine) while the model loads

    def path(self, device: torch.device) -> str:
        """Which code computes :meth:`segment` for tensors on ``device``, and why (one line)."""
        if self.backend == "reference":
            return "reference (plain PyTorch)"
        if self.uses_triton(device):
            return "triton"
        if torch.device(device).type == "cpu":
            return f"tiled: {native.status()}"
        return "tiled: eager torch"

    def uses_triton(self, device: torch.device) -> bool:
        """Whether this head runs the Triton kernels for tensors on ``device``."""
        return self.backend == "triton" or (self.backend == "fast" and device.type == "cuda")

    def similarity(self, patch_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, h, w, E] x [C, E] -> [B, h, w, C]`` cosine logits (float32)."""
        if self.uses_triton(patch_embeddings.device):
            from kernels.patch_similarity import cosine_similarity

            return cosine_similarity(patch_embeddings, class_embeddings)
        # On the CPU, normalise + one GEMM is already what torch does best.
        return reference.patch_logits(patch_embeddings, class_embeddings)

    def embed_similarity(
        self, tokens: torch.Tensor, embedder: torch.nn.Module, class_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """CLIP patch tokens ``[..., D]`` through PACL's ``VisionEmbedder`` -> cosine logits ``[..., C]``.

        One fused kernel on the Triton backends (``kernels.patch_similarity``); torch elsewhere.
        """
        if self.uses_triton(tokens.device):
            from kernels.patch_similarity import EmbedderWeights, patch_similarity

            weights = EmbedderWeights.from_module(embedder)
            return patch_similarity(tokens, weights, class_embeddings, variant=self.embedder_variant)
        return reference.embedder_logits(
            tokens,
            embedder.linear.weight,
            embedder.fc1.weight,
            embedder.fc1.bias,
            embedder.fc2.weight,
            embedder.fc2.bias,
            class_embeddings,
        )

    def upsample(
        self, logits: torch.Tensor, out_size: tuple[int, int], grid_extent: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """Logits ``[B, h, w, C]`` -> ``[B, C, H, W]`` float32 at the original size (bilinear, the head's
        sampling): the dense form refinements need. Materialises what :meth:`segment` never does."""
        return reference.upsample_logits(logits, out_size, grid_extent)

    def segment(
        self,
        logits: torch.Tensor,
        out_size: tuple[int, int],
        *,
        grid_extent: tuple[float, float] | None = None,
        logit_scale: float = 100.0,
        background_threshold: float | None = None,
        with_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, h, w, C]`` -> labels ``[B, H, W]`` int16 and scores ``[B, H, W]`` float32.

        See :func:`kernels.reference.segment_reference` for the exact semantics; the fast
        backends match it (labels wherever the top-2 margin exceeds 1e-6, scores to 1e-6 of the
        reference's float64 probabilities). ``background_threshold`` is a probability in [0, 1]: a
        pixel is background (label -1) when its score is strictly below it, so a score equal to the
        threshold keeps its class (0 keeps every pixel; 1 keeps only scores of exactly 1.0).
        ``with_scores=False`` returns ``(labels, None)``: the fast backends then skip every class
        that cannot win, which is most of the work when many classes are close (the softmax
        score needs all classes within ~exp(-20) of the winner's weight, the argmax does not).
        """
        if background_threshold is not None and not 0.0 <= background_threshold <= 1.0:
            raise ValueError(
                f"background_threshold must be a probability in [0, 1] (or None), got {background_threshold!r}"
            )
        if self.backend == "reference":
            segment = reference.segment_reference
        elif self.uses_triton(logits.device):
            from kernels.upsample_argmax import segment_triton as segment
        else:
            from kernels.tiled import segment_tiled as segment
        return segment(
            logits,
            out_size,
            grid_extent=grid_extent,
            logit_scale=logit_scale,
            background_threshold=background_threshold,
            with_scores=with_scores,
        )
