"""Names -> ``(model, encoder, head)``: the one place that constructs them (as ``build_sam`` does).

``Segmenter("ViT-B-16", "laion2b_s34b_b88k")`` calls :func:`build`; code that wants the parts
(export, benchmarks, a service holding one model for several heads) calls it directly::

    parts = build("ViT-B-16", "laion2b_s34b_b88k", method="naclip", encoder="onnxruntime")
    segmenter = Segmenter(parts.model, encoder=parts.encoder, head=parts.head)

Which method runs (:func:`pacl_fast.methods.resolve_method`): ``"pacl"`` when PACL weights are
given, else NACLIP, the best training-free method; ``clip="demo"`` is the CLIP and PACL weights
shipped in the package (trained on the synthetic world).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pacl_fast.backbone import LOCAL_DIR_PREFIX, RandomWeightsWarning, load_clip
from pacl_fast.encoders import DEFAULT_DTYPES, ENCODERS, Encoder, make_encoder, resolve_dtype
from pacl_fast.encoders.torch_encoder import DEFAULT_TEXT_DTYPE, resolve_text_dtype
from pacl_fast.head import Head
from pacl_fast.methods import TrainingFreeCLIP, resolve_method
from pacl_fast.model import PACL
from pacl_fast.weights import PACLMetadata, pacl_from_tensors, read_pacl_weights

logger = logging.getLogger(__name__)

DEMO = "demo"
DEMO_ASSETS = Path(__file__).parent / "assets" / "demo"
DEMO_CLIP = DEMO_ASSETS / "clip"
DEMO_PACL = DEMO_ASSETS / "pacl.safetensors"


@dataclass
class Parts:
    """What :func:`build` makes: the model, the encoder that runs it, the head, and the PACL metadata."""

    model: nn.Module
    encoder: Encoder
    head: Head
    metadata: PACLMetadata | None = None


def resolve_demo(
    clip: str | dict, clip_weights: str | os.PathLike | None, pacl_weights: str | os.PathLike | None, method: str | None
) -> tuple[str | dict, str | os.PathLike | None, str | os.PathLike | None]:
    """``clip="demo"`` -> the shipped synthetic-world CLIP, with its PACL weights unless another method is asked."""
    if clip != DEMO:
        return clip, clip_weights, pacl_weights
    if clip_weights is not None:
        raise ValueError("clip='demo' carries its own CLIP weights: leave clip_weights out")
    if not (DEMO_CLIP / "open_clip_config.json").is_file() or not DEMO_PACL.is_file():
        raise FileNotFoundError(
            f"demo weights are missing from {DEMO_ASSETS}: reinstall pacl-fast or run train/make_demo_weights.sh"
        )
    if pacl_weights is None and method in (None, "pacl"):
        pacl_weights = DEMO_PACL
    return f"{LOCAL_DIR_PREFIX}{DEMO_CLIP}", None, pacl_weights


def build_model(
    clip: str | dict = "ViT-B-16",
    clip_weights: str | os.PathLike | None = None,
    pacl_weights: str | os.PathLike | None = None,
    *,
    method: str | None = None,
    device: str | torch.device | None = None,
    strict_clip: bool = True,
) -> tuple[nn.Module, PACLMetadata | None]:
    """The model of ``method`` on the named CLIP (see :func:`build`), and its PACL metadata if any.

    PACL weights are read and checked before the CLIP is loaded, so a bad file fails in
    milliseconds rather than after the CLIP.
    """
    clip, clip_weights, pacl_weights = resolve_demo(clip, clip_weights, pacl_weights, method)
    method = resolve_method(method, pacl_weights is not None)
    checked = read_pacl_weights(pacl_weights) if pacl_weights is not None else None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = load_clip(clip, clip_weights, device=device)
    if method != "pacl":
        return TrainingFreeCLIP(backbone, method).to(device), None
    if checked is None:
        warnings.warn(
            "method='pacl' without pacl_weights: the PACL embedder is untrained (CLIP's projection plus a silent "
            "MLP); segmentation will be poor. Pass trained PACL weights, or use a training-free method "
            "(method='naclip', the default without weights).",
            RandomWeightsWarning,
            stacklevel=3,
        )
        return PACL(backbone).to(device), None
    tensors, metadata = checked
    return pacl_from_tensors(backbone, tensors, metadata, pacl_weights, strict_clip=strict_clip), metadata


def cast_model(model: nn.Module, dtype: torch.dtype, text_dtype: torch.dtype) -> nn.Module:
    """``model`` cast in place: everything in ``dtype`` but the CLIP's text tower, in ``text_dtype``.

    The text tower is cast from the loaded weights, never through ``dtype``: fp32 text from
    bf16-rounded weights would give embeddings that differ from the same weights' fp32 ones, which
    the text cache (keyed by the weights and the text precision) holds for both.
    """
    text = {id(tensor) for tensor in model.backbone.text_tensors()}

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        return tensor.to(text_dtype if id(tensor) in text else dtype)

    return model._apply(cast)  # what Module.to does, per tensor; the modules' _apply hooks drop their caches


def build(
    clip: str | dict = "ViT-B-16",
    clip_weights: str | os.PathLike | None = None,
    pacl_weights: str | os.PathLike | None = None,
    *,
    method: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    encoder: str = "torch",
    encoder_options: dict | None = None,
    backend: str = "fast",
    strict_clip: bool = True,
) -> Parts:
    """Build the model, its encoder and the head from names.

    Args:
        clip: open_clip model name, ``"local-dir:PATH"``, an open_clip config dict, or ``"demo"``.
        clip_weights: pretrained tag, local checkpoint file, or None (random init, with a warning).
        pacl_weights: PACL safetensors file (only with ``method="pacl"``).
        method: ``"pacl" | "maskclip" | "sclip" | "clearclip" | "naclip"``; None: ``"pacl"`` with
            PACL weights, else ``"naclip"``.
        device: default CUDA when available.
        dtype: encoder precision (None: the encoder's default); torch encoders get the model built
            in that precision, so no second copy is made.
        encoder: ``"torch" | "compile" | "onnxruntime" | "tensorrt" | "openvino"`` (``pacl_fast.encoders``).
        encoder_options: backend arguments (``cache_dir``, ``max_batch``, ``precision``...).
        backend: head backend (``pacl_fast.head.BACKENDS``).
        strict_clip: refuse PACL weights recorded for another CLIP.
    """
    head = Head(backend)  # bad names fail before anything is loaded
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    torch_encoder = encoder in ("torch", "compile")
    if torch_encoder:
        dtype = DEFAULT_DTYPES[encoder] if dtype is None else resolve_dtype(dtype)
    model, metadata = build_model(
        clip, clip_weights, pacl_weights, method=method, device=device, strict_clip=strict_clip
    )
    if torch_encoder:  # the builder owns this model: cast it rather than keep two copies
        text_dtype = resolve_text_dtype((encoder_options or {}).get("text_dtype", DEFAULT_TEXT_DTYPE), dtype)
        model = cast_model(model, dtype, text_dtype)
    return Parts(model, make_encoder(encoder, model, dtype, **(encoder_options or {})), head, metadata)
