"""What every encoder backend shares: the protocol and its optional capabilities, the error for a missing
backend, dtypes and checks.

An encoder runs a segmentation model's towers (``pacl_fast.methods``: PACL or a training-free
method) and never changes the model it is given: a backend that needs another precision than
the model's works on a cast copy (:func:`cast_copy`).

What the segmenter may do with an encoder beyond :class:`Encoder` is declared here as a capability,
never inferred from the encoder's name or its private parts: :class:`FusedEmbedderEncoder` (the
fused PACL head), :func:`precision_name` (what the encoder really computes in, int8 included).
"""

from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import torch
from torch import nn

#: Precision names users and the CLI give, to torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
#: Short names, for cache keys and file names.
SHORT_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class EncoderUnavailableError(RuntimeError):
    """An encoder backend cannot run here: its library or device is missing. The message says what to install."""


class Encoder(Protocol):
    """``encode_image``: normalised pixels ``[B, 3, H, W]`` -> unit patch embeddings ``[B, h, w, E]``;
    ``encode_text``: token ids ``[T, L]`` -> unit text embeddings ``[T, E]`` (float32);
    ``encode_global``: pixels at the CLIP's native size -> CLIP's own unit image embeddings ``[B, E]``."""

    name: str
    dtype: torch.dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def encode_global(self, pixels: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class FusedEmbedderEncoder(Protocol):
    """Capability: an encoder that can stop at the CLIP's patch tokens and hand over PACL's embedder, so
    that the head applies the embedder, the L2 norm and the similarity in one fused kernel
    (``Head.embed_similarity``). ``embedder`` is None where the encoder cannot: a model without a PACL
    embedder, or a graph that already fuses it (compiled, exported)."""

    @property
    def embedder(self) -> nn.Module | None: ...

    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor: ...


def fused_embedder(encoder: object) -> nn.Module | None:
    """The PACL embedder ``encoder`` offers to the fused head (:class:`FusedEmbedderEncoder`), or None."""
    return encoder.embedder if isinstance(encoder, FusedEmbedderEncoder) else None


def precision_name(encoder: object) -> str:
    """What the encoder computes in: its ``precision`` when it declares one (OpenVINO's int8 and bf16 return
    float32 tensors), else its dtype's short name (``fp32``, ``bf16``, ``fp16``)."""
    precision = getattr(encoder, "precision", None)
    return precision if isinstance(precision, str) else dtype_name(encoder.dtype)


def as_size(size: tuple[int, int] | torch.Size) -> tuple[int, int]:
    """``(H, W)`` as plain ints (a cache key and a file name part)."""
    return int(size[0]), int(size[1])


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a dtype or one of the names in :data:`DTYPES`; ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in SHORT_NAMES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``fp16`` / ``bf16``."""
    return SHORT_NAMES[dtype]


def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype``: the model itself when it already is, else a cast deep copy (never in place)."""
    if model.backbone.visual.conv1.weight.dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def check_pixels(pixels: torch.Tensor, patch_size: int, grid_patch: int | None = None) -> tuple[int, int]:
    """``[B, 3, H, W]`` with sides multiples of ``patch_size`` (the model's ``pixel_multiple``: its CLIP's patch
    size, for ProxyCLIP the lcm of both towers'); returns the output grid ``(H/q, W/q)``, ``q`` = ``grid_patch``
    (the model's; default ``patch_size``)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
    height, width = pixels.shape[-2:]
    grid_patch = patch_size if grid_patch is None else grid_patch
    if height % patch_size or width % patch_size:
        what = "patch size" if grid_patch == patch_size else "pixel multiple"
        raise ValueError(f"image sides must be multiples of the {what} {patch_size}, got {height}x{width}")
    return height // grid_patch, width // grid_patch


def check_out(
    out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``out`` if it fits ``shape``/``dtype``/``device`` and is contiguous, a new tensor if None; else ValueError."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {shape} {dtype} tensor on {device}, got {tuple(out.shape)} {out.dtype} "
            f"on {out.device}{'' if out.is_contiguous() else ' (not contiguous)'}"
        )
    return out
