"""The PyTorch encoder: eager (the reference every other backend is held to) or ``torch.compile``."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pacl_fast.encoders.base import SHORT_NAMES, cast_copy, check_pixels, resolve_dtype
from pacl_fast.encoders.graph import GlobalTower, ImageTower, TextTower, model_device
from pacl_fast.model import VisionEmbedder

#: The text tower's precision unless ``text_dtype`` says otherwise (see :class:`TorchEncoder`).
DEFAULT_TEXT_DTYPE = torch.float32


def resolve_text_dtype(text_dtype: torch.dtype | str | None, dtype: torch.dtype) -> torch.dtype:
    """``text_dtype`` as a dtype; None means the image side's ``dtype``."""
    return dtype if text_dtype is None else resolve_dtype(text_dtype)


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
        text_dtype: the text tower's precision; None: ``dtype``. Default float32 whatever ``dtype``
            is: text runs once per vocabulary and its embeddings are cached on disk, so its speed
            matters little (ADE20K x 80 templates, ViT-B-16, 2 CPU cores: ~100 s fp32, ~50 s bf16,
            once), while every image is compared with them, and fp32 keeps them exact (bf16: cosine
            ~0.9999 per prompt). When it differs from the model's, only the text tower is copied.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype = torch.float32,
        *,
        compile: bool = False,
        channels_last: bool = False,
        text_dtype: torch.dtype | str | None = DEFAULT_TEXT_DTYPE,
    ):
        if dtype not in SHORT_NAMES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        text_dtype = resolve_text_dtype(text_dtype, dtype)
        device = model_device(model)
        if device.type == "cuda" and text_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError(f"text_dtype=bfloat16 needs a GPU with bfloat16 support; {device} has none")
        self.model = cast_copy(model, dtype).eval()
        self.dtype = dtype
        self.device = model_device(self.model)
        self.compiled = compile
        self.channels_last = channels_last
        self.patch_size = self.model.backbone.patch_size
        self.pixel_multiple, self.grid_patch = self.model.pixel_multiple, self.model.grid_patch
        if channels_last:
            conv = self.model.backbone.visual.conv1
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        self.text_dtype = text_dtype
        # The text model: the given one or the cast copy when its text tower is in text_dtype, else a
        # view of the cast copy whose text tower alone is copied in text_dtype.
        source = model if model.backbone.text_dtype == text_dtype else self.model
        self._text_model = _with_text_dtype(source, text_dtype)  # the backbone is always in eval mode
        self._image_tower = ImageTower(self.model)
        self._image, self._global = self._image_tower, GlobalTower(self.model)
        self._text = TextTower(self._text_model)
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
        check_pixels(pixels, self.pixel_multiple, self.grid_patch)
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

    @property
    def embedder(self) -> nn.Module | None:
        """PACL's embedder, for the fused head (``base.FusedEmbedderEncoder``): eager PACL models only; a
        compiled graph already fuses it, and training-free methods have none."""
        embedder = getattr(self.model, "embedder", None)
        return embedder if not self.compiled and isinstance(embedder, VisionEmbedder) else None

    @torch.inference_mode()
    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> the CLIP's patch tokens ``[B, h, w, D]`` (in ``dtype``), eagerly: the fused
        PACL head (``Head.embed_similarity``) then applies :attr:`embedder`, normalisation and similarity."""
        check_pixels(pixels, self.patch_size)
        return self.model.backbone.patch_tokens(pixels.to(self.device, self.dtype))

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, E]`` unit text embeddings (float32), computed in ``text_dtype``.

        Each prompt runs only up to its end-of-text token where the tower allows it (exact, see
        ``ClipBackbone.encode_text``): eagerly inside the backbone; compiled, by running the graph
        on the prompts grouped by that length (both axes dynamic).
        """
        tokens = tokens.to(self.device)
        if self.compiled:

            def run(group: torch.Tensor) -> torch.Tensor:
                torch._dynamo.maybe_mark_dynamic(group, 0)
                torch._dynamo.maybe_mark_dynamic(group, 1)
                return self._text(group)

            return self._text_model.backbone.encode_text_by_length(tokens, run).float()
        return self._text_model.encode_text(tokens).float()

    @torch.inference_mode()
    def encode_global(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` (native size) -> ``[B, E]`` CLIP's unit image embeddings (float32)."""
        pixels = pixels.to(self.device, self.dtype)
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(pixels, 0)
            return self._global(pixels).float()
        return self.model.encode_global(pixels).float()


def _with_text_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model``, or a view of it whose backbone's text tower is a copy in ``dtype`` (the rest shared)."""
    backbone = model.backbone.with_text_dtype(dtype)
    if backbone is model.backbone:
        return model
    view = copy.copy(model)
    view._modules = {**model._modules, "backbone": backbone}
    return view
