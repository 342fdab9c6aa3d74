import json
import pickle

import numpy as np
import open_clip
import pytest
import torch
from conftest import quiet_load_clip
from safetensors.torch import save_file

from pacl_fast.backbone import RandomWeightsWarning, load_clip


def test_random_init_warns_and_is_frozen(tiny_config):
    with pytest.warns(RandomWeightsWarning, match="randomly initialised"):
        backbone = load_clip(tiny_config)
    assert backbone.identity.arch.startswith("custom-") and backbone.identity.weights == "random"
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not backbone.clip.training


def test_patch_tokens_match_open_clip_output_tokens(tiny_backbone):
    """At the native size our tokens are open_clip's own (after ln_post, before proj)."""
    pixels = torch.randn(2, 3, 64, 64)
    ours = tiny_backbone.patch_tokens(pixels)  # [2, 8, 8, D]
    visual = tiny_backbone.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(pixels)  # [2, 64, D]
    finally:
        visual.output_tokens = False
    assert ours.shape == (2, 8, 8, tiny_backbone.token_dim)
    torch.testing.assert_close(ours.reshape(2, 64, -1), tokens, atol=1e-5, rtol=1e-5)


def keys_cubic(distance: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.75, as PyTorch's bicubic), at any distance."""
    s = np.abs(distance)
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return np.where(s <= 1, near, np.where(s < 2, far, 0.0))


def bicubic_matrix(source: int, target: int) -> np.ndarray:
    """``[target, source]`` weights of a 1-D bicubic resize, ``align_corners=False``: output ``i`` samples
    the source at ``(i + 0.5) * source / target - 0.5`` from its 4 nearest taps, taps past the border
    clamped to it. Written from the definition (no torch), so that it can stand as the reference."""
    matrix = np.zeros((target, source))
    for i in range(target):
        position = (i + 0.5) * source / target - 0.5
        first = int(np.floor(position)) - 1
        for tap in range(first, first + 4):
            matrix[i, min(max(tap, 0), source - 1)] += keys_cubic(position - tap)
    return matrix


def pattern_backbone(tiny_config):
    """A tiny CLIP whose positional grid is hand-built and asymmetric: channel 0 is the grid row, channel 1
    the grid column, channel 2 their product, the rest random; the class position is its own random row."""
    backbone = quiet_load_clip(tiny_config)
    g0, g1 = backbone.visual.grid_size
    rows, cols = np.meshgrid(np.arange(g0), np.arange(g1), indexing="ij")
    pos = np.random.default_rng(4).normal(size=(1 + g0 * g1, backbone.token_dim))
    pos[1:, 0], pos[1:, 1], pos[1:, 2] = rows.ravel(), cols.ravel(), (rows * (cols + 1)).ravel() / g1
    with torch.no_grad():
        backbone.visual.positional_embedding.copy_(torch.from_numpy(pos))
    return backbone, pos


@pytest.mark.parametrize("grid", [(6, 10), (11, 5), (13, 8)])
def test_positional_embedding_is_an_independent_bicubic_resize(tiny_config, grid):
    """``resize="size"`` at non-square grids equals the bicubic resize written out in numpy: rows stay rows
    (swapped h/w, a transposed grid, bilinear or align_corners=True all fail)."""
    backbone, pos = pattern_backbone(tiny_config)
    g0, g1 = backbone.visual.grid_size
    got = backbone.positional_embedding(grid, torch.float32, torch.device("cpu"), resize="size")
    assert got.shape == (1 + grid[0] * grid[1], backbone.token_dim)
    patches = pos[1:].reshape(g0, g1, -1)  # [g0, g1, D]
    want = np.einsum("ia,jb,abd->ijd", bicubic_matrix(g0, grid[0]), bicubic_matrix(g1, grid[1]), patches)
    np.testing.assert_allclose(got[0].numpy(), pos[0], atol=1e-6, rtol=0)  # the class position is not resized
    np.testing.assert_allclose(got[1:].numpy(), want.reshape(grid[0] * grid[1], -1), atol=1e-5, rtol=0)
    resized = got[1:].reshape(*grid, -1).numpy()  # [h, w, D]
    # The row channel does not change along a row, the column channel not along a column.
    np.testing.assert_allclose(resized[..., 0], resized[:, :1, 0].repeat(grid[1], 1), atol=1e-5, rtol=0)
    np.testing.assert_allclose(resized[..., 1], resized[:1, :, 1].repeat(grid[0], 0), atol=1e-5, rtol=0)
    assert resized[-1, 0, 0] > resized[0, 0, 0] and resized[0, -1, 1] > resized[0, 0, 1]


def test_tokens_at_another_grid_use_the_resized_positions(tiny_config):
    """A 48x80 input (grid 6x10) adds the 6x10 resize, class position first, before ``ln_pre``."""
    backbone, pos = pattern_backbone(tiny_config)
    g0, g1 = backbone.visual.grid_size
    pixels = torch.randn(2, 3, 48, 80)
    want_pos = np.einsum("ia,jb,abd->ijd", bicubic_matrix(g0, 6), bicubic_matrix(g1, 10), pos[1:].reshape(g0, g1, -1))
    want_pos = torch.from_numpy(np.concatenate([pos[:1], want_pos.reshape(60, -1)])).float()  # [61, D]
    visual = backbone.visual
    with torch.no_grad():
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)  # [2, 60, D]
        cls = visual.class_embedding.expand(2, 1, -1)
        want = visual.ln_pre(torch.cat([cls, patches], dim=1) + want_pos)
        got, grid = backbone.embed_patches(pixels)
    assert grid == (6, 10)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_any_grid_and_positional_cache(tiny_backbone):
    tokens = tiny_backbone.patch_tokens(torch.randn(1, 3, 48, 80))
    assert tokens.shape == (1, 6, 10, tiny_backbone.token_dim)
    first = tiny_backbone.positional_embedding((6, 10), torch.float32, torch.device("cpu"))
    again = tiny_backbone.positional_embedding((6, 10), torch.float32, torch.device("cpu"))
    assert first is again and first.shape == (61, tiny_backbone.token_dim)
    native = tiny_backbone.positional_embedding((8, 8), torch.float32, torch.device("cpu"))
    torch.testing.assert_close(native, tiny_backbone.visual.positional_embedding.detach())
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        tiny_backbone.patch_tokens(torch.randn(1, 3, 60, 64))


def test_local_checkpoint_files(tmp_path, tiny_config, tiny_backbone):
    state = tiny_backbone.clip.state_dict()
    pixels = torch.randn(1, 3, 64, 64)
    expected = tiny_backbone.patch_tokens(pixels)

    st_path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st_path))
    from_st = load_clip(tiny_config, st_path)
    torch.testing.assert_close(from_st.patch_tokens(pixels), expected)
    assert from_st.identity.weights.startswith("sha256:")

    pt_path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt_path)
    torch.testing.assert_close(load_clip(tiny_config, pt_path).patch_tokens(pixels), expected)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil_path = tmp_path / "evil.pt"
    with open(evil_path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_clip(tiny_config, evil_path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_clip(tiny_config, tmp_path / "missing.safetensors")


def test_local_dir_layout(tmp_path, tiny_config, tiny_backbone):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config}))
    save_file(
        {k: v.contiguous() for k, v in tiny_backbone.clip.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    backbone = load_clip(f"local-dir:{folder}")
    pixels = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(backbone.patch_tokens(pixels), tiny_backbone.patch_tokens(pixels))
    assert backbone.identity.arch == tiny_backbone.identity.arch
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path / 'nowhere'}")


def test_named_models_and_errors():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("ViT-Nonexistent-1")
    with pytest.raises(FileNotFoundError, match="no/such/file.pt"):
        load_clip("ViT-B-16", "no/such/file.pt")
    with pytest.raises(TypeError, match="clip must be"):
        load_clip(42)


def test_vit_b16_architecture_tokens():
    torch.manual_seed(0)
    backbone = quiet_load_clip("ViT-B-16")
    assert (backbone.token_dim, backbone.embed_dim, backbone.patch_size) == (768, 512, 16)
    assert backbone.identity.arch == "ViT-B-16"
    assert "laion2b_s34b_b88k" in open_clip.list_pretrained_tags_by_model("ViT-B-16")
    with torch.no_grad():
        tokens = backbone.patch_tokens(torch.randn(1, 3, 224, 288))
    assert tokens.shape == (1, 14, 18, 768)


def test_export_leaves_no_traced_tensor_in_the_positional_cache(tiny_config):
    backbone = quiet_load_clip(tiny_config)

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone

        def forward(self, pixels):
            return self.backbone.patch_tokens(pixels)

    torch.export.export(Tokens(), (torch.randn(2, 3, 48, 80),), strict=False)
    assert all(type(v) is torch.Tensor for v in backbone._pos_cache.values())
    assert backbone.patch_tokens(torch.randn(1, 3, 48, 80)).shape == (1, 6, 10, 64)


def test_local_dir_identity_hashes_the_file_open_clip_loads(tmp_path, tiny_config):
    """Issue 10 item 12: with both a .safetensors and a .bin in the folder the identity was the .bin's
    hash while open_clip loaded the safetensors."""
    import json

    from safetensors.torch import save_file

    from pacl_fast.backbone import file_sha256

    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config}))
    torch.manual_seed(0)
    loaded = {k: v.contiguous() for k, v in quiet_load_clip(tiny_config).clip.state_dict().items()}
    save_file(loaded, str(folder / "open_clip_pytorch_model.safetensors"))
    torch.manual_seed(1)
    other = {k: v.contiguous() for k, v in quiet_load_clip(tiny_config).clip.state_dict().items()}
    torch.save(other, folder / "open_clip_pytorch_model.bin")
    backbone = quiet_load_clip(f"local-dir:{folder}")
    assert backbone.identity.weights == f"sha256:{file_sha256(folder / 'open_clip_pytorch_model.safetensors')}"
    name = "visual.conv1.weight"
    torch.testing.assert_close(backbone.clip.state_dict()[name], loaded[name])  # and that is what was loaded
