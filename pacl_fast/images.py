"""The one place for images: decoding, geometry, resizing, crops and normalisation.

Decoding (:func:`load_image`) accepts a path, PIL image, ``HWC uint8`` array, ``CHW float``
tensor in 0..1, and turns each into an RGB tensor ``[3, H, W]`` (uint8, or float32 for float
input). Every model input is then made by the same three steps, whatever reads it:

* :func:`resize` (bicubic, antialiased, clamped to 0..1), to a size planned by
  :func:`plan_resize` (short side to the model's size, aspect kept); or, for the training-free
  papers' protocols (``kernel="mmcv"``), mmcv's ``Resize(keep_ratio=True)`` as their pipelines run
  it: :func:`plan_mmcv_resize` (mmcv's size rounding and long-side cap) and :func:`resize_mmcv`
  (OpenCV's bilinear, no antialiasing);
* for segmentation, zero padding to the patch multiple (:func:`fit_to_model`,
  :class:`SegmentationPreprocess`), with a :class:`Geometry` that maps the patch grid back to
  the original pixels; for classification and training, a centre crop with torchvision's
  rounding (:func:`center_crop`; :class:`ClipPreprocess`, :func:`square_crop`);
* :func:`normalize` with the CLIP's mean/std.

:data:`IMAGE_SUFFIXES` is the one list of file suffixes read as images (folders, shards).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from pacl_fast.choices import DEFAULT_MAX_PIXELS, MAX_ASPECT_RATIO  # noqa: F401  (re-exported)

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


#: File suffixes read as images (folders of images, WebDataset fields without the dot).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: How :class:`SegmentationPreprocess` resizes: ``"bicubic"`` (the engine's own: :func:`plan_resize`,
#: :func:`resize`) or ``"mmcv"`` (the training-free protocols': :func:`plan_mmcv_resize`, :func:`resize_mmcv`).
RESIZE_KERNELS = ("bicubic", "mmcv")

OPENCV_MISSING = (
    "the training-free protocols resize images as mmcv does, with OpenCV, which is not installed: "
    "pip install opencv-python-headless (a dependency of pacl-fast)"
)


def describe(image: object) -> str:
    """A short name for an input in error messages."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"{type(image).__name__} of shape {tuple(image.shape)} ({image.dtype})"
    return type(image).__name__


def _check_size(height: int, width: int, max_pixels: int, name: str) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"{name}: image has zero size ({width}x{height})")
    if height * width > max_pixels:
        raise ValueError(
            f"{name}: image has {height * width} pixels ({width}x{height}), over the limit max_pixels={max_pixels}"
        )


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: palette and alpha modes through RGBA, 16/32-bit integer modes rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((array >> 8).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _open_path(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            _check_size(image.height, image.width, max_pixels, str(path))
            image.load()
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path}: image is over PIL's pixel limit ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot decode image file {path}: {error}") from error
    return image


def load_image(image: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode one image to RGB ``[3, H, W]``: uint8, or float32 in 0..1 for float tensor input.

    Accepts a path (EXIF orientation applied; modes L, LA, P, RGBA, CMYK, I;16, ... converted),
    a PIL image, an ``HWC`` (or ``HW``) uint8 array with 1, 3 or 4 channels, or a ``CHW`` float
    tensor in 0..1 with 1 or 3 channels. Raises FileNotFoundError / ValueError / TypeError naming
    the input and what was expected.
    """
    name = describe(image)
    if isinstance(image, (str, os.PathLike)):
        image = _open_path(Path(image), max_pixels)
    if isinstance(image, Image.Image):
        _check_size(image.height, image.width, max_pixels, name)
        image = _pil_to_rgb(ImageOps.exif_transpose(image))
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"{name}: numpy images must be uint8 HWC; convert floats to a CHW torch tensor in 0..1")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"{name}: expected an HWC array with 1, 3 or 4 channels")
        _check_size(image.shape[0], image.shape[1], max_pixels, name)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return tensor[:3].contiguous() if tensor.shape[0] == 4 else tensor.expand(3, -1, -1).contiguous()
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"{name}: expected a CHW tensor with 1 or 3 channels")
        _check_size(image.shape[1], image.shape[2], max_pixels, name)
        if image.dtype == torch.uint8:
            return image.expand(3, -1, -1).contiguous()
        if not image.is_floating_point():
            raise TypeError(f"{name}: tensor images must be uint8 or float in 0..1")
        if not torch.isfinite(image).all():
            raise ValueError(f"{name}: tensor has NaN or Inf values")
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{name}: float tensor values must be in 0..1, found {low:.4g}..{high:.4g}")
        return image.detach().float().expand(3, -1, -1).cpu().contiguous()
    raise TypeError(f"unsupported image type {type(image).__name__}: give a path, PIL image, uint8 array or tensor")


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` uint8 or float 0..1 -> ``HWC uint8`` array (for overlays)."""
    if image.is_floating_point():
        image = (image * 255.0).round().clamp(0, 255).to(torch.uint8)
    return image.permute(1, 2, 0).cpu().numpy()


@dataclass(frozen=True)
class Geometry:
    """How a model input (canvas) maps back to the original image.

    The original ``(H, W)`` image was resized to ``resized_size`` and padded (bottom/right) to
    ``canvas_size``, a multiple of the model's pixel multiple (its patch size; ProxyCLIP: the lcm of
    both towers' patch sizes), hence of ``patch_size``: the pixels per cell of the model's output grid
    (the CLIP's patch size; ProxyCLIP: its VFM's). The grid is ``canvas / patch``; the original covers
    ``grid_extent = resized / patch`` cells of it (fractional).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    canvas_size: tuple[int, int]
    patch_size: int

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.canvas_size[0] // self.patch_size, self.canvas_size[1] // self.patch_size

    @property
    def grid_extent(self) -> tuple[float, float]:
        return self.resized_size[0] / self.patch_size, self.resized_size[1] / self.patch_size


def _check_plan(original_size: tuple[int, int], short_side: int, patch_size: int) -> None:
    """Images longer than :data:`MAX_ASPECT_RATIO` times their short side are refused: the short side is
    scaled *up* to the model's size, so a 1x4000 strip of 70 bytes would become a 64x256000 canvas
    (and ViT attention over all of it, or thousands of sliding windows)."""
    if short_side < patch_size:
        raise ValueError(f"short_side={short_side} is smaller than the patch size {patch_size}")
    height, width = original_size
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise ValueError(
            f"image is {height}x{width} (height x width): its long side is over {MAX_ASPECT_RATIO} times its short "
            "side, which the model cannot take (crop it into pieces)"
        )


def _on_patch_canvas(
    original_size: tuple[int, int], resized: tuple[int, int], patch_size: int, grid_patch: int | None
) -> Geometry:
    grid_patch = patch_size if grid_patch is None else grid_patch
    if patch_size % grid_patch:
        raise ValueError(f"the canvas multiple {patch_size} must be a multiple of the grid patch {grid_patch}")
    canvas = tuple(-(-side // patch_size) * patch_size for side in resized)
    return Geometry(original_size, resized, canvas, grid_patch)


def plan_resize(
    original_size: tuple[int, int], short_side: int, patch_size: int, grid_patch: int | None = None
) -> Geometry:
    """Short side to ``short_side`` (rounded to nearest), aspect kept, padded up to a multiple of ``patch_size``
    (the model's pixel multiple); the output grid has a cell every ``grid_patch`` pixels (default
    ``patch_size``). Refuses images over :data:`MAX_ASPECT_RATIO` (see :func:`_check_plan`)."""
    _check_plan(original_size, short_side, patch_size)
    height, width = original_size
    scale = short_side / min(height, width)
    resized = (max(1, round(height * scale)), max(1, round(width * scale)))
    return _on_patch_canvas(original_size, resized, patch_size, grid_patch)


def mmcv_rescale_size(original_size: tuple[int, int], short_side: int, max_long_side: int) -> tuple[int, int]:
    """``(height, width)`` that mmcv's ``Resize(scale=(max_long_side, short_side), keep_ratio=True)`` gives.

    mmcv's ``rescale_size`` (open-mmlab/mmcv ``mmcv/image/geometric.py`` l. 219-255, called by
    ``imrescale`` l. 258-288 from ``Resize._resize_img``, ``mmcv/transforms/processing.py`` l. 171-177):
    the factor is ``min(max(scale) / long side, min(scale) / short side)`` (so the long side never
    passes ``max_long_side``), and each side becomes ``int(side * factor + 0.5)`` (``_scale_size``
    l. 17-33: half up, where :func:`plan_resize` rounds to nearest even).
    """
    height, width = original_size
    long_cap, short_cap = max(max_long_side, short_side), min(max_long_side, short_side)
    factor = min(long_cap / max(height, width), short_cap / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def plan_mmcv_resize(
    original_size: tuple[int, int], short_side: int, max_long_side: int, patch_size: int, grid_patch: int | None = None
) -> Geometry:
    """:func:`mmcv_rescale_size`, padded up to a multiple of ``patch_size`` (what ``--protocol`` runs; ``grid_patch``
    as :func:`plan_resize`'s). Refuses images over :data:`MAX_ASPECT_RATIO` (see :func:`_check_plan`)."""
    _check_plan(original_size, short_side, patch_size)
    resized = mmcv_rescale_size(original_size, short_side, max_long_side)
    if min(resized) < 1:
        raise ValueError(f"image of {original_size[0]}x{original_size[1]} pixels resizes to {resized}: nothing left")
    return _on_patch_canvas(original_size, resized, patch_size, grid_patch)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """RGB ``[3, H, W]`` (uint8, or float in 0..1) -> float32 ``[3, h, w]`` in 0..1: bicubic, antialiased."""
    pixels = image.float() / 255.0 if not image.is_floating_point() else image.float()
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    resized = F.interpolate(pixels[None], size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return resized[0].clamp_(0.0, 1.0)


def require_opencv():  # noqa: ANN201 - the cv2 module
    """OpenCV (``cv2``), or ``ImportError`` saying how to install it."""
    try:
        import cv2
    except ImportError as error:
        raise ImportError(OPENCV_MISSING) from error
    return cv2


def resize_mmcv(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """RGB ``[3, H, W]`` (uint8, or float in 0..1) -> float32 ``[3, h, w]`` in 0..1, as mmcv's ``Resize`` does it.

    ``mmcv.imresize(img, (w, h), interpolation="bilinear", backend="cv2")`` (``geometric.py`` l. 77-123) is
    ``cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)`` on the decoded HWC image: bilinear with
    half-pixel centres, no antialiasing when shrinking, and on uint8 images OpenCV's fixed-point weights
    and rounding back to uint8 (the repositories load images as uint8). Then ``/ 255``.
    """
    cv2 = require_opencv()
    height, width = size
    if image.is_floating_point():
        hwc = image.float().permute(1, 2, 0).contiguous().numpy()
        resized = cv2.resize(hwc, (width, height), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).clamp_(0.0, 1.0).contiguous()
    hwc = image.permute(1, 2, 0).contiguous().numpy()
    resized = cv2.resize(hwc, (width, height), interpolation=cv2.INTER_LINEAR)  # [h, w, 3] uint8
    return torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float() / 255.0


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(pixels - mean) / std`` per channel, for ``[3, H, W]`` or ``[B, 3, H, W]`` float pixels in 0..1."""
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return (pixels - mean_t) / std_t


def center_crop(pixels: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The centre ``size`` (``S`` or ``(H, W)``) of ``[..., h, w]``, offsets rounded as torchvision's."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    height, width = pixels.shape[-2:]
    if height < crop_h or width < crop_w:
        raise ValueError(f"cannot centre-crop {crop_h}x{crop_w} out of {height}x{width}")
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return pixels[..., top : top + crop_h, left : left + crop_w]


def cover_crop(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """RGB ``[3, h, w]`` -> float32 ``[3, H, W]`` in 0..1: :func:`resize` (aspect kept) until it just
    covers ``H x W``, then :func:`center_crop`. For a square ``size``: CLIP's short side + centre crop."""
    height, width = image.shape[-2:]
    scale = max(size[0] / height, size[1] / width)
    resized = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    return center_crop(resize(image, resized), size)


def fit_to_model(
    image: torch.Tensor,
    geometry: Geometry,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    kernel: str = "bicubic",
) -> torch.Tensor:
    """RGB ``[3, H, W]`` -> normalised model input ``[3, canvas_h, canvas_w]`` float32.

    :func:`resize` (``kernel="bicubic"``) or :func:`resize_mmcv` (``"mmcv"``) to ``geometry.resized_size``,
    :func:`normalize`, zero padding (the mean colour after normalisation) bottom and right to the canvas.
    """
    if kernel not in RESIZE_KERNELS:
        raise ValueError(f"kernel must be one of {RESIZE_KERNELS}, got {kernel!r}")
    resized = resize_mmcv(image, geometry.resized_size) if kernel == "mmcv" else resize(image, geometry.resized_size)
    pixels = normalize(resized, mean, std)
    pad_h = geometry.canvas_size[0] - geometry.resized_size[0]
    pad_w = geometry.canvas_size[1] - geometry.resized_size[1]
    return F.pad(pixels, (0, pad_w, 0, pad_h))


def square_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's training crop, stored compactly: ``[3, H, W]`` -> ``[3, size, size]`` uint8 (short side, centre)."""
    return (cover_crop(image, (size, size)) * 255.0).round().to(torch.uint8)


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP's classification preprocessing as a picklable callable (for DataLoader workers).

    image -> ``[3, size, size]`` float32: short side to ``size``, centre crop, normalised.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __call__(self, image: ImageInput) -> torch.Tensor:
        pixels = cover_crop(load_image(image, max_pixels=self.max_pixels), (self.size, self.size))
        return normalize(pixels, self.mean, self.std)


@dataclass
class Prepared:
    """One image made ready for the model: what :class:`SegmentationPreprocess` returns."""

    pixels: torch.Tensor  # [3, canvas_h, canvas_w] float32, normalised, zero-padded
    geometry: Geometry
    image: torch.Tensor | None = None  # the decoded RGB [3, H, W], kept for overlays


@dataclass(frozen=True)
class SegmentationPreprocess:
    """Decode + resize + normalise + pad one image, as a picklable callable (DataLoader workers run it).

    The short side goes to ``short_side`` (the model's image size, or a sliding window's); the
    canvas is padded to a multiple of ``patch_size`` (the model's pixel multiple), and the geometry's
    grid has a cell every ``grid_patch`` pixels (None: ``patch_size``; ProxyCLIP: its VFM's patch).
    ``kernel`` (:data:`RESIZE_KERNELS`): the engine's ``"bicubic"`` (:func:`plan_resize`, :func:`resize`), or
    ``"mmcv"`` as the training-free protocols resize (:func:`plan_mmcv_resize` with ``max_long_side``,
    :func:`resize_mmcv`).
    """

    short_side: int
    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_image: bool = False
    kernel: str = "bicubic"
    max_long_side: int | None = None
    grid_patch: int | None = None

    def __post_init__(self) -> None:
        if self.kernel not in RESIZE_KERNELS:
            raise ValueError(f"kernel must be one of {RESIZE_KERNELS}, got {self.kernel!r}")
        if (self.kernel == "mmcv") != (self.max_long_side is not None):
            raise ValueError("max_long_side goes with kernel='mmcv' (mmcv's long-side cap), and only with it")

    def __call__(self, image: ImageInput) -> Prepared:
        decoded = load_image(image, max_pixels=self.max_pixels)
        size = tuple(decoded.shape[-2:])
        if self.kernel == "mmcv":
            geometry = plan_mmcv_resize(size, self.short_side, self.max_long_side, self.patch_size, self.grid_patch)
        else:
            geometry = plan_resize(size, self.short_side, self.patch_size, self.grid_patch)
        pixels = fit_to_model(decoded, geometry, self.mean, self.std, self.kernel)
        return Prepared(pixels, geometry, decoded if self.keep_image else None)


@dataclass(frozen=True)
class SlidingWindow:
    """Sliding-window inference: the image's short side is resized to ``short_side`` (None: the
    model's size), then ``crop x crop`` windows with ``stride`` cover the canvas; logits of
    overlapping windows are averaged on the patch grid. ``crop`` and ``stride`` must be multiples
    of the model's pixel multiple (its patch size; ProxyCLIP: the lcm of both towers' patch sizes)
    so that every window sits on the same grid."""

    crop: int
    stride: int
    short_side: int | None = None

    def __post_init__(self) -> None:
        if self.crop <= 0 or self.stride <= 0:
            raise ValueError(f"SlidingWindow crop and stride must be positive, got {self.crop}, {self.stride}")
        if self.stride > self.crop:
            raise ValueError(f"SlidingWindow stride {self.stride} > crop {self.crop} would leave gaps")

    def origins(
        self, canvas_size: tuple[int, int], patch_size: int, what: str | None = None
    ) -> list[tuple[int, int, int, int]]:
        """Windows ``(y0, x0, height, width)`` covering the canvas, the last ones flush with its end.

        ``patch_size``: the model's pixel multiple, which ``crop`` and ``stride`` must be multiples of;
        ``what``: its name in the error (default ``"patch size N"``)."""
        if self.crop % patch_size or self.stride % patch_size:
            raise ValueError(
                f"SlidingWindow crop={self.crop} and stride={self.stride} must be multiples "
                f"of the {what or f'patch size {patch_size}'}"
            )

        def starts(length: int) -> tuple[list[int], int]:
            size = min(self.crop, length)
            count = max(length - size + self.stride - 1, 0) // self.stride + 1
            return sorted({min(i * self.stride, length - size) for i in range(count)}), size

        ys, height = starts(canvas_size[0])
        xs, width = starts(canvas_size[1])
        return [(y, x, height, width) for y in ys for x in xs]
