"""ProxyCLIP and its vision foundation models held to plain float64 references written from the authors' code.

The VFMs are tiny DINO / DINOv2 ViTs built by timm from random weights in the authors' checkpoint
layout (DINOv2's class position inside ``pos_embed``, ``register_tokens``), mapped key by key to
timm's (``vfm.hub_to_timm``), so the mapping, the positional resize and the token order are all held
by :func:`kernels.reference.vit_features_reference`. The CLIP is the tiny random-init open_clip config
with its LayerNorms and biases randomised (``test_methods.randomise``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD  # what every VFM here normalises with
from test_methods import TINY_LS_CONFIG, block_weights, load_randomised

from kernels.reference import proxyclip_reference, vit_features_reference
from pacl_fast.proxyclip import ProxyCLIP, proxy_attention
from pacl_fast.vfm import SPECS, VisionFoundationModel, hub_to_timm

timm = pytest.importorskip("timm")

TINY_VFM = {"embed_dim": 48, "depth": 2, "num_heads": 3}
#: name -> (native image side of the tiny model, an input size that is neither native nor square)
TINY_SIZES = {"dino_vitb8": (64, (48, 80)), "dinov2_vitb14_reg": (56, (42, 70))}


def hub_layout_weights(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of the tiny VFM in its authors' checkpoint layout (every tensor random, LayerNorms too)."""
    spec = SPECS[name]
    side, _ = TINY_SIZES[name]
    vit = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=side, **TINY_VFM)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in vit.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator) * 0.2
        state[key] = 1 + noise if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else noise
    if name == "dinov2_vitb14_reg":  # back to the authors' layout: class position first, registers apart
        grid = (side // spec.patch_size) ** 2
        state["pos_embed"] = torch.randn(1, 1 + grid, TINY_VFM["embed_dim"], generator=generator) * 0.2
        state["register_tokens"] = state.pop("reg_token")
        state["mask_token"] = torch.zeros(1, TINY_VFM["embed_dim"])
    return state


def tiny_vfm(name: str, seed: int) -> tuple[VisionFoundationModel, dict[str, torch.Tensor]]:
    spec = SPECS[name]
    side, _ = TINY_SIZES[name]
    hub = hub_layout_weights(name, seed)
    vit = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=side, **TINY_VFM)
    vit.load_state_dict(hub_to_timm(hub, name))
    return VisionFoundationModel(name, vit, f"{name}@test{seed}"), hub


def cosine_per_patch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double().flatten(0, -2), b.double().flatten(0, -2), dim=-1)


@pytest.mark.parametrize("name", list(SPECS))
def test_vfm_matches_the_authors_hub_model(name):
    vfm, hub = tiny_vfm(name, seed=1)
    spec = SPECS[name]
    _, (height, width) = TINY_SIZES[name]
    pixels = torch.randn(2, 3, height, width)
    out = torch.full((2, height // spec.patch_size, width // spec.patch_size, TINY_VFM["embed_dim"]), float("nan"))
    out[:] = vfm(pixels)
    expected = vit_features_reference(
        pixels,
        hub,
        patch_size=spec.patch_size,
        num_heads=TINY_VFM["num_heads"],
        registers=spec.registers,
        positional_resize=spec.positional_resize,
    )
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_vfm_positional_resize_is_the_authors_not_timms():
    """timm resizes with antialiased bicubic size=; DINO with scale_factor (g + 0.1) / g0 and no antialias."""
    vfm, _ = tiny_vfm("dino_vitb8", seed=2)
    ours = vfm.positional((6, 10), torch.float32)[:, 1:]
    from timm.layers import resample_abs_pos_embed

    timms = resample_abs_pos_embed(vfm.vit.pos_embed, (6, 10), num_prefix_tokens=1)[:, 1:]
    assert not torch.allclose(ours, timms, atol=1e-4)


def test_proxy_attention_defines_fully_masked_rows():
    features = torch.randn(2, 12, 5)
    features[1] = features[1, :1]  # a uniform image: every similarity 1, so every A = gamma * (1 - beta) < 0
    attention = proxy_attention(features)
    assert torch.isfinite(attention).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 12))
    torch.testing.assert_close(attention[1], torch.full((12, 12), 1 / 12))  # softmax of equal A: uniform
    # rows with a kept entry are the authors' exactly: masked entries get nothing
    unit = F.normalize(features[0], dim=-1)
    similarity = unit @ unit.T
    affinity = (similarity - similarity.mean() * 1.2) * 3.0
    assert (attention[0][affinity < 0] == 0).all()
    expected = torch.softmax(affinity.masked_fill(affinity < 0, float("-inf")), dim=-1)
    torch.testing.assert_close(attention[0], expected)


@pytest.fixture(scope="module")
def clip():
    return load_randomised(TINY_LS_CONFIG, 40)


def reference_embeddings(model: ProxyCLIP, pixels: torch.Tensor, hub: dict) -> torch.Tensor:
    """ProxyCLIP's output for CLIP-normalised ``pixels``, from the references and open_clip's own blocks."""
    backbone = model.backbone
    spec = model.vfm.spec
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in backbone.mean_std)
    imagenet = (pixels * std + mean - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    features = vit_features_reference(
        imagenet,
        hub,
        patch_size=spec.patch_size,
        num_heads=TINY_VFM["num_heads"],
        registers=spec.registers,
        positional_resize=spec.positional_resize,
    )
    with torch.no_grad():
        x, grid = backbone.embed_patches(pixels, resize=ProxyCLIP.positional_resize)
        for block in backbone.blocks[:-1]:
            x = block(x)
    visual = backbone.visual
    return proxyclip_reference(
        x,
        block_weights(backbone.blocks[-1]),
        grid,
        features,
        (visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps),
        visual.proj,
    )


@pytest.mark.parametrize("name", list(SPECS))
def test_proxyclip_matches_the_reference(clip, name):
    vfm, hub = tiny_vfm(name, seed=3)
    model = ProxyCLIP(clip, vfm)
    multiple = model.pixel_multiple
    for rows, cols in ((2, 3), (2, 2)):  # non-square and square canvases
        pixels = torch.randn(2, 3, rows * multiple, cols * multiple)
        grid = (rows * multiple // vfm.patch_size, cols * multiple // vfm.patch_size)
        out = torch.full((2, *grid, clip.embed_dim), float("nan"))
        out[:] = model.encode_image(pixels)
        expected = reference_embeddings(model, pixels, hub)
        assert cosine_per_patch(out, expected).min() >= 0.9999
        one_by_one = torch.cat([model.encode_image(pixels[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(out, one_by_one, atol=1e-5, rtol=1e-4)


def test_proxyclip_bf16_stays_close(clip):
    vfm, hub = tiny_vfm("dino_vitb8", seed=4)
    model = ProxyCLIP(clip, vfm)
    pixels = torch.randn(1, 3, 2 * model.pixel_multiple, 3 * model.pixel_multiple)
    expected = reference_embeddings(model, pixels, hub)
    import copy

    low = copy.deepcopy(model).to(torch.bfloat16)
    out = low.encode_image(pixels.to(torch.bfloat16)).float()
    assert cosine_per_patch(out, expected).min() >= 0.999


def test_proxyclip_refuses_sides_that_are_not_both_patch_multiples(clip):
    vfm, _ = tiny_vfm("dinov2_vitb14_reg", seed=5)
    model = ProxyCLIP(clip, vfm)
    assert model.pixel_multiple == torch.lcm(torch.tensor(clip.patch_size), torch.tensor(14)).item()
    with pytest.raises(ValueError, match="the lcm of"):  # ProxyCLIP's own check, not the VFM's
        model.encode_image(torch.randn(1, 3, clip.patch_size * 5, clip.patch_size * 7))
