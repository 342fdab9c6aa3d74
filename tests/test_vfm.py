"""Loading a VFM's weights: built on the meta device with the file's tensors assigned (no random init), held to
the plain way (timm's random init, then ``load_state_dict``) tensor by tensor and on an image.

Every tensor of the weights is random (LayerNorms and layer-scales too, not timm's ones and zeros), so a tensor
left as timm initialises it, or taken from the wrong key, shows.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_proxyclip import TINY_SIZES, TINY_VFM, hub_layout_weights

from pacl_fast.vfm import SPECS, VisionFoundationModel, hub_to_timm, load_vfm, vit_with_weights

timm = pytest.importorskip("timm")


def plain_vit(name: str, state: dict[str, torch.Tensor], **options) -> torch.nn.Module:
    """The plain way: timm's model, randomly initialised, then the weights loaded over it."""
    vit = timm.create_model(SPECS[name].timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **options)
    vit.load_state_dict(state)
    return vit


def random_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for the full-size VFM ``name``, timm's key names (shapes from a meta-device build)."""
    with torch.device("meta"):
        shapes = timm.create_model(SPECS[name].timm_name, pretrained=False, num_classes=0).state_dict()
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(tensor.shape, generator=generator) * 0.05 for key, tensor in shapes.items()}


def assert_same_model(fast: torch.nn.Module, plain: torch.nn.Module) -> None:
    """Equal parameter by parameter and buffer by buffer (names, shapes, dtypes, values, grad flags), nothing on
    the meta device, and the same modules (their reprs name every layer's settings)."""
    assert repr(fast) == repr(plain)
    for kind in ("named_parameters", "named_buffers"):
        ours, theirs = dict(getattr(fast, kind)()), dict(getattr(plain, kind)())
        assert ours.keys() == theirs.keys(), kind
        for key, tensor in ours.items():
            assert not tensor.is_meta, key
            assert (tensor.dtype, tensor.shape, tensor.requires_grad) == (
                theirs[key].dtype,
                theirs[key].shape,
                theirs[key].requires_grad,
            ), key
            assert torch.equal(tensor, theirs[key]), key
    for module in fast.modules():  # tensors timm keeps outside parameters and buffers
        assert not any(isinstance(v, torch.Tensor) and v.is_meta for v in vars(module).values()), module


def assert_same_features(name: str, fast: torch.nn.Module, plain: torch.nn.Module, size: tuple[int, int]) -> None:
    """The two give the same patch tokens, exactly, at an input size that resizes the positional embeddings."""
    spec = SPECS[name]
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    grid = (size[0] // spec.patch_size, size[1] // spec.patch_size)
    out = torch.full((2, *grid, fast.embed_dim), float("nan"))
    out[:] = VisionFoundationModel(name, fast, "fast")(pixels)
    expected = VisionFoundationModel(name, plain, "plain")(pixels)
    assert torch.isfinite(out).all()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", list(SPECS))
def test_tiny_vfm_built_on_meta_equals_the_plain_way(name):
    side, size = TINY_SIZES[name]
    options = {"img_size": side, **TINY_VFM}
    state = hub_to_timm(hub_layout_weights(name, seed=3), name)
    plain = plain_vit(name, state, **options)
    fast = vit_with_weights(name, {k: v.clone() for k, v in state.items()}, "tiny.pth", **options)
    assert_same_model(fast, plain)
    assert_same_features(name, fast, plain, size)


@pytest.mark.parametrize("name", list(SPECS))
def test_full_size_vfm_loads_without_random_init_and_equals_the_plain_way(name, tmp_path):
    """The real architectures (DINO ViT-B/8, DINOv2 ViT-B/14 with registers) from a safetensors file: the load
    draws no random numbers (timm's init of 86M parameters, overwritten by the file, is not run) and gives the
    model the plain way gives. DINOv2's file is in its authors' layout (class position inside ``pos_embed``,
    ``register_tokens``), so the mapped tensors are views and sums, not the file's tensors as they are."""
    state = random_state(name, seed=7)
    hub = dict(state)
    if name == "dinov2_vitb14_reg":
        generator = torch.Generator().manual_seed(8)
        hub["pos_embed"] = torch.cat([torch.randn(1, 1, 768, generator=generator) * 0.05, state["pos_embed"]], 1)
        hub["register_tokens"] = hub.pop("reg_token")
        hub["mask_token"] = torch.zeros(1, 768)
    path = tmp_path / f"{name}.safetensors"
    save_file(hub, str(path))
    rng = torch.get_rng_state()
    vfm = load_vfm(name, path)
    assert torch.equal(torch.get_rng_state(), rng), "the load drew random numbers: timm's random init ran"
    assert vfm.identity.startswith(f"{name}@sha256:")
    plain = plain_vit(name, hub_to_timm(hub, name)).requires_grad_(False)  # a VFM is frozen
    assert_same_model(vfm.vit, plain)
    patch = SPECS[name].patch_size
    assert_same_features(name, vfm.vit, plain, (5 * patch, 7 * patch))


def test_weights_that_do_not_fit_are_refused_naming_the_file(tmp_path):
    """Checked against the meta-device build's shapes: a key too many, a shape off, a NaN; each names the file."""
    name = "dino_vitb8"
    side, _ = TINY_SIZES[name]
    options = {"img_size": side, **TINY_VFM}
    state = hub_to_timm(hub_layout_weights(name, seed=4), name)
    with pytest.raises(ValueError, match=r"vfm_weights x.pth do not fit dino_vitb8: missing \[\], unexpected \['extra"):
        vit_with_weights(name, {**state, "extra": torch.zeros(1)}, "x.pth", **options)
    with pytest.raises(ValueError, match=r"vfm_weights x.pth: cls_token is \(1, 1, 4\), dino_vitb8 needs \(1, 1, 48\)"):
        vit_with_weights(name, {**state, "cls_token": torch.zeros(1, 1, 4)}, "x.pth", **options)
    with pytest.raises(ValueError, match="vfm_weights x.pth: norm.bias holds non-finite values"):
        vit_with_weights(name, {**state, "norm.bias": torch.full((48,), float("nan"))}, "x.pth", **options)


class BlockWithAConstant(timm.models.vision_transformer.Block):
    """A block that computes a tensor at init which no weights file holds (as rope tables are): a non-persistent
    buffer, and a plain tensor attribute."""

    def __init__(self, dim: int, *args, **kwargs):
        super().__init__(dim, *args, **kwargs)
        self.register_buffer("table", torch.arange(dim, dtype=torch.float32).sin(), persistent=False)
        self.offsets = torch.linspace(0, 1, 5)


class BlockThatNeedsMemory(timm.models.vision_transformer.Block):
    """A block whose init reads a value (``.item()``), which the meta device cannot give."""

    def __init__(self, dim: int, *args, **kwargs):
        super().__init__(dim, *args, **kwargs)
        self.heads_seen = int(torch.tensor(float(kwargs.get("num_heads", args[0] if args else 1))).item())


@pytest.mark.parametrize("block", [BlockWithAConstant, BlockThatNeedsMemory])
def test_a_vit_the_meta_build_cannot_give_is_built_the_plain_way(block):
    """Tensors timm computes at init and the weights do not hold must not be left on the meta device (or as
    garbage): such a ViT, or one that cannot be built on the meta device, is built the plain way, equal to it."""
    name = "dinov2_vitb14_reg"
    side, size = TINY_SIZES[name]
    options = {"img_size": side, "block_fn": block, **TINY_VFM}
    state = hub_to_timm(hub_layout_weights(name, seed=6), name)
    plain = plain_vit(name, state, **options)
    fast = vit_with_weights(name, {k: v.clone() for k, v in state.items()}, "tiny.pth", **options)
    assert_same_model(fast, plain)
    for ours, theirs in zip(fast.blocks, plain.blocks):
        if block is BlockWithAConstant:
            assert torch.equal(ours.offsets, theirs.offsets) and torch.equal(ours.table, theirs.table)
    assert_same_features(name, fast, plain, size)


def test_a_training_checkpoint_is_refused_by_its_wrapper(tmp_path):
    """DINO's training checkpoints wrap the backbone (``teacher``...): a .pth of one is refused by that name, not
    as "not a flat dict" (the wrapper check ran after the flat-dict one and could never say it)."""
    from pacl_fast.vfm import read_weights_file

    path = tmp_path / "dino_checkpoint.pth"
    torch.save({"teacher": {"cls_token": torch.zeros(1, 1, 4)}}, path)
    with pytest.raises(ValueError, match="holds a 'teacher' dict: pass the backbone's own state dict"):
        read_weights_file(path)
