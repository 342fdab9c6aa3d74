"""Refinement of dense class scores after upsampling: PAMR (``refine="pamr"``).

Pixel-Adaptive Mask Refinement (Araslanov & Roth, "Single-Stage Semantic Segmentation from Image
Labels", CVPR 2020; their ``models/mods/pamr.py``, which NACLIP's and SCLIP's ``pamr.py`` copy)
smooths score maps with weights taken from the image, so that scores spread within regions of
similar colour and stop at edges. NACLIP runs it by default (``naclip.py`` l. 21: ``pamr_steps=10,
pamr_stride=(8, 16)``) on the cosine logits at the original image size, before the logit scale and
the softmax. Its guide is not the original image but the network input (the image after the
protocol's resize, e.g. to a short side of 336, normalised) resized back to the original size,
bilinear with ``align_corners=False`` (``naclip.py`` l. 129-132): :func:`resized_input_guide`. That
is what the engine gives PAMR under ``--protocol naclip`` (``pacl_fast.protocols``); called
directly, :func:`pamr` uses whatever image it is given.

The definition, for each pixel ``i`` and its ``P = 8 * len(dilations)`` neighbours ``j`` (the 8
pixels at offsets ``(dy, dx) * d``, ``dy, dx`` in ``{-1, 0, 1}`` not both 0, for each dilation ``d``,
in that order; positions outside the image are clamped to the border, i.e. replicate padding):

* ``sigma_i^k``: the standard deviation (unbiased) of image channel ``k`` over the
  ``9 * len(dilations)`` values "``i`` and its 8 neighbours", once per dilation (so ``i`` counts
  ``len(dilations)`` times);
* ``a_ij = -mean_k |I_i^k - I_j^k| / (1e-8 + 0.1 * sigma_i^k)``, ``w_ij = softmax_j(a_ij)`` over the
  ``P`` neighbours (the pixel itself is not among them);
* ``iterations`` times, every class: ``M_i <- sum_j w_ij M_j`` (the same weights every time).

So each step replaces a pixel's scores by a convex combination of its neighbours' scores: constant
maps stay constant, per-pixel sums over classes are kept, values stay within their range, and on an
image of constant colour the weights are uniform (plain averaging). The image enters only through
``|I_i - I_j| / sigma_i`` per channel, so any per-channel affine change of the image (CLIP's
mean/std normalisation, a 0..1 or 0..255 range) leaves the result unchanged (up to the 1e-8).

Memory. The reference module materialises the shifted scores for all neighbours at once,
``[B, C, P, H, W]`` float32, and their product with the weights, another tensor of that size: for
150 classes at 512 x 512 with dilations (8, 16) (``P = 16``) that is 150 * 16 * 512 * 512 * 4 bytes
= 2,516,582,400 bytes (2.34 GiB) each, about 4.7 GiB in all. :func:`pamr` never does: it keeps the
weights ``[B, P, H, W]`` (16.8 MB at 512 x 512) and accumulates one neighbour at a time, so it holds
the scores, one padded copy ``[B, C, H + 2D, W + 2D]`` (``D`` the largest dilation) and the result:
157 MB + 178 MB + 157 MB, about 0.5 GB, for the same 150 classes at 512 x 512. Time is
``iterations * P`` multiply-adds per score (10 * 16 = 160 for NACLIP's setting). Measured on a
2-core CPU (150 classes, 512 x 512, 10 iterations, dilations (8, 16)): this function 23 s and
0.57 GB of peak memory above its inputs; the reference module 370 s and 7.8 GB.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: The 8 neighbour directions, in the order of the reference's 3 x 3 shift kernels (row-major, centre skipped).
NEIGHBOURS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))

#: NACLIP's setting (``naclip.py``: ``pamr_steps=10, pamr_stride=(8, 16)``).
NACLIP_ITERATIONS = 10
NACLIP_DILATIONS = (8, 16)


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The ``P = 8 * len(dilations)`` offsets ``(dy, dx)``, dilation by dilation."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in NEIGHBOURS]


def _check(image: torch.Tensor, masks: torch.Tensor, iterations: int, dilations: Sequence[int]) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or not image.is_floating_point():
        raise TypeError(f"pamr: image must be a float tensor [B, 3, H, W], got {_describe(image)}")
    if not isinstance(masks, torch.Tensor) or masks.dim() != 4 or not masks.is_floating_point():
        raise TypeError(f"pamr: masks must be a float tensor [B, C, H, W], got {_describe(masks)}")
    if masks.shape[0] != image.shape[0]:
        raise ValueError(f"pamr: masks hold {masks.shape[0]} images but image holds {image.shape[0]}")
    if masks.device != image.device:
        raise ValueError(f"pamr: masks are on {masks.device} but image is on {image.device}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"pamr: iterations must be an integer >= 0, got {iterations!r}")
    if not dilations or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
        raise ValueError(f"pamr: dilations must be a non-empty sequence of integers >= 1, got {dilations!r}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def _shifted(padded: torch.Tensor, pad: int, offset: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``x[..., clamp(y + dy), clamp(x + dx)]`` for every pixel, as a view into a replicate-padded copy."""
    (dy, dx), (height, width) = offset, size
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def pamr_weights(image: torch.Tensor, dilations: Sequence[int] = NACLIP_DILATIONS) -> torch.Tensor:
    """The neighbour weights ``w`` ``[B, P, H, W]`` (they sum to 1 over ``P``) of an image ``[B, K, H, W]``."""
    offsets = neighbour_offsets(dilations)
    pad = max(dilations)
    size = tuple(image.shape[-2:])
    padded = F.pad(image, [pad] * 4, mode="replicate")  # [B, K, H + 2D, W + 2D]
    # sigma over "centre + 8 neighbours" per dilation, two passes (mean, then squared deviations) as torch.std.
    count = 9 * len(dilations)
    total = image * len(dilations)  # [B, K, H, W]
    for offset in offsets:
        total = total + _shifted(padded, pad, offset, size)
    mean = total / count
    squares = (image - mean).square() * len(dilations)
    for offset in offsets:
        squares = squares + (_shifted(padded, pad, offset, size) - mean).square()
    scale = 1e-8 + 0.1 * (squares / (count - 1)).sqrt()  # [B, K, H, W]
    affinity = torch.stack(
        [-((image - _shifted(padded, pad, offset, size)).abs() / scale).mean(dim=1) for offset in offsets], dim=1
    )  # [B, P, H, W]
    return torch.softmax(affinity, dim=1)


def resized_input_guide(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """NACLIP's PAMR guide: the network input ``[B, 3, h, w]`` (resized and normalised, no padding) resized to
    the original image's ``size`` ``(H, W)``, bilinear, ``align_corners=False`` -> ``[B, 3, H, W]`` float32.

    sinahmr/NACLIP@0cac3a6 ``naclip.py`` l. 130: ``F.interpolate(inputs, size=img_size, mode='bilinear',
    align_corners=False)``. A downscaled image upsampled again is blurrier than the original, so the
    weights PAMR takes from it differ from the original image's.
    """
    if pixels.dim() != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
        raise ValueError(f"resized_input_guide: pixels must be float [B, 3, h, w], got {_describe(pixels)}")
    return F.interpolate(pixels.float(), size=tuple(size), mode="bilinear", align_corners=False)


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    iterations: int = NACLIP_ITERATIONS,
    dilations: Sequence[int] = NACLIP_DILATIONS,
) -> torch.Tensor:
    """Refine score maps ``masks`` ``[B, C, H, W]`` with the image ``[B, 3, H, W]`` (see the module docstring).

    Args:
        image: float ``[B, K, H, W]`` (any per-channel scaling: the result does not depend on it).
        masks: float ``[B, C, h, w]`` scores (NACLIP: cosine logits of every text query). A size
            other than the image's is first resized to it (bilinear, ``align_corners=True``, as
            the reference module does).
        iterations: refinement steps (NACLIP 10; 0 returns the resized masks).
        dilations: neighbour distances in pixels (NACLIP ``(8, 16)``).
    Returns:
        ``[B, C, H, W]``, float32 (float64 when either input is float64). Memory: about three
        copies of the masks, never ``[B, C, P, H, W]`` (module docstring).
    """
    _check(image, masks, iterations, dilations)
    dtype = torch.float64 if torch.float64 in (image.dtype, masks.dtype) else torch.float32
    image, masks = image.to(dtype), masks.to(dtype)
    size = tuple(image.shape[-2:])
    if tuple(masks.shape[-2:]) != size:
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=True)
    if iterations == 0:
        return masks.clone()
    weights = pamr_weights(image, dilations)  # [B, P, H, W]
    offsets = neighbour_offsets(dilations)
    pad = max(dilations)
    for _ in range(iterations):
        padded = F.pad(masks, [pad] * 4, mode="replicate")  # [B, C, H + 2D, W + 2D]
        refined = torch.zeros_like(masks)
        for p, offset in enumerate(offsets):
            refined.addcmul_(weights[:, p : p + 1], _shifted(padded, pad, offset, size))
        del padded
        masks = refined
    return masks
