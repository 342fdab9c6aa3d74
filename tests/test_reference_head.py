import pytest
import torch
import torch.nn.functional as F

from kernels.reference import BACKGROUND, patch_logits, segment_reference, upsample_logits


def test_upsample_is_f_interpolate_without_padding():
    logits = torch.randn(2, 5, 7, 3)
    up = upsample_logits(logits, (23, 61))
    want = F.interpolate(logits.permute(0, 3, 1, 2), size=(23, 61), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, want)


def test_upsample_with_padding_is_scale_factor_interpolate_cropped():
    logits = torch.randn(1, 6, 9, 4)
    extent = (5.25, 8.5)  # the original covers 5.25 x 8.5 of the 6 x 9 cells
    height, width = 37, 70
    up = upsample_logits(logits, (height, width), extent)
    want = F.interpolate(
        logits.permute(0, 3, 1, 2),
        scale_factor=(height / extent[0], width / extent[1]),
        mode="bilinear",
        align_corners=False,
        recompute_scale_factor=False,
    )
    assert want.shape[-2] >= height and want.shape[-1] >= width
    torch.testing.assert_close(up, want[..., :height, :width])


def test_labels_scores_and_background():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4, 5) * 0.1
    labels, scores = segment_reference(logits, (9, 11), logit_scale=50.0)
    up = upsample_logits(logits, (9, 11))
    assert labels.dtype == torch.int16 and scores.dtype == torch.float32 and labels.shape == (2, 9, 11)
    assert torch.equal(labels.long(), up.argmax(1))
    torch.testing.assert_close(scores, torch.softmax(up * 50.0, 1).max(1).values)
    bg_labels, bg_scores = segment_reference(logits, (9, 11), logit_scale=50.0, background_threshold=0.5)
    assert torch.equal(bg_labels == BACKGROUND, scores < 0.5)
    assert torch.equal(bg_labels[scores >= 0.5], labels[scores >= 0.5])


def test_ties_go_to_the_lowest_index():
    logits = torch.zeros(1, 2, 2, 4)
    logits[..., 1] = 1.0
    logits[..., 3] = 1.0
    labels, scores = segment_reference(logits, (5, 5), logit_scale=1.0)
    assert torch.all(labels == 1)
    torch.testing.assert_close(scores, torch.full((1, 5, 5), torch.softmax(torch.tensor([0, 1, 0, 1.0]), 0)[1].item()))


def test_patch_logits_are_cosines():
    patches, classes = torch.randn(1, 2, 3, 8), torch.randn(4, 8)
    want = F.cosine_similarity(patches[..., None, :], classes[None, None, None], dim=-1)
    torch.testing.assert_close(patch_logits(patches, classes), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError):
        patch_logits(patches, torch.randn(4, 7))


def test_exact_upsample_is_atens_up_to_float32_rounding():
    """``upsample_logits_exact`` samples where ATen does (its float32 positions, read from ATen), so ATen's
    float32 upsample is it to within float32 rounding, on padded extents, downsampling and copied axes."""
    from kernels.reference import upsample_logits_exact

    generator = torch.Generator().manual_seed(1)
    for h, w, height, width, extent in [
        (5, 7, 23, 61, None),
        (6, 9, 37, 70, (5.25, 8.5)),
        (6, 6, 6, 20, (4.5, 4.5)),
        (9, 14, 50, 83, None),
        (14, 14, 480, 640, None),
        (11, 13, 4, 5, None),
    ]:
        logits = torch.randn(2, h, w, 3, generator=generator)
        exact = upsample_logits_exact(logits, (height, width), extent)
        assert exact.dtype == torch.float64 and exact.shape == (2, 3, height, width)
        float32 = upsample_logits(logits, (height, width), extent).double()
        assert (float32 - exact).abs().max() <= 2 * torch.finfo(torch.float32).eps * logits.abs().max()


def test_scores_are_the_float64_softmax_rounded_once():
    """Where the sampling positions are exact in any precision (integer scale factors), the reference is
    F.interpolate + softmax + argmax in float64: labels equal, scores the float64 ones rounded to float32."""
    generator = torch.Generator().manual_seed(2)
    logits = 0.05 * torch.randn(2, 4, 5, 30, generator=generator)
    labels, scores = segment_reference(logits, (16, 40), logit_scale=100.0)
    exact = F.interpolate(logits.double().permute(0, 3, 1, 2), size=(16, 40), mode="bilinear", align_corners=False)
    probabilities = torch.softmax(exact * 100.0, dim=1)  # [B, C, H, W] float64
    assert torch.equal(labels.long(), exact.argmax(1))
    assert scores.dtype == torch.float32
    assert ((scores.double() - probabilities.amax(1)).abs() <= 2**-25 * 1.0001).all()
