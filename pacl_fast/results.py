"""What ``Segmenter.predict`` returns: :class:`Segmentation` per image, or :class:`ImageError`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pacl_fast.files import atomic_write, output_key, output_path
from pacl_fast.head import BACKGROUND

#: Palette index and 16-bit value that label PNGs use for background pixels.
PNG_BACKGROUND_8BIT = 255
PNG_BACKGROUND_16BIT = 65535
#: Overlays are blended this many pixels at a time, so their float temporaries stay small whatever the image size.
OVERLAY_BAND_PIXELS = 1 << 20


def image_name(image: object) -> str | None:
    """A clean file stem for an input: a path's stem, a PIL image's file name stem, else None.

    A name that is not UTF-8 has each such byte written ``%XX`` (:func:`~pacl_fast.files.output_key`), as
    the CLI's outputs do, so that it can be saved, printed and put in JSON; one no output can carry is None.
    """
    if isinstance(image, (str, os.PathLike)):
        stem = Path(image).stem
    else:
        filename = getattr(image, "filename", None) if isinstance(image, Image.Image) else None
        stem = Path(filename).stem if isinstance(filename, str) else ""
    try:
        return output_key(stem) if stem else None
    except ValueError:  # "..", or longer than a file name may be
        return None


def output_files(directory: str | os.PathLike, stem: str, overlay: bool = True) -> dict[str, Path]:
    """``{"labels": DIR/<stem>_labels.png, "overlay": DIR/<stem>_overlay.png}``, both proven inside ``DIR``.

    ``stem`` may hold ``/`` (sub-folders); an unsafe one (absolute, ``..``, too long) raises ValueError.
    """
    paths = {"labels": output_path(directory, stem, "_labels.png")}
    if overlay:
        paths["overlay"] = output_path(directory, stem, "_overlay.png")
    return paths


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
        name: a clean file stem for :meth:`save`: :func:`image_name` of the input, else (``predict``)
            ``image<its position in the call>``, so the results of one call save side by side; None: none.
    """

    labels: np.ndarray
    scores: np.ndarray
    classes: tuple[str, ...]
    source: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    name: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return tuple(self.labels.shape)

    def class_shares(self) -> dict[str, float]:
        """Share of pixels per class, in class order, then the background's (pixels under the threshold) if
        any, as ``"background"``, or ``"background (below threshold)"`` when a class has that name (the
        training-free protocols' VOC21 and COCO-Object lists do): the two are different pixels."""
        counts = np.bincount(self.labels.ravel().astype(np.int64) + 1, minlength=len(self.classes) + 1)
        total = max(1, self.labels.size)
        shares = {name: counts[i + 1] / total for i, name in enumerate(self.classes)}
        if counts[0]:
            key = "background" if "background" not in shares else "background (below threshold)"
            shares[key] = counts[0] / total
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
        values = self.labels.astype(np.int32)  # [H, W]; int16 cannot hold 65535
        values[values == BACKGROUND] = PNG_BACKGROUND_16BIT
        return Image.fromarray(values.astype(np.uint16))

    def overlay(self, image: np.ndarray | Image.Image | None = None, alpha: float = 0.5) -> Image.Image:
        """The image with class colours blended in (background left as is).

        Blended in bands of rows, so the cost is the output (3 bytes a pixel) plus a few MB.
        """
        base = (
            self.image
            if image is None
            else np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        )
        if base is None:
            raise ValueError("no image to overlay: predict(..., keep_images=True) or pass image=")
        if base.shape[:2] != self.labels.shape:
            raise ValueError(f"overlay image is {base.shape[:2]}, labels are {self.labels.shape}")
        colours = palette(len(self.classes)).astype(np.float32)  # [C, 3]
        out = np.empty((*self.labels.shape, 3), dtype=np.uint8)  # [H, W, 3]
        rows = max(1, OVERLAY_BAND_PIXELS // max(1, self.labels.shape[1]))
        for top in range(0, self.labels.shape[0], rows):
            labels = self.labels[top : top + rows]  # [h, W]
            band = base[top : top + rows].astype(np.float32)  # [h, W, 3]
            blend = band * (1 - alpha) + colours[np.clip(labels, 0, None)] * alpha
            blend = np.where((labels == BACKGROUND)[..., None], band, blend)
            out[top : top + rows] = blend.round().astype(np.uint8)
        return Image.fromarray(out)

    def save(
        self,
        directory: str | os.PathLike,
        stem: str | None = None,
        *,
        index: int = 0,
        overwrite: bool = False,
    ) -> dict[str, Path]:
        """Write ``<stem>_labels.png`` and (if the image was kept) ``<stem>_overlay.png``, each atomically.

        Args:
            stem: the file names' stem (may hold ``/`` for sub-folders, never ``..``); default
                :attr:`name` (the input file's stem), else ``image{index}``.
            index: the image's position in its batch, naming inputs that have no file name.
            overwrite: replace existing files; without it an existing file raises FileExistsError.
        Returns:
            ``{"labels": path, "overlay": path}`` (overlay only with an image). The overlay is
            written first, so an image is complete exactly when its labels file exists.
        """
        stem = stem or self.name or f"image{index}"
        paths = output_files(directory, stem, overlay=self.image is not None)
        if not overwrite:
            existing = [str(p) for p in paths.values() if p.exists() or p.is_symlink()]
            if existing:
                raise FileExistsError(
                    f"{existing[0]} already exists; pass overwrite=True to replace it, or another stem or folder"
                )
        if "overlay" in paths:
            atomic_write(paths["overlay"], lambda f: self.overlay().save(f, format="PNG"))
        atomic_write(paths["labels"], lambda f: self.label_image().save(f, format="PNG"))
        return paths


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
