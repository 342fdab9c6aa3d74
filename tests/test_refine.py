"""PAMR (pacl_fast.refine) against a pixel-by-pixel loop of the definition, and its properties."""

import numpy as np
import pytest
import torch

from pacl_fast.refine import pamr, pamr_weights


def pamr_loops(image: np.ndarray, masks: np.ndarray, iterations: int, dilations: tuple[int, ...]) -> np.ndarray:
    """Araslanov & Roth's PAMR written pixel by pixel in float64, straight from the definition.

    Neighbours of (y, x): (y + dy * d, x + dx * d) for each dilation d and each of the 8 directions,
    clamped to the image; sigma per channel over the pixel and its 8 neighbours, once per dilation
    (unbiased); weights = softmax over neighbours of -mean_k |I_i - I_j| / (1e-8 + 0.1 sigma).
    """
    batch, channels, height, width = image.shape
    directions = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in directions]

    def at(array, b, k, y, x):
        return array[b, k, min(max(y, 0), height - 1), min(max(x, 0), width - 1)]

    weights = np.zeros((batch, len(offsets), height, width))
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                affinity = np.zeros(len(offsets))
                for k in range(channels):
                    values = []
                    for d in dilations:
                        values.append(image[b, k, y, x])
                        values += [at(image, b, k, y + dy * d, x + dx * d) for dy, dx in directions]
                    sigma = np.std(values, ddof=1)
                    for p, (oy, ox) in enumerate(offsets):
                        diff = abs(image[b, k, y, x] - at(image, b, k, y + oy, x + ox))
                        affinity[p] -= diff / (1e-8 + 0.1 * sigma) / channels
                exp = np.exp(affinity - affinity.max())
                weights[b, :, y, x] = exp / exp.sum()
    current = masks.astype(np.float64).copy()
    for _ in range(iterations):
        refined = np.zeros_like(current)
        for b in range(batch):
            for c in range(current.shape[1]):
                for y in range(height):
                    for x in range(width):
                        total = 0.0
                        for p, (oy, ox) in enumerate(offsets):
                            total += weights[b, p, y, x] * at(current, b, c, y + oy, x + ox)
                        refined[b, c, y, x] = total
        current = refined
    return current


@pytest.mark.parametrize(
    ("shape", "classes", "iterations", "dilations"),
    [((5, 7), 3, 3, (1, 2)), ((6, 4), 2, 2, (8, 16)), ((3, 9), 4, 1, (1,)), ((7, 5), 1, 4, (2, 3))],
)
def test_pamr_equals_the_pixel_loop_definition(shape, classes, iterations, dilations):
    generator = torch.Generator().manual_seed(sum(shape) + classes)
    image = torch.rand(2, 3, *shape, generator=generator, dtype=torch.float64) * 2 - 1
    image[1, :, :2] = 0.25  # a flat patch: sigma 0 there
    masks = torch.randn(2, classes, *shape, generator=generator, dtype=torch.float64)
    expected = pamr_loops(image.numpy(), masks.numpy(), iterations, dilations)
    refined = pamr(image, masks, iterations, dilations)
    assert refined.dtype == torch.float64 and refined.shape == masks.shape
    np.testing.assert_allclose(refined.numpy(), expected, rtol=1e-10, atol=1e-12)
    # float32 inputs: float32 out, same numbers to float32 accuracy
    single = pamr(image.float(), masks.float(), iterations, dilations)
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_convex_combination_properties():
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 13, 11, generator=generator)
    logits = torch.randn(1, 5, 13, 11, generator=generator)
    probabilities = logits.softmax(dim=1)
    refined = pamr(image, probabilities, 10, (8, 16))
    # per-pixel sums over classes are kept (the same weights for every class)
    torch.testing.assert_close(refined.sum(dim=1), torch.ones(1, 13, 11))
    # values stay within each class's range; a constant map stays constant
    assert (refined.amin(dim=(2, 3)) >= probabilities.amin(dim=(2, 3)) - 1e-6).all()
    assert (refined.amax(dim=(2, 3)) <= probabilities.amax(dim=(2, 3)) + 1e-6).all()
    constant = torch.full((1, 2, 13, 11), 0.3)
    torch.testing.assert_close(pamr(image, constant), constant)
    # the weights are a distribution over the 16 neighbours
    weights = pamr_weights(image, (8, 16))
    assert weights.shape == (1, 16, 13, 11)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1, 13, 11))


def test_image_scaling_per_channel_does_not_matter_and_flat_images_average():
    generator = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 9, 10, generator=generator, dtype=torch.float64)
    masks = torch.randn(1, 4, 9, 10, generator=generator, dtype=torch.float64)
    scale = torch.tensor([255.0, -0.5, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    shift = torch.tensor([-0.48, 7.0, 0.1], dtype=torch.float64).view(1, 3, 1, 1)
    # equal up to the 1e-8 added to 0.1 * sigma (a relative 1e-6 of the affinities here)
    torch.testing.assert_close(pamr(image * scale + shift, masks), pamr(image, masks), rtol=1e-4, atol=1e-4)
    # a flat image gives uniform weights: one step is the mean of the 16 clamped neighbours
    flat = torch.full((1, 3, 9, 10), 0.7, dtype=torch.float64)
    assert torch.allclose(pamr_weights(flat, (1, 2)), torch.full((1, 16, 9, 10), 1 / 16, dtype=torch.float64))
    expected = pamr_loops(flat.numpy(), masks.numpy(), 1, (1, 2))
    np.testing.assert_allclose(pamr(flat, masks, 1, (1, 2)).numpy(), expected, rtol=1e-10)


def test_edges_of_the_image_stop_the_smoothing():
    # Two flat halves of different colour and a mask that follows them: PAMR keeps the step (weights
    # across the edge are exp(-20) or less), while on a flat image the same mask is blurred.
    image = torch.zeros(1, 3, 20, 24)
    image[..., 12:] = torch.tensor([0.9, 0.2, 0.5]).view(1, 3, 1, 1)
    step = torch.zeros(1, 2, 20, 24)
    step[:, 0, :, :12] = 1
    step[:, 1, :, 12:] = 1
    torch.testing.assert_close(pamr(image, step, 10, (8, 16)), step, rtol=0, atol=1e-6)
    blurred = pamr(torch.zeros(1, 3, 20, 24), step, 10, (8, 16))
    assert (blurred[0, 0, :, 11] - 1).abs().min() > 0.1


def test_masks_of_another_size_are_resized_first_and_bad_input_is_named():
    image = torch.rand(1, 3, 8, 6)
    small = torch.rand(1, 2, 4, 3)
    resized = torch.nn.functional.interpolate(small, size=(8, 6), mode="bilinear", align_corners=True)
    torch.testing.assert_close(pamr(image, small, 0), resized)
    torch.testing.assert_close(pamr(image, small, 2, (1,)), pamr(image, resized, 2, (1,)))
    with pytest.raises(TypeError, match=r"image must be a float tensor \[B, 3, H, W\]"):
        pamr(torch.zeros(3, 8, 6), small)
    with pytest.raises(TypeError, match="masks must be a float tensor"):
        pamr(image, torch.zeros(1, 2, 8, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="masks hold 2 images but image holds 1"):
        pamr(image, torch.zeros(2, 2, 8, 6))
    with pytest.raises(ValueError, match="iterations must be an integer >= 0"):
        pamr(image, small, -1)
    with pytest.raises(ValueError, match="dilations must be a non-empty sequence of integers >= 1"):
        pamr(image, small, 1, (0, 2))


def test_resized_input_guide_is_naclips_bilinear_resize():
    """naclip.py l. 130: bilinear, align_corners=False. A 2x2 input to 4x4: the corners keep their values,
    the half-pixel centres blend 3:1 (values written out)."""
    from pacl_fast.refine import resized_input_guide

    pixels = torch.tensor([[0.0, 4.0], [8.0, 12.0]]).expand(1, 3, 2, 2)
    guide = resized_input_guide(pixels, (4, 4))
    assert guide.shape == (1, 3, 4, 4)
    row = torch.tensor([0.0, 1.0, 3.0, 4.0])
    expected = torch.stack([row, row + 2, row + 6, row + 8])  # rows 0, 0.25, 0.75, 1 of the way down
    torch.testing.assert_close(guide[0, 1], expected)
    with pytest.raises(ValueError, match=r"pixels must be float \[B, 3, h, w\]"):
        resized_input_guide(torch.zeros(3, 2, 2), (4, 4))
