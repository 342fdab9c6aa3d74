"""``Segmenter``: images + class names -> per-pixel labels, the way users ask for it.

Where a pixel's label is decided, in one hop from :meth:`Segmenter.predict`: ``predict`` decodes
and prepares each image (``images.SegmentationPreprocess``), :meth:`Segmenter.segment_prepared`
batches images of one canvas size, and :meth:`Segmenter.predict_torch` runs the encoder (patch
embeddings), :meth:`Segmenter.patch_logits` (cosine with the class embeddings, in the head) and
``Head.segment`` (bilinear upsampling to the original pixels, argmax, winner score).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from pacl_fast.build import build, encoder_for
from pacl_fast.defaults import ModelDefaults, resolve_defaults
from pacl_fast.encoders import AUTO, Encoder
from pacl_fast.encoders.base import fused_embedder, precision_name
from pacl_fast.head import Head
from pacl_fast.images import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    Prepared,
    SegmentationPreprocess,
    SlidingWindow,
    describe,
    to_uint8_hwc,
)
from pacl_fast.prompts import TextEmbedder
from pacl_fast.results import BatchError, ImageError, Segmentation, image_name
from pacl_fast.weights import PACLMetadata

#: What one image's segmentation is at the tensor level: labels [H, W] int16, scores [H, W] float32 or None.
Masks = tuple[torch.Tensor, torch.Tensor | None]


class Asked(NamedTuple):
    """A request's options with the model's defaults filled in (:meth:`Segmenter.resolve`)."""

    templates: str | tuple[str, ...]
    background_threshold: float | None
    sliding_window: SlidingWindow | None


class Segmenter:
    """Open-vocabulary semantic segmentation: PACL, or a training-free method on stock CLIP weights.

    Example::

        segmenter = Segmenter("ViT-B-16", "laion2b_s34b_b88k")  # NACLIP: no training needed
        segmenter = Segmenter("ViT-B-16", "laion2b_s34b_b88k", pacl_weights="pacl.safetensors")  # PACL
        result = segmenter.predict("street.jpg", ["road", "car", "tree", "sky"])
        result.labels      # [H, W] int16 indices into result.classes (-1: background)
        result.scores      # [H, W] float32 winner probabilities
        result.overlay()   # PIL image
        result.save("out/")

    Two ways to make one, as segment-anything has ``build_sam`` then ``SamPredictor(model)``:
    from names (this signature; :func:`pacl_fast.build.build` makes the parts), or from parts
    already built: ``Segmenter(model, encoder=encoder, head=head)``.

    Args:
        clip: open_clip model name (``"ViT-B-16"``), ``"local-dir:PATH"``, a model config dict,
            ``"demo"`` (the shipped synthetic-world CLIP + PACL), or a built model
            (``pacl_fast.build.build_model``; then ``clip_weights``/``pacl_weights``/``method``
            must be left out).
        clip_weights: pretrained tag (fetched by open_clip), local checkpoint file, or None (random
            init, with a warning; for tests and benchmarks).
        pacl_weights: PACL safetensors file (see ``pacl_fast.weights``); only with ``method="pacl"``.
        method: ``"pacl" | "maskclip" | "sclip" | "clearclip" | "naclip" | "proxyclip"``; None: ``"pacl"``
            when PACL weights are given, else ``"naclip"``.
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available.
        dtype: encoder precision: ``torch.float32`` / ``bfloat16`` / ``float16`` (or their names);
            ``"auto"`` (default): the fastest the device runs natively (bf16 on CPUs with AVX512-BF16 or
            AMX and on GPUs from Ampere; see :mod:`pacl_fast.encoders.auto`); None: the encoder's default
            (float16 for tensorrt, else float32).
        image_size: short side the model sees; default the model's (:attr:`defaults`: what its weights
            record, else the CLIP's native size, 224 for ViT-B-16).
        backend: head backend (``pacl_fast.head``): ``"fast"`` (Triton on CUDA, tiled PyTorch on
            CPU), ``"reference"`` (plain PyTorch), ``"tiled"`` or ``"triton"``.
        encoder: a backend name, ``"torch"`` (eager), ``"compile"`` (torch.compile),
            ``"onnxruntime"``, ``"tensorrt"`` or ``"openvino"`` (see :mod:`pacl_fast.encoders`), an
            encoder already built, or ``"auto"`` (default): eager torch unless an OpenVINO model of these
            weights is cached or ``expected_images`` pays for building one. A missing library or device
            raises :class:`~pacl_fast.encoders.EncoderUnavailableError` naming what to install.
            :attr:`choices` (and ``repr``) says which encoder and precision run, and why.
        head: a :class:`~pacl_fast.head.Head` already built (default ``Head(backend)``).
        encoder_options: backend arguments, e.g. ``{"cache_dir": ..., "max_batch": 32}``.
        strict_clip: refuse PACL weights recorded for another CLIP (default True).
        max_pixels: refuse decoded images larger than this.
        batch_size: images (or sliding windows) per encoder call.
        logit_scale: the scale turning cosines into softmax logits for scores and the background
            threshold; default the model's (PACL's trained one, CLIP's for training-free methods), read once.
        text_cache: keep class-name embeddings on disk too (``$PACL_FAST_CACHE/text``), so that every
            process and rank after the first skips the text tower (:class:`pacl_fast.prompts.TextEmbedder`);
            None: yes unless ``$PACL_FAST_NO_TEXT_CACHE`` is set. They are always kept in memory.
        expected_images: how many images this segmenter will segment, for ``encoder="auto"`` (a build
            pays only over many images); None: unknown, a few; ``math.inf``: a service.
        vfm, vfm_weights: ``method="proxyclip"`` only: its vision foundation model (``"dino_vitb8"``, the
            default, or ``"dinov2_vitb14_reg"``) and that model's weights (a local file, ``"timm"``, or None:
            random init with a warning). Its labels then live on the VFM's finer grid (:attr:`grid_patch`).
    """

    def __init__(
        self,
        clip: str | dict | nn.Module = "ViT-B-16",
        clip_weights: str | os.PathLike | None = None,
        pacl_weights: str | os.PathLike | None = None,
        *,
        method: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = AUTO,
        image_size: int | None = None,
        backend: str = "fast",
        encoder: str | Encoder = AUTO,
        head: Head | None = None,
        encoder_options: dict | None = None,
        strict_clip: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        batch_size: int = 8,
        logit_scale: float | None = None,
        text_cache: bool | None = None,
        expected_images: float | None = None,
        vfm: str | None = None,
        vfm_weights: str | os.PathLike | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.metadata: PACLMetadata | None = None
        if isinstance(clip, nn.Module):
            given = [name for name, value in (("clip_weights", clip_weights), ("pacl_weights", pacl_weights),
                                              ("method", method), ("vfm", vfm), ("vfm_weights", vfm_weights))
                     if value is not None]  # fmt: skip
            if given:
                raise TypeError(f"{', '.join(given)} build a model: pass them with a CLIP name, not with a built model")
            model, choice = clip, None
            self.metadata = getattr(model, "pacl_metadata", None)
            if isinstance(encoder, str):
                encoder, choice = encoder_for(
                    model, encoder, dtype, expected_images=expected_images, options=encoder_options
                )
            head = head or Head(backend)
        else:
            if not isinstance(encoder, str):
                raise TypeError("encoder must be a backend name when the model is built from names")
            parts = build(
                clip,
                clip_weights,
                pacl_weights,
                method=method,
                device=device,
                dtype=dtype,
                encoder=encoder,
                encoder_options=encoder_options,
                backend=backend,
                strict_clip=strict_clip,
                expected_images=expected_images,
                vfm=vfm,
                vfm_weights=vfm_weights,
            )
            model, encoder, head, self.metadata = parts.model, parts.encoder, head or parts.head, parts.metadata
            choice = parts.choice
        self.model, self.encoder, self.head = model, encoder, head
        backbone = model.backbone
        #: What the model uses when a caller names nothing (templates, logit scale, input size, window,
        #: background threshold), resolved once when it was built (:mod:`pacl_fast.defaults`); every door reads it.
        self.defaults: ModelDefaults = getattr(model, "model_defaults", None) or resolve_defaults(model, self.metadata)
        #: What users read for the CLIP (``demo``, ``ViT-B-16@openai``...); :attr:`identity` is the full one.
        self.name: str = getattr(model, "display_name", None) or short_identity(str(backbone.identity))
        self.identity = str(backbone.identity)
        self.device = backbone.visual.conv1.weight.device
        self.dtype = encoder.dtype
        self.precision = precision_name(encoder)  # fp32, bf16, fp16, int8: what the encoder computes in
        #: Which encoder and precision run, and why: the short line the CLI prints first and /v1/info shows.
        self._why = "; ".join(choice.reasons) if choice is not None and choice.reasons else "as given"
        self.choices = f"encoder={encoder.name} {self.precision} ({self._why})"
        self.image_size = image_size or self.defaults.image_size
        self.patch_size = backbone.patch_size
        #: Sides of canvases and sliding windows are multiples of this; the output grid has a cell every
        #: ``grid_patch`` pixels. Both are the CLIP's patch size, except for ProxyCLIP (lcm of both towers'
        #: patch sizes; the VFM's patch size).
        self.pixel_multiple = int(model.pixel_multiple)
        self.grid_patch = int(model.grid_patch)
        if self.image_size < self.pixel_multiple:
            raise ValueError(f"image_size={self.image_size} is smaller than the {self.multiple_words}")
        self.mean, self.std = backbone.mean_std
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        #: Read once (the model is frozen; reading it from a GPU every batch would be a host-device sync).
        self.logit_scale: float = float(logit_scale) if logit_scale is not None else self.defaults.logit_scale
        if text_cache is None:
            text_cache = not os.environ.get("PACL_FAST_NO_TEXT_CACHE")
        self.text_embedder = TextEmbedder.for_model(backbone, encoder, use_disk_cache=text_cache)
        # PACL on a Triton head, through an encoder that can stop at the CLIP's patch tokens (the capability
        # base.FusedEmbedderEncoder): one fused kernel applies the embedder, the L2 norm and the similarity
        # (kernels/patch_similarity.py). Compiled and exported encoders already fuse the embedder in their graph.
        self._embedder = fused_embedder(encoder) if head.uses_triton(self.device) else None
        self.fused_embedder = self._embedder is not None

    @property
    def method(self) -> str:
        return self.model.method

    @property
    def vfm(self) -> str | None:
        """The vision foundation model and its weights (``dino_vitb8@sha256:...``) of a VFM method, else None."""
        vfm = getattr(self.model, "vfm", None)
        return None if vfm is None else vfm.identity

    @property
    def multiple_words(self) -> str:
        """What image sides must be multiples of, in words for error messages (the library's and the service's)."""
        if self.pixel_multiple == self.patch_size:
            return f"patch size {self.patch_size}"
        return (f"pixel multiple {self.pixel_multiple} (the lcm of the CLIP's patch size {self.patch_size} and the "
                f"VFM's {self.grid_patch})")  # fmt: skip

    @property
    def model_id(self) -> str:
        """Identifies CLIP + method (+ PACL weights) + precision: what run settings record. The precision is
        what the encoder computes in (OpenVINO's fp32, bf16 and int8 runs differ; their torch dtype does not)."""
        if self.method == "pacl":
            detail = f"{self.metadata.date}/{self.metadata.steps}" if self.metadata else "untrained"
        else:
            detail = self.vfm or ""
        return f"{self.model.backbone.identity}|{self.method}{':' if detail else ''}{detail}|{self.precision}"

    def resolve(
        self,
        templates: str | Sequence[str] | None = None,
        background_threshold: float | None = None,
        sliding_window: SlidingWindow | Literal[False] | None = None,
    ) -> Asked:
        """A caller's options with the model's defaults (:attr:`defaults`) for those left None: what every
        door (``predict``, ``segment``, ``serve``) calls, so that no options give the same answer everywhere.
        ``background_threshold=0.0`` asks for no threshold, ``sliding_window=False`` for no window."""
        defaults = self.defaults
        if background_threshold is None:
            background_threshold = defaults.background_threshold
        if sliding_window is None:
            sliding_window = defaults.sliding_window
        return Asked(
            defaults.templates if templates is None else templates,
            background_threshold or None,  # 0: no threshold
            sliding_window or None,  # False: no window
        )

    def encode_labels(self, labels: Sequence[str], templates: str | Sequence[str] | None = None) -> torch.Tensor:
        """Class names -> unit text embeddings ``[C, E]``: each template filled with each name, the text
        tower run at the prompts' own lengths, per-label averages cached in memory and on disk. ``templates``:
        a preset of :data:`~pacl_fast.choices.TEMPLATE_PRESETS`, a template or a list; None: the model's."""
        return self.text_embedder(labels, self.defaults.templates if templates is None else templates)

    # ----------------------------------------------------------------------------- tensor level

    def patch_logits(self, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, H, W]`` -> cosine logits on the output grid ``[B, H/q, W/q, C]`` (float32;
        ``q``: :attr:`grid_patch`)."""
        class_embeddings = class_embeddings.to(self.device)
        if self._embedder is not None:
            tokens = self.encoder.encode_tokens(pixels)  # [B, h, w, D]
            return self.head.embed_similarity(tokens, self._embedder, class_embeddings)
        return self.head.similarity(self.encoder.encode_image(pixels), class_embeddings)

    def grid_logits(
        self, pixels: torch.Tensor, class_embeddings: torch.Tensor, sliding_window: SlidingWindow | None = None
    ) -> torch.Tensor:
        """Canvases ``[B, 3, H, W]`` -> cosine logits on the patch grid ``[B, h, w, C]``: the whole canvas at
        once, or the average of overlapping ``sliding_window`` crops."""
        if sliding_window is None:
            return self.patch_logits(pixels, class_embeddings)
        return self._window_logits(pixels, class_embeddings, sliding_window)

    def _window_logits(
        self, pixels: torch.Tensor, class_embeddings: torch.Tensor, window: SlidingWindow
    ) -> torch.Tensor:
        """Grid logits ``[B, h, w, C]`` of canvases ``[B, 3, H, W]``, averaged over overlapping windows.

        All windows of the batch go through the encoder ``batch_size`` at a time; a grid cell's
        logits are the mean over the windows that cover it.
        """
        p = self.grid_patch  # windows sit on multiples of pixel_multiple, which grid_patch divides
        batch, _, height, width = pixels.shape
        windows = window.origins((height, width), self.pixel_multiple, self.multiple_words)
        count = torch.zeros(height // p, width // p, 1, device=self.device)
        for y, x, h, w in windows:
            count[y // p : (y + h) // p, x // p : (x + w) // p] += 1
        total = None
        crops = [(b, origin) for b in range(batch) for origin in windows]
        for start in range(0, len(crops), self.batch_size):
            chunk = crops[start : start + self.batch_size]
            stacked = torch.stack([pixels[b, :, y : y + h, x : x + w] for b, (y, x, h, w) in chunk])
            logits = self.patch_logits(stacked, class_embeddings)  # [n, h', w', C]
            if total is None:
                total = torch.zeros(batch, height // p, width // p, logits.shape[-1], device=logits.device)
            for (b, (y, x, h, w)), window_logits in zip(chunk, logits):
                total[b, y // p : (y + h) // p, x // p : (x + w) // p] += window_logits
        return total / count

    def predict_torch(
        self,
        pixels: torch.Tensor,
        class_embeddings: torch.Tensor,
        out_size: tuple[int, int] | Sequence[tuple[int, int]],
        *,
        grid_extent: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
        sliding_window: SlidingWindow | None = None,
        background_threshold: float | None = None,
        with_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | list[Masks]:
        """The batched tensor-level entry: no decoding, no per-image Python on the hot path.

        Args:
            pixels: normalised model inputs ``[B, 3, h*p, w*p]`` (``images.SegmentationPreprocess``).
            class_embeddings: unit ``[C, E]`` (from :meth:`encode_labels`).
            out_size: ``(H, W)`` of every output, or one ``(H, W)`` per image.
            grid_extent: grid cells each original covers (``images.Geometry.grid_extent``), one for
                all or one per image; None: the whole grid.
            sliding_window: average the logits of overlapping windows cut from each canvas.
            background_threshold: pixels whose winning probability is under it get label -1.
            with_scores: False skips the winner scores (labels only, faster; scores None).
        Returns:
            With one ``out_size``: labels ``[B, H, W]`` int16 and scores ``[B, H, W]`` float32 (or
            None), on the model's device. With one size per image: a list of ``(labels [H, W],
            scores [H, W] or None)``.
        """
        return self.segment_logits(
            self.grid_logits(pixels, class_embeddings, sliding_window),
            out_size,
            grid_extent=grid_extent,
            background_threshold=background_threshold,
            with_scores=with_scores,
        )

    def segment_patches(
        self,
        patch_embeddings: torch.Tensor,
        class_embeddings: torch.Tensor,
        out_size: tuple[int, int] | Sequence[tuple[int, int]],
        **options,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | list[Masks]:
        """The head's half of :meth:`predict_torch`, for embeddings an encoder already made
        (``[B, h, w, E]``): similarity, then :meth:`segment_logits` (``options`` as there)."""
        return self.segment_logits(
            self.head.similarity(patch_embeddings, class_embeddings.to(self.device)), out_size, **options
        )

    def segment_logits(
        self,
        logits: torch.Tensor,
        out_size: tuple[int, int] | Sequence[tuple[int, int]],
        *,
        grid_extent: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
        background_threshold: float | None = None,
        with_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | list[Masks]:
        """Grid logits ``[B, h, w, C]`` -> labels and scores at each original size (see :meth:`predict_torch`)."""
        options = dict(logit_scale=self.logit_scale, background_threshold=background_threshold, with_scores=with_scores)
        if isinstance(out_size[0], int):
            return self.head.segment(logits, tuple(out_size), grid_extent=grid_extent, **options)
        if grid_extent is None or isinstance(grid_extent[0], (int, float)):  # one extent (or none) for all
            extents = [grid_extent] * len(out_size)
        else:
            extents = list(grid_extent)
        if len(out_size) != len(logits) or len(extents) != len(logits):
            raise ValueError(f"{len(logits)} images need {len(logits)} out sizes and grid extents")
        masks = []
        for image_logits, size, extent in zip(logits, out_size, extents):
            labels, scores = self.head.segment(image_logits[None], tuple(size), grid_extent=extent, **options)
            masks.append((labels[0], None if scores is None else scores[0]))
        return masks

    def image_logits(
        self, item: Prepared, class_embeddings: torch.Tensor, sliding_window: SlidingWindow | None = None
    ) -> torch.Tensor:
        """One prepared image's cosine logits at its original size ``[C, H, W]`` (float32, bilinear).

        The dense form that refinements need (PAMR, SCLIP's area threshold: ``pacl_fast.protocols``);
        it costs ``4 * C * H * W`` bytes, which the fused head never allocates.
        """
        logits = self.grid_logits(item.pixels[None].to(self.device), class_embeddings, sliding_window)  # [1, h, w, C]
        return self.head.upsample(logits, item.geometry.original_size, item.geometry.grid_extent)[0]

    def check_options(
        self, sliding_window: SlidingWindow | None = None, background_threshold: float | None = None
    ) -> None:
        """``ValueError`` for options that would fail every image, before any is read (predict, eval and
        bulk call it first)."""
        if background_threshold is not None and not 0.0 <= background_threshold <= 1.0:
            raise ValueError(f"background_threshold must be a probability in [0, 1], got {background_threshold}")
        short_side = (sliding_window.short_side if sliding_window else None) or self.image_size
        if short_side < self.pixel_multiple:
            raise ValueError(f"image size {short_side} is smaller than the model's {self.multiple_words}")
        if sliding_window is not None:
            crop = (sliding_window.crop, sliding_window.crop)
            sliding_window.origins(crop, self.pixel_multiple, self.multiple_words)

    def preprocessor(
        self, sliding_window: SlidingWindow | None = None, keep_images: bool = False
    ) -> SegmentationPreprocess:
        """The picklable image -> :class:`~pacl_fast.images.Prepared` step (run it in DataLoader workers)."""
        short_side = (sliding_window.short_side if sliding_window else None) or self.image_size
        return SegmentationPreprocess(
            short_side, self.pixel_multiple, self.mean, self.std, self.max_pixels, keep_images,
            grid_patch=self.grid_patch,
        )  # fmt: skip

    def segment_prepared(
        self,
        items: Sequence[Prepared],
        class_embeddings: torch.Tensor,
        *,
        sliding_window: SlidingWindow | None = None,
        background_threshold: float | None = None,
        with_scores: bool = True,
    ) -> list[Masks | Exception]:
        """Segment prepared images, batching those of one canvas size through :meth:`predict_torch`.

        Returns per item, in order, ``(labels [H, W] int16, scores [H, W] float32 or None)`` on the
        CPU, or the exception that stopped its batch (every other batch still runs).
        """
        results: list[Masks | Exception | None] = [None] * len(items)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            groups[tuple(item.pixels.shape)].append(index)
        # Sliding windows multiply each image into many crops: batch windows, one image at a time.
        per_call = 1 if sliding_window is not None else self.batch_size
        for members in groups.values():
            for start in range(0, len(members), per_call):
                batch = members[start : start + per_call]
                sizes = [items[i].geometry.original_size for i in batch]
                extents = [items[i].geometry.grid_extent for i in batch]
                same = len(set(sizes)) == 1 and len(set(extents)) == 1  # then the head runs once for the batch
                try:
                    masks = self.predict_torch(
                        torch.stack([items[i].pixels for i in batch]),
                        class_embeddings,
                        sizes[0] if same else sizes,
                        grid_extent=extents[0] if same else extents,
                        sliding_window=sliding_window,
                        background_threshold=background_threshold,
                        with_scores=with_scores,
                    )
                except (ValueError, RuntimeError) as error:
                    for index in batch:
                        results[index] = error
                    continue
                if same:  # one copy to the CPU for the batch, then views of it
                    labels, scores = masks[0].cpu(), None if masks[1] is None else masks[1].cpu()
                    masks = [(labels[k], None if scores is None else scores[k]) for k in range(len(batch))]
                for index, (labels, scores) in zip(batch, masks):
                    results[index] = (labels.cpu(), None if scores is None else scores.cpu())
        return results

    # ----------------------------------------------------------------------------- user level

    def segment_images(
        self,
        prepared: Sequence[Prepared],
        class_names: Sequence[str],
        class_embeddings: torch.Tensor,
        *,
        sources: Sequence[str],
        names: Sequence[str | None],
        sliding_window: SlidingWindow | None = None,
        background_threshold: float | None = None,
    ) -> list[Segmentation | ImageError]:
        """Prepared images (decoded elsewhere, e.g. in DataLoader workers) -> :class:`Segmentation` per
        image, or :class:`ImageError` (index: the position in ``prepared``) for those whose batch failed."""
        masks = self.segment_prepared(
            prepared, class_embeddings, sliding_window=sliding_window, background_threshold=background_threshold
        )
        results: list[Segmentation | ImageError] = []
        for index, (item, outcome) in enumerate(zip(prepared, masks)):
            if isinstance(outcome, Exception):
                results.append(ImageError(index, sources[index], outcome))
                continue
            labels_map, scores = outcome
            results.append(
                Segmentation(
                    labels=labels_map.numpy(),
                    scores=scores.numpy(),
                    classes=tuple(class_names),
                    source=sources[index],
                    image=to_uint8_hwc(item.image) if item.image is not None else None,
                    name=names[index],
                )
            )
        return results

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        *,
        templates: str | Sequence[str] | None = None,
        background_threshold: float | None = None,
        sliding_window: SlidingWindow | Literal[False] | None = None,
        errors: Literal["raise", "return"] = "raise",
        keep_images: bool = True,
    ) -> Segmentation | list[Segmentation | ImageError]:
        """Segment images into the given classes. Options left None are the model's (:attr:`defaults`), as
        ``pacl-fast segment`` and the service use them, so the three give the same labels.

        Args:
            images: one image or a list. An image is a path, a PIL image, an ``HWC uint8`` array
                or a ``CHW float`` tensor in 0..1.
            labels: class names (non-empty, no duplicates).
            templates: prompt templates: ``"imagenet"`` (CLIP's 80), ``"short"`` (7), ``"single"``,
                ``"synthetic"`` (:data:`~pacl_fast.choices.TEMPLATE_PRESETS`), or a list of strings with one
                ``{}``; None: the model's (``synthetic`` for the demo model, else mostly ``imagenet``).
            background_threshold: pixels whose winning probability is below it get label -1; None: the
                model's (most have none; the demo model's is 0.95); 0.0: no threshold.
            sliding_window: a :class:`~pacl_fast.images.SlidingWindow` for large images; None: the
                model's (most have none: the short side resized to ``image_size``); False: none.
            errors: what happens when some images fail (missing file, undecodable, too large...):
                ``"raise"`` (default) finishes every other image, then raises :class:`BatchError`
                whose ``.results`` holds all results, failures as :class:`ImageError`;
                ``"return"`` returns that list without raising.
            keep_images: keep the decoded image on each result for ``overlay()``.
        Returns:
            A :class:`Segmentation` for a single image; for a list, a list in input order. Each result's
            ``name`` (the stem ``save`` uses) is its file's stem, else ``image<position in the list>``.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        templates, background_threshold, sliding_window = self.resolve(templates, background_threshold, sliding_window)
        self.check_options(sliding_window, background_threshold)
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items:
            raise ValueError("images is empty")
        class_names = tuple(labels)  # once: an iterator of labels is read once
        class_embeddings = self.encode_labels(class_names, templates)  # checks them with the model's tokenizer
        results: list[Segmentation | ImageError | None] = [None] * len(items)

        preprocess = self.preprocessor(sliding_window, keep_images=keep_images)
        prepared: dict[int, Prepared] = {}
        for index, item in enumerate(items):
            try:
                prepared[index] = preprocess(item)
            except (FileNotFoundError, ValueError, TypeError) as error:
                results[index] = ImageError(index, describe(item), error)
        order = list(prepared)
        segmented = self.segment_images(
            [prepared[i] for i in order],
            class_names,
            class_embeddings,
            sources=[describe(items[i]) for i in order],
            names=[image_name(items[i]) or f"image{i}" for i in order],  # distinct stems within one call
            sliding_window=sliding_window,
            background_threshold=background_threshold,
        )
        for index, result in zip(order, segmented):
            if isinstance(result, ImageError):  # its position in this list, not in the caller's
                result = ImageError(index, result.source, result.error)
            results[index] = result
        if errors == "raise" and any(isinstance(r, ImageError) for r in results):
            raise BatchError(results)
        return results[0] if single else results

    def __repr__(self) -> str:
        pacl = f", pacl={'trained' if self.metadata else 'untrained'}" if self.method == "pacl" else ""
        vfm = f", vfm={self.vfm}" if self.vfm is not None else ""
        return (
            f"Segmenter(method={self.method}, clip={self.name}{pacl}{vfm}, device={self.device}, "
            f"encoder={self.encoder.name}, dtype={self.precision}, image_size={self.image_size}, "
            f"backend={self.head.backend}, {self.defaults.describe()}, why={self._why!r})"
        )


def short_identity(identity: str) -> str:
    """A CLIP identity with its sha256 cut to 12 digits, for a model built without a display name."""
    arch, _, weights = identity.partition("@")
    return f"{arch}@{weights[:19]}" if weights.startswith("sha256:") else identity
