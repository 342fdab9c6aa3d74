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
