"""Names -> ``(model, encoder, head)``: the one place that constructs them (as ``build_sam`` does).

``Segmenter("ViT-B-16", "laion2b_s34b_b88k")`` calls :func:`build`; code that wants the parts
(export, benchmarks, a service holding one model for several heads) calls it directly::

    parts = build("ViT-B-16", "laion2b_s34b_b88k", method="naclip", encoder="onnxruntime")
    segmenter = Segmenter(parts.model, encoder=parts.encoder, head=parts.head)

Which method runs (:func:`pacl_fast.methods.resolve_method`): ``"pacl"`` when PACL weights are
given, else NACLIP, the best training-free method; ``clip="demo"`` is the CLIP and PACL weights
shipped in the package (trained on the synthetic world). What the built model carries for every door
to read: ``model.model_defaults`` (its :class:`~pacl_fast.defaults.ModelDefaults`: templates, logit
scale, input size, window, background threshold; resolved once, here) and ``model.display_name`` (what
users read: ``demo``, ``ViT-B-16@openai``, ``local-dir:<folder>``, ``ViT-B-16@<weights file name>``).
Which encoder and precision run:
``"auto"`` by default, the fastest this machine runs for the work announced (``expected_images``),
decided and explained by :func:`pacl_fast.encoders.choose`; ``Parts.choice`` says what and why.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pacl_fast.backbone import LOCAL_DIR_PREFIX, RandomWeightsWarning, config_digest, load_clip
from pacl_fast.choices import DEFAULT_VFM, VFM_METHODS
from pacl_fast.defaults import ModelDefaults, recorded_defaults, resolve_defaults
from pacl_fast.encoders import (
    AUTO,
    DEFAULT_DTYPES,
    ENCODERS,
    Choice,
    Encoder,
    EncoderUnavailableError,
    choose,
    make_encoder,
    resolve_dtype,
)
from pacl_fast.encoders.auto import CachedSizesEncoder
from pacl_fast.encoders.torch_encoder import DEFAULT_TEXT_DTYPE, resolve_text_dtype
from pacl_fast.head import Head
from pacl_fast.methods import TrainingFreeCLIP, resolve_method
from pacl_fast.model import PACL
from pacl_fast.proxyclip import ProxyCLIP
from pacl_fast.weights import PACLMetadata, pacl_from_tensors, read_pacl_weights

logger = logging.getLogger(__name__)

DEMO = "demo"
DEMO_ASSETS = Path(__file__).parent / "assets" / "demo"
DEMO_CLIP = DEMO_ASSETS / "clip"
DEMO_PACL = DEMO_ASSETS / "pacl.safetensors"


@dataclass
class Parts:
    """What :func:`build` makes: the model, the encoder that runs it, the head, the PACL metadata, and
    which encoder and precision were chosen and why (``str(parts.choice)``); the model's defaults and
    display name are ``model.model_defaults`` and ``model.display_name`` (:func:`build_model`)."""

    model: nn.Module
    encoder: Encoder
    head: Head
    metadata: PACLMetadata | None = None
    choice: Choice | None = None

    @property
    def defaults(self) -> ModelDefaults:
        return self.model.model_defaults


def display_name(clip: str | dict, clip_weights: str | os.PathLike | None) -> str:
    """What users read for a CLIP (the CLI's first line, ``/v1/info``, the page): ``demo``, ``ViT-B-16@openai``,
    ``local-dir:<folder name>``, ``ViT-B-16@<file name>`` for a local weights file, ``<name>@random``.
    The full identity (``ClipIdentity``: hashes) stays in ``/v1/info`` for operators and in run records."""
    if clip == DEMO:
        return DEMO
    if isinstance(clip, dict):
        name = f"custom-{config_digest(clip)}"
    elif clip.startswith(LOCAL_DIR_PREFIX):
        return f"{LOCAL_DIR_PREFIX}{Path(clip[len(LOCAL_DIR_PREFIX) :]).name}"
    else:
        name = clip
    if clip_weights is None:
        return f"{name}@random"
    weights = Path(clip_weights)
    return f"{name}@{weights.name if weights.is_file() else clip_weights}"


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
    vfm: str | None = None,
    vfm_weights: str | os.PathLike | None = None,
) -> tuple[nn.Module, PACLMetadata | None]:
    """The model of ``method`` on the named CLIP (see :func:`build`), and its PACL metadata if any.

    PACL weights (and the defaults they record) are read and checked before the CLIP is loaded, so a
    bad file fails in milliseconds rather than after the CLIP. The model carries its defaults
    (``model.model_defaults``, resolved here once, from the float32 weights), its display name
    (``model.display_name``) and its PACL metadata (``model.pacl_metadata``), so that whoever runs it
    (``Segmenter(model, ...)``) reads the same ones.
    """
    name = display_name(clip, clip_weights)
    clip, clip_weights, pacl_weights = resolve_demo(clip, clip_weights, pacl_weights, method)
    method = resolve_method(method, pacl_weights is not None)
    vfm = check_vfm(method, vfm, vfm_weights)
    checked = read_pacl_weights(pacl_weights) if pacl_weights is not None else None
    if checked is not None:
        recorded_defaults(checked[1], pacl_weights)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if vfm is not None:  # the VFM's file is read before the CLIP loads, as PACL weights are
        from pacl_fast.vfm import load_vfm

        foundation = load_vfm(vfm, vfm_weights, device=device)
        model, metadata = ProxyCLIP(load_clip(clip, clip_weights, device=device), foundation).to(device), None
    else:
        backbone = load_clip(clip, clip_weights, device=device)
        model, metadata = _model(backbone, method, checked, pacl_weights, device, strict_clip)
    model.model_defaults = resolve_defaults(model, metadata, pacl_weights)
    model.display_name = name
    model.pacl_metadata = metadata
    return model, metadata


def _model(
    backbone: nn.Module,
    method: str,
    checked: tuple[dict, PACLMetadata] | None,
    pacl_weights: str | os.PathLike | None,
    device: torch.device,
    strict_clip: bool,
) -> tuple[nn.Module, PACLMetadata | None]:
    if method != "pacl":
        return TrainingFreeCLIP(backbone, method).to(device), None
    if checked is None:
        warnings.warn(
            "method='pacl' without pacl_weights: the PACL embedder is untrained (CLIP's projection plus a silent "
            "MLP); segmentation will be poor. Pass trained PACL weights, or use a training-free method "
            "(method='naclip', the default without weights).",
            RandomWeightsWarning,
            stacklevel=4,
        )
        return PACL(backbone).to(device), None
    tensors, metadata = checked
    return pacl_from_tensors(backbone, tensors, metadata, pacl_weights, strict_clip=strict_clip), metadata


def check_vfm(method: str, vfm: str | None, vfm_weights: str | os.PathLike | None) -> str | None:
    """The VFM a (resolved) ``method`` runs with: ``vfm``, or :data:`~pacl_fast.choices.DEFAULT_VFM` for a VFM
    method; None for the others, which refuse a ``vfm`` or ``vfm_weights`` (ValueError saying so)."""
    if method in VFM_METHODS:
        from pacl_fast.choices import VFMS

        vfm = DEFAULT_VFM if vfm is None else vfm
        if vfm not in VFMS:
            raise ValueError(f"unknown vfm {vfm!r}: choose one of {', '.join(VFMS)}")
        return vfm
    given = [f"{name}={value!r}" for name, value in (("vfm", vfm), ("vfm_weights", vfm_weights)) if value is not None]
    if given:
        raise ValueError(
            f"{' and '.join(given)} given with method={method!r}: a vision foundation model is used only by "
            f"method={' or '.join(repr(m) for m in VFM_METHODS)}; drop it, or pass that method"
        )
    return None


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


def check_choices(encoder: str, dtype: str | torch.dtype | None) -> None:
    """ValueError for an encoder or dtype name that is neither known nor ``"auto"``, before anything loads."""
    if encoder != AUTO and encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS} or {AUTO!r}, got {encoder!r}")
    if dtype not in (AUTO, None):
        resolve_dtype(dtype)


def encoder_for(
    model: nn.Module,
    encoder: str = AUTO,
    dtype: str | torch.dtype | None = AUTO,
    *,
    expected_images: float | None = None,
    options: dict | None = None,
    owned: bool = False,
) -> tuple[Encoder, Choice]:
    """The encoder for ``model``, each ``"auto"`` decided by :func:`pacl_fast.encoders.choose`, and the choice.

    ``owned``: the caller built the model for this encoder alone, so a torch encoder gets it cast in
    place (no second copy). An encoder chosen automatically that cannot run here (its library finds no
    support on this CPU) gives way to eager torch, with a warning.
    """
    options = dict(options or {})
    choice = choose(model, encoder, dtype, expected_images=expected_images, options=options)
    try:
        return _make(model, choice, options, owned), choice
    except EncoderUnavailableError as error:
        if encoder != AUTO or choice.encoder == "torch":
            raise
        logger.warning("encoder='auto' chose %s, which cannot run here (%s): eager torch runs", choice.encoder, error)
        fallback = choose(model, "torch", dtype, options=options)
        reasons = (f"eager: {choice.encoder} unavailable", *fallback.reasons)
        fallback = Choice(fallback.encoder, fallback.dtype, fallback.precision, reasons)
        return _make(model, fallback, options, owned), fallback


def _make(model: nn.Module, choice: Choice, options: dict, owned: bool) -> Encoder:
    dtype = choice.dtype
    if owned and choice.encoder in ("torch", "compile"):  # the builder owns this model: cast it, keep one copy
        dtype = DEFAULT_DTYPES[choice.encoder] if dtype is None else dtype
        text_dtype = resolve_text_dtype(options.get("text_dtype", DEFAULT_TEXT_DTYPE), dtype)
        cast_model(model, dtype, text_dtype)
    made = make_encoder(choice.encoder, model, dtype, **options)
    if choice.only_sizes is None:
        return made
    # encoder="auto", OpenVINO models cached for some sizes and too few images to pay a build: the others eager.
    # (Options reaching here are OpenVINO's or shared: none is torch's alone, else choose took eager torch.)
    return CachedSizesEncoder(made, choice.only_sizes, lambda: make_encoder("torch", model, choice.eager_dtype))


def build(
    clip: str | dict = "ViT-B-16",
    clip_weights: str | os.PathLike | None = None,
    pacl_weights: str | os.PathLike | None = None,
    *,
    method: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = AUTO,
    encoder: str = AUTO,
    encoder_options: dict | None = None,
    backend: str = "fast",
    strict_clip: bool = True,
    expected_images: float | None = None,
    vfm: str | None = None,
    vfm_weights: str | os.PathLike | None = None,
) -> Parts:
    """Build the model, its encoder and the head from names.

    Args:
        clip: open_clip model name, ``"local-dir:PATH"``, an open_clip config dict, or ``"demo"``.
        clip_weights: pretrained tag, local checkpoint file, or None (random init, with a warning).
        pacl_weights: PACL safetensors file (only with ``method="pacl"``).
        method: ``"pacl" | "maskclip" | "sclip" | "clearclip" | "naclip" | "proxyclip"``; None: ``"pacl"``
            with PACL weights, else ``"naclip"``.
        device: default CUDA when available.
        dtype: encoder precision; ``"auto"`` (default): the fastest the device runs natively (bf16 on CPUs
            with AVX512-BF16 or AMX and on GPUs from Ampere, see :mod:`pacl_fast.encoders.auto`); None: the
            encoder's default. Torch encoders get the model built in that precision, so no second copy is made.
        encoder: ``"torch" | "compile" | "onnxruntime" | "tensorrt" | "openvino"`` (``pacl_fast.encoders``), or
            ``"auto"`` (default): eager torch, unless an OpenVINO model of these weights is cached or
            ``expected_images`` is enough to pay for building one (or a compiled graph).
        encoder_options: backend arguments (``cache_dir``, ``max_batch``, ``precision``...).
        backend: head backend (``pacl_fast.head.BACKENDS``).
        strict_clip: refuse PACL weights recorded for another CLIP.
        expected_images: how many images the caller will segment (the CLI: its inputs or the dataset's
            size; a service: ``math.inf``); None: unknown (a few). Only ``encoder="auto"`` reads it.
        vfm: ``method="proxyclip"`` only: its vision foundation model, ``"dino_vitb8"`` (default) or
            ``"dinov2_vitb14_reg"`` (:mod:`pacl_fast.vfm`).
        vfm_weights: the VFM's weights: the authors' hub checkpoint or timm's state dict as a local file,
            ``"timm"`` (timm downloads them), or None (random init, with a warning).
    """
    head = Head(backend)  # bad names fail before anything is loaded
    check_choices(encoder, dtype)
    model, metadata = build_model(
        clip, clip_weights, pacl_weights, method=method, device=device, strict_clip=strict_clip, vfm=vfm,
        vfm_weights=vfm_weights,
    )
    made, choice = encoder_for(
        model, encoder, dtype, expected_images=expected_images, options=encoder_options, owned=True
    )
    return Parts(model, made, head, metadata, choice)
