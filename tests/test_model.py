import pytest
import torch
import torch.nn.functional as F

from kernels.reference import compatibility_reference
from pacl_fast.model import PACL, PACLConfig, compatibility, contrastive_loss
from pacl_fast.profiling import TensorMemoryTracker


def unit(*shape, generator=None):
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


@pytest.mark.parametrize("batch,texts,patches,width", [(3, 5, 37, 16), (1, 1, 1, 8), (7, 2, 83, 24)])
def test_sdpa_form_matches_einsum_with_gradients(batch, texts, patches, width):
    g = torch.Generator().manual_seed(batch * 100 + patches)
    p = unit(batch, patches, width, generator=g).requires_grad_()
    t = unit(texts, width, generator=g).requires_grad_()
    scale = torch.tensor(17.3, requires_grad=True)
    weights = torch.randn(batch, texts, generator=g)

    reference = compatibility_reference(p, t, scale)
    grads_ref = torch.autograd.grad((reference * weights).sum(), (p, t, scale))
    for block in (None, 1, 2):
        fast = compatibility(p, t, scale, block=block)
        assert (fast - reference).abs().max() <= 1e-5
        grads = torch.autograd.grad((fast * weights).sum(), (p, t, scale))
        for got, want in zip(grads, grads_ref):
            assert (got - want).abs().max() <= 1e-5


def test_sdpa_form_uses_10x_less_memory_than_einsum():
    """B = B' = 64, N = 784, E = 512: peak live memory of the forward pass with autograd on
    (what backward keeps plus transients), inputs excluded."""
    torch.manual_seed(0)
    p = unit(64, 784, 512).requires_grad_()
    t = unit(64, 512)
    scale = torch.tensor(23.0)
    peaks = {}
    for name, fn in (("einsum", compatibility_reference), ("sdpa", compatibility)):
        with TensorMemoryTracker() as tracker:
            out = fn(p, t, scale)
        peaks[name] = tracker.peak_bytes
        del out
    ratio = peaks["einsum"] / peaks["sdpa"]
    print(
        f"peak forward memory: einsum {peaks['einsum'] / 2**20:.1f} MiB, sdpa {peaks['sdpa'] / 2**20:.2f} MiB, "
        f"ratio {ratio:.1f}x"
    )
    assert ratio >= 10


def test_loss_single_process_is_symmetric_infonce():
    torch.manual_seed(0)
    p, t = unit(6, 10, 8), unit(6, 8)
    logit_scale, patch_scale = torch.tensor(10.0), torch.tensor(5.0)
    loss = contrastive_loss(p, t, logit_scale, patch_scale)
    logits = logit_scale * compatibility_reference(p, t, patch_scale)
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(loss, expected)


def test_loss_with_gathered_rows_equals_global_loss():
    """Two simulated ranks: the mean of their losses and its gradient equal the global batch's."""
    torch.manual_seed(0)
    p = unit(8, 10, 8).requires_grad_()
    t = unit(8, 8)
    ls, ps = torch.tensor(10.0), torch.tensor(5.0)
    global_loss = contrastive_loss(p, t, ls, ps)
    (global_grad,) = torch.autograd.grad(global_loss, p)

    halves = p.split(4)
    rows = [compatibility(h, t, ps) for h in halves]  # each rank's [4, 8] rows

    def gather(_own_rows):
        return torch.cat(rows)

    losses = [
        contrastive_loss(halves[r], t[4 * r : 4 * r + 4], ls, ps, all_texts=t, gather_rows=gather, offset=4 * r)
        for r in range(2)
    ]
    mean_loss = (losses[0] + losses[1]) / 2
    torch.testing.assert_close(mean_loss, global_loss)
    (grad,) = torch.autograd.grad(mean_loss, p)
    torch.testing.assert_close(grad, global_grad)
    with pytest.raises(ValueError, match="gather_rows"):
        contrastive_loss(halves[0], t[:4], ls, ps, all_texts=t)


def test_pacl_starts_as_clip_projection_and_trains_only_its_own_parameters(tiny_backbone):
    model = PACL(tiny_backbone)
    names = {name for name, p in model.named_parameters() if p.requires_grad} | {"log_patch_logit_scale"}
    assert names == {
        "embedder.linear.weight",
        "embedder.fc1.weight",
        "embedder.fc1.bias",
        "embedder.fc2.weight",
        "embedder.fc2.bias",
        "log_logit_scale",
        "log_patch_logit_scale",
    }
    assert set(model.trainable_state_dict()) == names
    assert all(not p.requires_grad for p in model.backbone.parameters())
    pixels = torch.randn(2, 3, 64, 64)
    tokens = tiny_backbone.patch_tokens(pixels)
    maskclip = F.normalize(tokens @ tiny_backbone.visual.proj, dim=-1)
    torch.testing.assert_close(model.encode_image(pixels), maskclip, atol=1e-5, rtol=1e-5)


def test_pacl_loss_backpropagates_into_embedder_and_temperatures(tiny_pacl):
    tokens = tiny_pacl.backbone.tokenize(["a red circle", "a blue square", "a green triangle"])
    loss = tiny_pacl.loss(torch.randn(3, 3, 64, 64), tokens)
    loss.backward()
    for name, param in tiny_pacl.named_parameters():
        if name.startswith("backbone."):
            assert param.grad is None, name  # the CLIP is frozen
            continue
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert tiny_pacl.log_patch_logit_scale.grad.abs() > 0


def test_config_validation(tiny_backbone):
    with pytest.raises(ValueError, match="patch_temperature"):
        PACLConfig(token_dim=4, embed_dim=4, patch_temperature=0)
    with pytest.raises(ValueError, match="does not fit CLIP"):
        PACL(tiny_backbone, PACLConfig(token_dim=5, embed_dim=64))
    frozen = PACL(
        tiny_backbone, PACLConfig(token_dim=64, embed_dim=64, learn_patch_temperature=False, patch_temperature=0.05)
    )
    assert not frozen.log_patch_logit_scale.requires_grad
    assert float(frozen.patch_logit_scale) == pytest.approx(20.0)
