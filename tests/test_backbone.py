import json
import pickle

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
