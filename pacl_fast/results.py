"""What ``Segmenter.predict`` returns: :class:`Segmentation` per image, or :class:`ImageError`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pacl_fast.head import BACKGROUND

#: Palette index and 16-bit value that label PNGs use for background pixels.
PNG_BACKGROUND_8BIT = 255
PNG_BACKGROUND_16BIT = 65535


def palette(num_classes: int) -> np.ndarray:
    """``[num_classes, 3]`` uint8 colours, distinct and stable (PASCAL VOC's bit-interleaved map)."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, r, g, b = index + 1, 0, 0, 0  # +1: the first class is not black
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (r, g, b)
    return colours


@dataclass
class Segmentation:
    """Per-pixel classes of one image, at its original size.

    Attributes:
        labels: ``[H, W]`` int16 indices into ``classes``; ``-1`` marks background (pixels whose
            score fell under ``background_threshold``).
        scores: ``[H, W]`` float32, the winning class's softmax probability.
        classes: the class names, in the order given to ``predict``.
        source: the input's name (a path, or a description).
        image: the decoded ``HWC uint8`` image, kept for :meth:`overlay` (None if not kept).
    """

    labels: np.ndarray
    scores: np.ndarray
    classes: tuple[str, ...]
    source: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return tuple(self.labels.shape)

    def class_shares(self) -> dict[str, float]:
        """Share of pixels per class (and ``"background"`` if any), in class order."""
        counts = np.bincount(self.labels.ravel().astype(np.int64) + 1, minlength=len(self.classes) + 1)
        total = max(1, self.labels.size)
        shares = {name: counts[i + 1] / total for i, name in enumerate(self.classes)}
        if counts[0]:
            shares["background"] = counts[0] / total
        return shares

    def label_image(self) -> Image.Image:
        """Labels as a palette PNG image (8-bit, background index 255), or 16-bit grey over 255 classes."""
        if len(self.classes) <= 255:
            indices = np.where(self.labels == BACKGROUND, PNG_BACKGROUND_8BIT, self.labels).astype(np.uint8)
            image = Image.fromarray(indices)
            colours = np.zeros((256, 3), dtype=np.uint8)
            colours[: len(self.classes)] = palette(len(self.classes))
            image.putpalette(colours.ravel().tolist())
            return image
        values = np.where(self.labels == BACKGROUND, PNG_BACKGROUND_16BIT, self.labels).astype(np.uint16)
        return Image.fromarray(values)

    def overlay(self, image: np.ndarray | Image.Image | None = None, alpha: float = 0.5) -> Image.Image:
        """The image with class colours blended in (background left as is)."""
        base = (
            self.image
            if image is None
            else np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        )
        if base is None:
            raise ValueError("no image to overlay: predict(..., keep_images=True) or pass image=")
        if base.shape[:2] != self.labels.shape:
            raise ValueError(f"overlay image is {base.shape[:2]}, labels are {self.labels.shape}")
        colours = palette(len(self.classes))[np.clip(self.labels, 0, None)].astype(np.float32)
        blend = base.astype(np.float32) * (1 - alpha) + colours * alpha
        blend = np.where((self.labels == BACKGROUND)[..., None], base.astype(np.float32), blend)
        return Image.fromarray(blend.round().astype(np.uint8))

    def save(self, directory: str | os.PathLike, stem: str | None = None) -> dict[str, Path]:
        """Write ``<stem>_labels.png`` and (if the image was kept) ``<stem>_overlay.png``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stem = stem or (Path(self.source).stem if self.source else "image")
        written = {"labels": directory / f"{stem}_labels.png"}
        self.label_image().save(written["labels"])
        if self.image is not None:
            written["overlay"] = directory / f"{stem}_overlay.png"
            self.overlay().save(written["overlay"])
        return written


class ImageError(Exception):
    """One input that could not be segmented: which one, and why (``__cause__``)."""

    def __init__(self, index: int, source: str, error: BaseException):
        super().__init__(f"image {index} ({source}): {type(error).__name__}: {error}")
        self.index = index
        self.source = source
        self.error = error
        self.__cause__ = error


class BatchError(Exception):
    """Some images of a batch failed. ``results`` still holds every other image's Segmentation."""

    def __init__(self, results: list[Segmentation | ImageError]):
        self.results = results
        self.failures = [r for r in results if isinstance(r, ImageError)]
        lines = "\n  ".join(str(f) for f in self.failures)
        super().__init__(f"{len(self.failures)} of {len(results)} images failed:\n  {lines}")
