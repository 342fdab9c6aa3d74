"""``Segmenter``: images + class names -> per-pixel labels, the way users ask for it."""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch

from pacl_fast.backbone import RandomWeightsWarning, load_clip
from pacl_fast.encoders import make_encoder
from pacl_fast.head import Head
from pacl_fast.images import (
    DEFAULT_MAX_PIXELS,
    Geometry,
    ImageInput,
    SlidingWindow,
    describe,
    fit_to_model,
    load_image,
    plan_resize,
    to_uint8_hwc,
)
from pacl_fast.model import PACL
from pacl_fast.prompts import TextEmbeddingCache, ensemble_text_embeddings, resolve_templates, validate_labels
from pacl_fast.results import BatchError, ImageError, Segmentation
from pacl_fast.weights import PACLMetadata, load_pacl

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


class Segmenter:
    """Open-vocabulary semantic segmentation with PACL.

    Example::

        segmenter = Segmenter("ViT-B-16", "laion2b_s34b_b88k", pacl_weights="pacl.safetensors")
        result = segmenter.predict("street.jpg", ["road", "car", "tree", "sky"])
        result.labels      # [H, W] int16 indices into result.classes (-1: background)
        result.scores      # [H, W] float32 winner probabilities
        result.overlay()   # PIL image
        result.save("out/")

    Args:
        clip: open_clip model name (``"ViT-B-16"``), ``"local-dir:PATH"``, or a model config dict.
        clip_weights: pretrained tag (fetched by open_clip), local checkpoint file, or None (random
            init, with a warning; for tests and benchmarks).
        pacl_weights: PACL safetensors file (see ``pacl_fast.weights``), or None for an untrained
            embedder (with a warning).
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available.
        dtype: encoder precision: ``torch.float32`` / ``bfloat16`` / ``float16`` (or their names);
            None: the encoder's default (float16 for tensorrt, else float32).
        image_size: short side the model sees; default the CLIP's native size (224 for ViT-B-16).
        backend: head backend (``pacl_fast.head``): ``"fast"`` (Triton on CUDA, tiled PyTorch on
            CPU), ``"reference"`` (plain PyTorch), ``"tiled"`` or ``"triton"``.
        encoder: ``"torch"`` (eager), ``"compile"`` (torch.compile), ``"onnxruntime"`` or
            ``"tensorrt"`` (see :mod:`pacl_fast.encoders`). A missing library or device raises
            :class:`~pacl_fast.encoders.EncoderUnavailableError` naming what to install.
        encoder_options: backend arguments, e.g. ``{"cache_dir": ..., "max_batch": 32}``.
        strict_clip: refuse PACL weights recorded for another CLIP (default True).
        max_pixels: refuse decoded images larger than this.
        batch_size: images per encoder call.
    """

    def __init__(
        self,
        clip: str | dict = "ViT-B-16",
        clip_weights: str | os.PathLike | None = None,
        pacl_weights: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        image_size: int | None = None,
        backend: str = "fast",
        encoder: str = "torch",
        encoder_options: dict | None = None,
        strict_clip: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        batch_size: int = 8,
    ):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        backbone = load_clip(clip, clip_weights, device=device)
        self.metadata: PACLMetadata | None = None
        if pacl_weights is None:
            warnings.warn(
                "pacl_weights=None: the PACL embedder is untrained (CLIP's projection plus a silent MLP); "
                "segmentation will be poor. Pass trained PACL weights.",
                RandomWeightsWarning,
                stacklevel=2,
            )
            model = PACL(backbone)
        else:
            model, self.metadata = load_pacl(backbone, pacl_weights, strict_clip=strict_clip)
        self.model = model.to(device)
        self.device = device
        self.encoder = make_encoder(
            encoder, self.model, None if dtype is None else resolve_dtype(dtype), **(encoder_options or {})
        )
        self.dtype = self.encoder.dtype
        self.head = Head(backend)
        self.image_size = image_size or backbone.image_size
        self.patch_size = backbone.patch_size
        self.mean, self.std = backbone.mean_std
        self.max_pixels = max_pixels
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.text_cache = TextEmbeddingCache()

    @property
    def model_id(self) -> str:
        """Identifies CLIP + PACL weights (keys the text-embedding cache)."""
        pacl = f"{self.metadata.date}/{self.metadata.steps}" if self.metadata else "untrained"
        return f"{self.model.backbone.identity}|{pacl}|{self.dtype}"

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach())

    def encode_labels(self, labels: Sequence[str], templates: str | Sequence[str] = "imagenet") -> torch.Tensor:
        """Class names -> unit text embeddings ``[C, E]`` (template ensemble, cached)."""
        labels = validate_labels(labels)
        templates = resolve_templates(templates)
        backbone = self.model.backbone

        def compute() -> torch.Tensor:
            return ensemble_text_embeddings(
                lambda prompts: self.encoder.encode_text(backbone.tokenize(prompts)), labels, templates
            )

        return self.text_cache.get_or_compute(self.model_id, labels, templates, compute)

    def predict_torch(
        self,
        pixels: torch.Tensor,
        class_embeddings: torch.Tensor,
        out_size: tuple[int, int],
        *,
        grid_extent: tuple[float, float] | None = None,
        background_threshold: float | None = None,
        with_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batched tensor-level entry: no decoding, no per-image Python.

        Args:
            pixels: normalised model inputs ``[B, 3, h*p, w*p]`` (see ``images.fit_to_model``).
            class_embeddings: unit ``[C, E]`` (from :meth:`encode_labels`).
            out_size: ``(H, W)`` of the outputs (all images alike).
            grid_extent: grid cells the original covers (see ``images.Geometry``); None: all.
            with_scores: False skips the winner scores (labels only, faster; scores None).
        Returns:
            labels ``[B, H, W]`` int16 and scores ``[B, H, W]`` float32, on the model's device.
        """
        logits = self.head.similarity(self.encoder.encode_image(pixels), class_embeddings.to(self.device))
        return self.head.segment(
            logits,
            out_size,
            grid_extent=grid_extent,
            logit_scale=self.logit_scale,
            background_threshold=background_threshold,
            with_scores=with_scores,
        )

    def _window_logits(
        self, image: torch.Tensor, sliding_window: SlidingWindow, class_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, Geometry]:
        """Grid logits ``[1, h, w, C]`` averaged over overlapping windows."""
        short_side = sliding_window.short_side or self.image_size
        geometry = plan_resize(tuple(image.shape[-2:]), short_side, self.patch_size)
        canvas = fit_to_model(image, geometry, self.mean, self.std).to(self.device)  # [3, ch, cw]
        grid_h, grid_w = geometry.grid_size
        total = torch.zeros(1, grid_h, grid_w, class_embeddings.shape[0], device=self.device)
        count = torch.zeros(1, grid_h, grid_w, 1, device=self.device)
        windows = sliding_window.origins(geometry.canvas_size, self.patch_size)
        p = self.patch_size
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start : start + self.batch_size]
            crops = torch.stack([canvas[:, y : y + h, x : x + w] for y, x, h, w in batch])
            logits = self.head.similarity(self.encoder.encode_image(crops), class_embeddings)  # [n, h', w', C]
            for (y, x, h, w), window_logits in zip(batch, logits):
                total[0, y // p : (y + h) // p, x // p : (x + w) // p] += window_logits
                count[0, y // p : (y + h) // p, x // p : (x + w) // p] += 1
        return total / count, geometry

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        *,
        templates: str | Sequence[str] = "imagenet",
        background_threshold: float | None = None,
        sliding_window: SlidingWindow | None = None,
        errors: Literal["raise", "return"] = "raise",
        keep_images: bool = True,
    ) -> Segmentation | list[Segmentation | ImageError]:
        """Segment images into the given classes.

        Args:
            images: one image or a list. An image is a path, a PIL image, an ``HWC uint8`` array
                or a ``CHW float`` tensor in 0..1.
            labels: class names (non-empty, no duplicates).
            templates: prompt templates: ``"imagenet"`` (CLIP's 80), ``"short"`` (7),
                ``"single"``, or a list of strings with one ``{}``.
            background_threshold: pixels whose winning probability is below it get label -1.
            sliding_window: a :class:`~pacl_fast.images.SlidingWindow` for large images; None
                resizes the short side to ``image_size``.
            errors: what happens when some images fail (missing file, undecodable, too large...):
                ``"raise"`` (default) finishes every other image, then raises :class:`BatchError`
                whose ``.results`` holds all results, failures as :class:`ImageError`;
                ``"return"`` returns that list without raising.
            keep_images: keep the decoded image on each result for ``overlay()``.
        Returns:
            A :class:`Segmentation` for a single image; for a list, a list in input order.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if background_threshold is not None and not 0.0 <= background_threshold <= 1.0:
            raise ValueError(f"background_threshold must be in [0, 1], got {background_threshold}")
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items:
            raise ValueError("images is empty")
        class_names = validate_labels(labels)
        class_embeddings = self.encode_labels(class_names, templates)
        results: list[Segmentation | ImageError | None] = [None] * len(items)

        decoded: dict[int, torch.Tensor] = {}
        for index, item in enumerate(items):
            try:
                decoded[index] = load_image(item, max_pixels=self.max_pixels)
            except (FileNotFoundError, ValueError, TypeError) as error:
                results[index] = ImageError(index, describe(item), error)

        def finish(index: int, labels_map: torch.Tensor, scores: torch.Tensor) -> None:
            image = decoded.pop(index)
            results[index] = Segmentation(
                labels=labels_map.cpu().numpy(),
                scores=scores.cpu().numpy(),
                classes=class_names,
                source=describe(items[index]),
                image=to_uint8_hwc(image) if keep_images else None,
            )

        if sliding_window is not None:
            for index in list(decoded):
                try:
                    logits, geometry = self._window_logits(decoded[index], sliding_window, class_embeddings)
                    labels_map, scores = self.head.segment(
                        logits,
                        geometry.original_size,
                        grid_extent=geometry.grid_extent,
                        logit_scale=self.logit_scale,
                        background_threshold=background_threshold,
                    )
                    finish(index, labels_map[0], scores[0])
                except (ValueError, RuntimeError) as error:
                    results[index] = ImageError(index, describe(items[index]), error)
        else:
            # Images whose canvases match share encoder batches; the head then runs per image
            # because each maps back to its own original size.
            groups: dict[tuple[int, int], list[tuple[int, Geometry]]] = defaultdict(list)
            for index, image in decoded.items():
                geometry = plan_resize(tuple(image.shape[-2:]), self.image_size, self.patch_size)
                groups[geometry.canvas_size].append((index, geometry))
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    try:
                        pixels = torch.stack([fit_to_model(decoded[i], g, self.mean, self.std) for i, g in batch])
                        logits = self.head.similarity(self.encoder.encode_image(pixels), class_embeddings)
                    except (ValueError, RuntimeError) as error:
                        for index, _ in batch:
                            results[index] = ImageError(index, describe(items[index]), error)
                        continue
                    for (index, geometry), image_logits in zip(batch, logits):
                        labels_map, scores = self.head.segment(
                            image_logits[None],
                            geometry.original_size,
                            grid_extent=geometry.grid_extent,
                            logit_scale=self.logit_scale,
                            background_threshold=background_threshold,
                        )
                        finish(index, labels_map[0], scores[0])

        if errors == "raise" and any(isinstance(r, ImageError) for r in results):
            raise BatchError(results)
        return results[0] if single else results

    def __repr__(self) -> str:
        return (
            f"Segmenter(clip={self.model.backbone.identity}, pacl={'trained' if self.metadata else 'untrained'}, "
            f"device={self.device}, encoder={self.encoder.name}, dtype={self.dtype}, image_size={self.image_size}, "
            f"backend={self.head.backend})"
        )
