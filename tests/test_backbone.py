import errno
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_load_clip
from PIL import Image
from safetensors.torch import save_file

from pacl_fast.backbone import RandomWeightsWarning, load_clip

ROOT = Path(__file__).resolve().parent.parent


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
    with open(evil_path, "wb") as f:  # protocol 2, torch.save's: refused for the global it calls, not its opcodes
        pickle.dump({"state_dict": Evil()}, f, protocol=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"(?s)weights_only=True.*Unsupported global: GLOBAL [\w.]*print"):
            load_clip(tiny_config, evil_path)
    assert not caught, [str(warning.message) for warning in caught]  # torch warns of pickle protocols above 2
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_clip(tiny_config, tmp_path / "missing.safetensors")
    # weights_only=True admits ints and lists: one where a tensor belongs is an error naming the file and entry
    odd_path = tmp_path / "odd.pt"
    torch.save({**state, "logit_scale": 3}, odd_path)
    with pytest.raises(ValueError, match=r"odd.pt holds entries that are not tensors: \['logit_scale'\]"):
        load_clip(tiny_config, odd_path)


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


# --- pretrained tags: their own settings, and their weights without the network (issues 19, 24) ------------

STAND_IN_MEAN, STAND_IN_STD = (0.5, 0.25, 0.75), (0.2, 0.3, 0.4)


def save_weights(model, path, dtype=None):
    """``model``'s state dict as a safetensors file (what the hub serves for a tag)."""
    save_file({k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


class HubStandIn:
    """open_clip's hub download (``open_clip.pretrained.hf_hub_download``, third-party) redirected: a cache hit
    serves ``files[filename]``, anything else raises the hub client's own cache-miss error. Records every call
    with whether the hub client was in offline mode (no requests, no retries) at that moment."""

    def __init__(self, files=None, error=None):
        self.files, self.error, self.calls = files or {}, error, []

    def __call__(self, repo_id, filename, **kwargs):
        from huggingface_hub import constants
        from huggingface_hub.errors import LocalEntryNotFoundError

        self.calls.append((repo_id, filename, constants.HF_HUB_OFFLINE))
        if self.error is not None:
            raise self.error
        if filename in self.files:
            return str(self.files[filename])
        raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not in the cache and offline mode is enabled")


@pytest.fixture()
def stand_in(monkeypatch, tiny_config, tmp_path):
    """A pretrained tag ``stand_in`` of a registered open_clip model ``pacl-tiny`` (and ``pacl-tiny-quickgelu``),
    recorded as QuickGELU with its own mean/std, exactly as open_clip records OpenAI's tags; its hub weights
    are a local file of random weights. Returns (the file, the hub stand-in)."""
    from open_clip import factory, pretrained

    monkeypatch.setitem(factory._MODEL_CONFIGS, "pacl-tiny", dict(tiny_config))
    monkeypatch.setitem(factory._MODEL_CONFIGS, "pacl-tiny-quickgelu", {**tiny_config, "quick_gelu": True})
    entry = {"hf_hub": "pacl-test/tiny-stand-in/", "quick_gelu": True, "mean": STAND_IN_MEAN, "std": STAND_IN_STD,
             "interpolation": "bicubic", "resize_mode": "shortest"}  # fmt: skip
    monkeypatch.setitem(pretrained._PRETRAINED, "pacl-tiny", {"stand_in": entry, "plain": {"hf_hub": "pacl-test/p/"}})
    monkeypatch.setitem(pretrained._PRETRAINED, "pacl-tiny-quickgelu", {"stand_in": dict(entry)})
    torch.manual_seed(3)
    weights = save_weights(open_clip.create_model("pacl-tiny-quickgelu"), tmp_path / "open_clip_model.safetensors")
    hub = HubStandIn({"open_clip_model.safetensors": weights})
    monkeypatch.setattr(pretrained, "hf_hub_download", hub)
    return weights, hub


def frozen(clip):
    """An open_clip model held as pacl-fast holds its CLIP (eval, no gradients: PyTorch then picks the same
    attention kernels for both, so equal computations give equal bits)."""
    return clip.eval().requires_grad_(False)


def tower_outputs(clip, pixels, tokens):
    """Both towers of an open_clip CLIP on the same inputs: image embeddings, text embeddings (unnormalised)."""
    with torch.no_grad():
        return clip.encode_image(pixels), clip.encode_text(tokens)


def activations(clip) -> set:
    return {type(block.mlp.gelu).__name__ for tower in (clip.visual.transformer, clip.transformer)
            for block in tower.resblocks}  # fmt: skip


def test_pretrained_settings_are_the_tags_own():
    from pacl_fast.backbone import pretrained_settings

    assert pretrained_settings("ViT-B-16", "openai")["quick_gelu"] is True  # OpenAI's weights: QuickGELU
    assert pretrained_settings("ViT-B-16-quickgelu", "openai")["quick_gelu"] is True
    assert not pretrained_settings("ViT-B-16", "laion2b_s34b_b88k").get("quick_gelu", False)
    assert pretrained_settings("ViT-B-16-SigLIP", "webli")["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"'ViT-B-16' has no pretrained tag 'opneai'; its tags: openai, laion400m"):
        pretrained_settings("ViT-B-16", "opneai")
    with pytest.raises(ValueError, match=r"tag 'laion2b_s34b_b88k' \(ViT-B-16 has it\); its tags: openai, dfn2b"):
        pretrained_settings("ViT-B-16-quickgelu", "laion2b_s34b_b88k")


def test_a_tag_gets_its_own_activation_whatever_the_config_name(stand_in):
    """``pacl-tiny`` (a GELU config) + a QuickGELU tag equals open_clip's ``pacl-tiny-quickgelu`` on the same
    weights, tower by tower; open_clip's own factory would build GELU and only warn."""
    weights, hub = stand_in
    reference = frozen(open_clip.create_model("pacl-tiny-quickgelu", pretrained=str(weights)))
    gelu = frozen(open_clip.create_model("pacl-tiny", pretrained=str(weights)))
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randn(2, 3, 64, 64, generator=generator)
    tokens = open_clip.get_tokenizer("pacl-tiny")(["a photo of a circle", "a red star"])
    want = tower_outputs(reference, pixels, tokens)
    assert activations(gelu) == {"GELU"} and activations(reference) == {"QuickGELU"}
    for name in ("pacl-tiny", "pacl-tiny-quickgelu"):
        backbone = load_clip(name, "stand_in")
        assert activations(backbone.clip) == {"QuickGELU"}, name
        got = tower_outputs(backbone.clip, pixels, tokens)
        for tower, ours, theirs, wrong in zip(("image", "text"), got, want, tower_outputs(gelu, pixels, tokens)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"{name}: {tower} tower")
            assert (ours - wrong).abs().max() > 1e-3, f"{name}: the {tower} tower does not see the activation"
        torch.testing.assert_close(backbone.encode_text(tokens), F.normalize(want[1], dim=-1), rtol=1e-5, atol=1e-6)
        # the tag's other settings, and one identity for the two spellings of the same computation
        assert backbone.mean_std == (STAND_IN_MEAN, STAND_IN_STD)
        assert str(backbone.identity) == "pacl-tiny-quickgelu@stand_in"
        assert backbone.model_cfg["quick_gelu"] is True  # keys the text and export caches
    assert all(offline for _, _, offline in hub.calls)  # tests run offline: served from the "cache"
    plain = load_clip("pacl-tiny", str(weights))  # a local file records nothing: its config decides
    assert activations(plain.clip) == {"GELU"} and plain.identity.arch == "pacl-tiny"
    assert activations(load_clip("pacl-tiny-quickgelu", str(weights)).clip) == {"QuickGELU"}


def test_a_local_dir_config_can_say_quick_gelu(tmp_path, tiny_config):
    folder = tmp_path / "clip"
    folder.mkdir()
    config = {**tiny_config, "quick_gelu": True}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    torch.manual_seed(4)
    save_weights(open_clip.CLIP(**config), folder / "open_clip_model.safetensors")
    assert activations(load_clip(f"local-dir:{folder}").clip) == {"QuickGELU"}


@pytest.mark.slow
def test_vit_b16_openai_is_open_clips_quickgelu_model(monkeypatch, tmp_path):
    """The real registry entry: ``ViT-B-16`` + ``openai`` (hub download redirected to random weights) equals
    open_clip's ``ViT-B-16-quickgelu`` on the same file, both towers; ``--clip ViT-B-16-quickgelu`` works too."""
    from open_clip import pretrained

    torch.manual_seed(6)
    weights = save_weights(open_clip.create_model("ViT-B-16-quickgelu"), tmp_path / "w.safetensors", torch.float16)
    monkeypatch.setattr(pretrained, "hf_hub_download", HubStandIn({"open_clip_model.safetensors": weights}))
    reference = frozen(open_clip.create_model("ViT-B-16-quickgelu", pretrained=str(weights)))
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    tokens = open_clip.get_tokenizer("ViT-B-16")(["a photo of a dog"])
    want = tower_outputs(reference, pixels, tokens)
    for name in ("ViT-B-16", "ViT-B-16-quickgelu"):
        backbone = load_clip(name, "openai")
        assert activations(backbone.clip) == {"QuickGELU"} and str(backbone.identity) == "ViT-B-16-quickgelu@openai"
        for ours, theirs in zip(tower_outputs(backbone.clip, pixels, tokens), want):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def assert_quiet(caplog):
    """Nothing from open_clip or the hub client at WARNING or above, and no retries."""
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or "etry" in r.getMessage()]
    assert not loud, [r.getMessage() for r in loud]


def test_offline_tag_fails_at_once_in_one_line(stand_in, monkeypatch, caplog):
    """HF_HUB_OFFLINE and a cache miss: one WeightsUnavailableError within seconds, saying what to do."""
    from huggingface_hub import constants

    from pacl_fast.backbone import WeightsUnavailableError

    _, hub = stand_in
    hub.files.clear()  # not in the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    caplog.set_level(logging.INFO)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as caught:
        load_clip("pacl-tiny", "stand_in")
    assert time.perf_counter() - start < 5
    message = str(caught.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message and "not in the local hub cache" in message
    assert "pacl-test/tiny-stand-in" in message and "--clip pacl-tiny-quickgelu --clip-weights PATH" in message
    assert hub.calls and all(offline for _, _, offline in hub.calls)
    assert_quiet(caplog)


def test_no_network_is_found_fast_and_only_the_cache_is_asked(stand_in, monkeypatch, caplog):
    """HF_HUB_OFFLINE unset, the hub's host unreachable (the socket layer refuses): the hub client is only
    ever called in offline mode, so it makes no request and no retry; a cached file still loads."""
    from huggingface_hub import constants

    from pacl_fast.backbone import WeightsUnavailableError

    weights, hub = stand_in
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    dialled = []

    def unreachable(address, timeout=None, **kwargs):
        dialled.append((address, timeout))
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    caplog.set_level(logging.INFO)
    assert activations(load_clip("pacl-tiny", "stand_in").clip) == {"QuickGELU"}  # a cache hit works offline
    hub.files.clear()
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match=r"no network \(huggingface.co:443 does not answer: Network is "
                       r"unreachable\), and they are not in the local hub cache"):  # fmt: skip
        load_clip("pacl-tiny", "stand_in")
    assert time.perf_counter() - start < 5
    assert dialled and all(timeout <= 5 for _, timeout in dialled)
    assert constants.HF_HUB_OFFLINE is False  # restored
    assert hub.calls and all(offline for _, _, offline in hub.calls)
    assert_quiet(caplog)


def test_hub_errors_with_a_network_are_one_line(stand_in, monkeypatch):
    from huggingface_hub import constants

    from pacl_fast.backbone import WeightsUnavailableError

    _, hub = stand_in
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    class Connected:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: Connected())
    hub.error = RuntimeError("401 Client Error\nRepository Not Found for url: https://huggingface.co/...")
    with pytest.raises(WeightsUnavailableError) as caught:
        load_clip("pacl-tiny", "stand_in")
    message = str(caught.value)
    assert "\n" not in message and "401 Client Error Repository Not Found" in message
    assert not hub.calls[-1][2]  # with a network the hub client was asked normally


def test_real_hub_client_offline_with_an_empty_cache(monkeypatch, tmp_path, caplog):
    """No stand-in: open_clip's registry and the real hub client, offline, nothing cached (the Quick-start
    command on a machine without network)."""
    from huggingface_hub import constants

    from pacl_fast.backbone import WeightsUnavailableError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    caplog.set_level(logging.INFO)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="laion/CLIP-ViT-B-16-laion2B-s34B-b88K") as caught:
        load_clip("ViT-B-16", "laion2b_s34b_b88k")
    assert time.perf_counter() - start < 10 and "--clip-weights PATH" in str(caught.value)
    assert_quiet(caplog)
    with pytest.raises(ValueError, match="has no pretrained tag 'laion2b'; its tags: openai"):
        load_clip("ViT-B-16", "laion2b")


def test_cli_prints_one_line_offline(monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    from pacl_fast.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    argv = ["segment", str(image), "--labels", "a,b", "--out", str(tmp_path / "o"), "--clip", "ViT-B-16",
            "--clip-weights", "laion2b_s34b_b88k", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("pacl-fast segment: error: cannot get the weights")
    assert "Traceback" not in err and "etry" not in err and "thrown while requesting" not in err


def test_weights_we_load_are_not_called_random(stand_in, caplog):
    """open_clip logs "No pretrained weights loaded ... initialized randomly" when it builds the model that
    load_clip then fills from the file: not said."""
    weights, _ = stand_in
    caplog.set_level(logging.INFO)
    load_clip("pacl-tiny", str(weights))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_truncated_or_broken_weights_files_are_named(tmp_path, tiny_config, tiny_backbone):
    whole = save_weights(tiny_backbone.clip, tmp_path / "whole.safetensors")
    data = whole.read_bytes()
    cases = {
        "truncated.safetensors": (data[:-100], "is truncated: its header describes"),
        "header.safetensors": (data[:200], "not a whole safetensors file"),
        "empty.safetensors": (b"", "not a whole safetensors file"),
        "longer.safetensors": (data + b"\0" * 8, "longer than its header says"),
        "garbage.safetensors": (len(b"{nope").to_bytes(8, "little") + b"{nope", "broken safetensors header"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=expected) as caught:
            load_clip(tiny_config, path)
        assert str(path) in str(caught.value), name
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config}))
    (folder / "open_clip_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"open_clip_model\.safetensors is truncated"):
        load_clip(f"local-dir:{folder}")
    (folder / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"open_clip_config\.json is not an open_clip config"):
        load_clip(f"local-dir:{folder}")


def test_cli_names_a_truncated_clip_file_in_one_line(tmp_path, tiny_config, tiny_backbone, capsys):
    from pacl_fast.cli import main

    data = save_weights(tiny_backbone.clip, tmp_path / "w.safetensors").read_bytes()
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config}))
    (folder / "open_clip_model.safetensors").write_bytes(data[:-1000])
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    argv = ["segment", str(image), "--labels", "a,b", "--out", str(tmp_path / "o"), "--clip", f"local-dir:{folder}",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: CLIP weights file {folder / 'open_clip_model.safetensors'} is truncated" in err


# --- construction without random init (issue 20, "Cold and warm") -------------------------------------------


def assert_same_model(fast, plain):
    """Every parameter and buffer (the non-persistent causal masks too) of ``fast`` is ``plain``'s: names,
    dtypes, shapes, strides, requires_grad and bits; none is left on the meta device, none shares storage."""
    for kind in ("named_parameters", "named_buffers"):
        got, want = dict(getattr(fast, kind)()), dict(getattr(plain, kind)())
        assert got.keys() == want.keys(), kind
        for name, tensor in want.items():
            other = got[name]
            assert not other.is_meta, name
            assert (other.dtype, other.shape, other.stride()) == (tensor.dtype, tensor.shape, tensor.stride()), name
            assert other.requires_grad == tensor.requires_grad, name
            assert torch.equal(other, tensor), name
    storages = [t.untyped_storage().data_ptr() for t in (*fast.parameters(), *fast.buffers()) if t.numel()]
    assert len(storages) == len(set(storages))


@pytest.fixture()
def no_random_init(monkeypatch):
    """Counts calls of torch's initialisers on tensors with memory: a model built the plain way makes hundreds
    (built on the meta device, open_clip calls them too, on tensors that have none)."""
    calls = []
    for name in ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "constant_"):
        original = getattr(torch.nn.init, name)

        def counted(tensor, *args, _original=original, _name=name, **kwargs):
            if not tensor.is_meta:
                calls.append(_name)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, counted)
    return calls


def plain_model(build, path):
    """What load_clip built before: the model randomly initialised, then the file copied into it."""
    from pacl_fast.backbone import _load_into

    model = build()
    _load_into(model, path)
    return model.requires_grad_(False).eval()


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_weights_file_model_is_built_empty_and_equals_the_plain_one(tmp_path, tiny_config, no_random_init, dtype):
    """A config dict with a weights file: built on the meta device, the file's tensors assigned (fp16 files
    rounded to the model's fp32 as copy_ would), the causal mask rebuilt: equal to the plain build, bit for bit,
    and not one random initialiser run."""
    torch.manual_seed(5)
    path = save_weights(open_clip.CLIP(**tiny_config), tmp_path / "w.safetensors", dtype)
    no_random_init.clear()
    fast = load_clip(tiny_config, path)
    assert no_random_init == []
    assert_same_model(fast.clip, plain_model(lambda: open_clip.CLIP(**tiny_config), path))


def test_local_dir_and_tag_models_are_built_empty_and_equal_open_clips(tmp_path, tiny_config, stand_in, no_random_init):
    """The two ways open_clip loads the file itself (a ``local-dir:`` folder, a tag's download): the same model
    as open_clip's create_model builds and loads, without its random init."""
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config}))
    torch.manual_seed(6)
    save_weights(open_clip.CLIP(**tiny_config), folder / "open_clip_model.safetensors")
    weights, _ = stand_in
    cases = {
        f"local-dir:{folder}": lambda: open_clip.create_model(f"local-dir:{folder}"),
        "stand_in": lambda: open_clip.create_model("pacl-tiny", pretrained=str(weights), force_quick_gelu=True,
                                                   force_preprocess_cfg={"mean": STAND_IN_MEAN, "std": STAND_IN_STD,
                                                                         "interpolation": "bicubic",
                                                                         "resize_mode": "shortest"}),
    }  # fmt: skip
    for clip, open_clips in cases.items():
        no_random_init.clear()
        fast = load_clip(clip) if clip.startswith("local-dir:") else load_clip("pacl-tiny", "stand_in")
        assert no_random_init == [], clip
        expected = open_clips()
        assert_same_model(fast.clip, expected.requires_grad_(False).eval())
        assert fast.clip.visual.preprocess_cfg == expected.visual.preprocess_cfg, clip
        assert activations(fast.clip) == activations(expected), clip


def test_vit_b16_from_a_weights_file_equals_the_plain_build(tmp_path, no_random_init):
    """The benchmark's model (benchmarks/cold_start.py): ViT-B-16 from a local safetensors file."""
    torch.manual_seed(7)
    plain = open_clip.create_model("ViT-B-16")
    path = save_weights(plain, tmp_path / "vit.safetensors")
    no_random_init.clear()
    fast = load_clip("ViT-B-16", path)
    assert no_random_init == []
    assert_same_model(fast.clip, plain.requires_grad_(False).eval())
    assert fast.clip.attn_mask.shape == (77, 77)


def test_a_file_that_does_not_fit_exactly_is_loaded_the_plain_way(tmp_path, tiny_config):
    """A model whose logit_bias the file lacks (tolerated, as before: it keeps its init value) cannot be
    assigned: it is built and loaded the plain way, with the same result; an extra tensor is still named."""
    config = {**tiny_config, "init_logit_bias": -3.0}
    torch.manual_seed(8)
    state = {k: v.contiguous() for k, v in open_clip.CLIP(**config).state_dict().items() if k != "logit_bias"}
    path = tmp_path / "no_bias.safetensors"
    save_file(state, str(path))
    backbone = load_clip(config, path)
    assert backbone.clip.logit_bias.item() == -3.0
    torch.manual_seed(9)
    assert_same_model(backbone.clip, plain_model(lambda: open_clip.CLIP(**config), path))
    save_file({**state, "stray": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"does not fit this architecture: missing \[\], unexpected \['stray'\]"):
        load_clip(config, path)


def test_loaded_weights_do_not_map_the_file(tmp_path, tiny_config):
    """The model's tensors are its own: the file rewritten in place afterwards (same size, other bytes) changes
    nothing in it (safetensors' load_file maps the file; a model assigned those tensors would follow it)."""
    torch.manual_seed(10)
    path = save_weights(open_clip.CLIP(**tiny_config), tmp_path / "w.safetensors")
    backbone = load_clip(tiny_config, path)
    before = {k: v.clone() for k, v in backbone.clip.state_dict().items()}
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = bytes(len(data) - header)  # every tensor's bytes zeroed, in the same inode
    with open(path, "r+b") as f:
        f.write(data)
    after = backbone.clip.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_read_safetensors_hashes_what_it_reads_and_checks_the_ranges(tmp_path, tiny_backbone):
    import hashlib

    from pacl_fast import backbone

    path = save_weights(tiny_backbone.clip, tmp_path / "w.safetensors")
    backbone._SHA_CACHE.clear()
    state = backbone.read_safetensors(path)
    assert backbone._SHA_CACHE and backbone.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    expected = tiny_backbone.clip.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    # two tensors' byte ranges swapped in the header: sizes no longer match their ranges
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    small, large = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    header[small]["data_offsets"], header[large]["data_offsets"] = (
        header[large]["data_offsets"], header[small]["data_offsets"])  # fmt: skip
    if header[small]["shape"] == header[large]["shape"]:
        header[small]["shape"] = [0]
    text = json.dumps(header).encode()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])
    with pytest.raises(ValueError, match=f"{broken}.*broken safetensors header: tensor"):
        backbone.read_safetensors(broken)


# --- the meta build without torch's Python decompositions, and the persistent digest cache (issue 20: warm start) ---


def meta_skeleton(build):
    """Names, shapes, dtypes, devices, requires_grad and types of every parameter and buffer of ``build()`` on meta."""
    with torch.device("meta"):
        model = build()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {name: (t.shape, t.dtype, t.device, t.requires_grad, type(t)) for name, t in tensors}


@pytest.mark.parametrize("arch", ["tiny", "ViT-B-16", "ViT-B-32-quickgelu"])
def test_meta_shortcuts_build_the_same_skeleton(tiny_config, arch):
    """_MetaShortcuts answers the random fills, triu_ and scalar arithmetic of open_clip's constructors on meta
    tensors itself: the model it builds has exactly the parameters and buffers (names, shapes, dtypes, devices,
    requires_grad, types) the plain meta build has."""
    from pacl_fast.backbone import _MetaShortcuts

    def build():
        return open_clip.CLIP(**tiny_config) if arch == "tiny" else open_clip.create_model(arch, device="meta")

    plain = meta_skeleton(build)
    with _MetaShortcuts():
        shortcut = meta_skeleton(build)
    assert shortcut == plain and len(plain) > 50


def test_meta_shortcuts_answer_what_torch_answers():
    """Each shortcut against torch's own meta result: shapes, dtypes (type promotion), in-place identity; and what it
    does not know runs as it is."""
    from pacl_fast.backbone import _broadcast_shape, _MetaShortcuts

    a = torch.empty(3, 1, device="meta", dtype=torch.float16)
    b = torch.empty(4, device="meta", dtype=torch.float32)
    n = torch.empty(2, 2, device="meta", dtype=torch.int64)
    g = torch.empty(4, device="meta", requires_grad=True)
    cases = [lambda: a * b, lambda: 2.5 * n, lambda: n + 1, lambda: n * True, lambda: b.mul(a), lambda: a + 3.0,
             lambda: torch.randn(2, 3, device="meta"), lambda: torch.rand((5,), device="meta", dtype=torch.float64),
             lambda: b * np.float64(2.0), lambda: n.sum(), lambda: 2.0 * g, lambda: g + b,
             lambda: torch.randn(size=(2, 3), device="meta")]  # fmt: skip
    for case in cases:
        want = case()
        with _MetaShortcuts():
            got = case()
        assert (got.shape, got.dtype, got.device, got.requires_grad) == (
            want.shape, want.dtype, want.device, want.requires_grad)  # fmt: skip
    with _MetaShortcuts():
        assert torch.nn.init.normal_(a) is a and a.uniform_() is a and n.triu_(1) is n
        cpu = torch.zeros(3)
        torch.nn.init.constant_(cpu, 2.0)
        assert cpu.tolist() == [2.0, 2.0, 2.0]  # not meta: as it is
        torch.manual_seed(0)
        drawn = torch.randn(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.randn(3)) and not drawn.is_meta
    assert _broadcast_shape([(3, 1), (4,)]) == (3, 4) and _broadcast_shape([(2, 3), (4,)]) is None
    assert _broadcast_shape([(), (5,)]) == (5,) and _broadcast_shape([(0,), (1,)]) == (0,)


BUILD_PROBE = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from pacl_fast.backbone import load_clip
load_clip(sys.argv[1], sys.argv[2])
print(json.dumps({name: name in sys.modules for name in ("torch._dynamo", "sympy", "timm.models")}))
"""


def test_loading_vit_b16_from_a_file_imports_no_dynamo(tmp_path):
    """The warm path's model build (ViT-B-16 on the meta device, the file's tensors assigned) imported torch._dynamo
    and sympy (~1.5 s) through torch's Python decompositions of ops on meta tensors; it imports neither now."""
    torch.manual_seed(11)
    path = save_weights(open_clip.create_model("ViT-B-16"), tmp_path / "vit.safetensors")
    done = subprocess.run([sys.executable, "-c", BUILD_PROBE, "ViT-B-16", str(path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"torch._dynamo": False, "sympy": False,
                                                                 "timm.models": False}  # fmt: skip


def digest_entries():
    from pacl_fast.files import DIGEST_FOLDER, default_cache_dir

    return sorted((default_cache_dir() / DIGEST_FOLDER).glob("*.json"))


@pytest.fixture()
def digest_cache(tmp_path, monkeypatch):
    """An empty cache folder, the in-process digest cache emptied, a weights file, and no racy window (a file a test
    just wrote has a ctime of now: test_racy_entries_are_not_trusted puts the window back)."""
    from pacl_fast import backbone, files

    monkeypatch.setenv("PACL_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "RACY_NANOSECONDS", 0)
    backbone._SHA_CACHE.clear()
    torch.manual_seed(12)
    state = {f"t{i}": torch.randn(64, 64 + i) for i in range(5)}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    old = time.time() - 60
    os.utime(path, (old, old))
    yield path, state
    backbone._SHA_CACHE.clear()


def sha256_of(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_digest_cache_gives_the_hash_and_skips_hashing(digest_cache, monkeypatch):
    """A second process (here: the in-process cache emptied) reads the file's identity from the digest cache instead
    of hashing 600 MB again; tensors and identity are those of the first read, bit for bit."""
    import hashlib

    from pacl_fast import backbone

    path, state = digest_cache
    first = backbone.read_safetensors(path)
    assert backbone.file_sha256(path) == sha256_of(path)
    assert len(digest_entries()) == 1 and (digest_entries()[0].stat().st_mode & 0o777) == 0o600
    backbone._SHA_CACHE.clear()
    hashed = []
    monkeypatch.setattr(
        backbone, "hashlib", types.SimpleNamespace(sha256=lambda *a: hashed.append(1) or hashlib.sha256(*a))
    )
    again = backbone.read_safetensors(path)
    assert hashed == [] and backbone.file_sha256(path) == sha256_of(path) and hashed == []
    assert again.keys() == first.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    backbone._SHA_CACHE.clear()
    assert backbone.file_sha256(path) == sha256_of(path) and hashed == []  # file_sha256 alone asks it too


def rewrite(path, data):
    with open(path, "r+b") as f:  # same inode
        f.write(data)


def test_a_changed_file_is_hashed_again(digest_cache, tmp_path):
    """Same size and inode with other bytes and a touched mtime; the times put back (ctime still moves); replaced by
    rename; changed within the racy window after hashing: each is hashed again, never given the old identity."""
    from pacl_fast import backbone

    path, _ = digest_cache
    original = path.read_bytes()
    backbone.read_safetensors(path)
    times = os.stat(path)

    def identity():
        backbone._SHA_CACHE.clear()
        return backbone.file_sha256(path)

    flipped = bytearray(original)
    flipped[-1] ^= 0xFF
    rewrite(path, bytes(flipped))  # same size and inode, new mtime and ctime
    assert identity() == sha256_of(path) != hashlib_hex(original)
    entry_times = os.stat(path)  # what the entry now holds
    rewrite(path, original)
    os.utime(path, ns=(entry_times.st_atime_ns, entry_times.st_mtime_ns))  # the mtime forged back: the ctime tells
    assert identity() == hashlib_hex(original)
    other = tmp_path / "other.safetensors"
    other.write_bytes(bytes(flipped))  # other bytes, so that a stale entry would show
    os.utime(other, ns=(times.st_atime_ns, times.st_mtime_ns))
    os.replace(other, path)  # replaced by rename: another inode, same size and mtime
    assert identity() == hashlib_hex(bytes(flipped))


def hashlib_hex(data):
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_racy_entries_are_not_trusted(digest_cache, monkeypatch):
    """A file written just before it was hashed (within RACY_NANOSECONDS) could change again in the same timestamp
    tick without its times showing it: its entry is not trusted, the file is hashed again (and the entry rewritten,
    so a later process trusts it once the file is old enough)."""
    import hashlib

    from pacl_fast import backbone, files

    path, _ = digest_cache
    monkeypatch.setattr(files, "RACY_NANOSECONDS", 2_000_000_000)
    os.utime(path)  # modified now
    backbone.read_safetensors(path)
    assert len(digest_entries()) == 1
    backbone._SHA_CACHE.clear()
    hashed = []
    monkeypatch.setattr(
        backbone, "hashlib", types.SimpleNamespace(sha256=lambda *a: hashed.append(1) or hashlib.sha256(*a))
    )
    assert backbone.file_sha256(path) == sha256_of(path) and hashed == [1]
    monkeypatch.setattr(files, "RACY_NANOSECONDS", 0)
    backbone._SHA_CACHE.clear()
    assert backbone.file_sha256(path) == sha256_of(path) and hashed == [1]


@pytest.mark.parametrize("damage", ["not json", "other path", "bad digest", "string size", "wrong digest kind",
                                    "group writable", "symlink", "folder open to others", "huge"])  # fmt: skip
def test_a_hostile_or_broken_entry_is_a_miss_never_an_error(digest_cache, damage, tmp_path):
    """The cache folder is read as hostile: an entry that is malformed, describes another file, is writable by
    others or is a link gives no identity (the file is hashed, the entry rewritten); never an error."""
    from pacl_fast import backbone

    path, _ = digest_cache
    backbone.read_safetensors(path)
    entry = digest_entries()[0]
    record = json.loads(entry.read_text())
    forged = {**record, "sha256": "0" * 64}
    if damage == "not json":
        entry.write_text("{nope")
    elif damage == "other path":
        entry.write_text(json.dumps({**forged, "path": str(tmp_path / "elsewhere")}))
    elif damage == "bad digest":
        entry.write_text(json.dumps({**record, "sha256": "xyz"}))
    elif damage == "string size":
        entry.write_text(json.dumps({**forged, "st_size": str(record["st_size"])}))
    elif damage == "wrong digest kind":
        entry.write_text(json.dumps({**forged, "hashed_from_ns": float(record["hashed_from_ns"])}))
    elif damage == "group writable":
        entry.write_text(json.dumps(forged))
        entry.chmod(0o620)
    elif damage == "symlink":
        target = tmp_path / "target.json"
        target.write_text(json.dumps(forged))
        target.chmod(0o600)
        entry.unlink()
        entry.symlink_to(target)
    elif damage == "folder open to others":
        entry.write_text(json.dumps(forged))
        entry.parent.chmod(0o777)
    elif damage == "huge":
        entry.write_text(json.dumps({**forged, "padding": "x" * 10000}))
    backbone._SHA_CACHE.clear()
    assert backbone.file_sha256(path) == sha256_of(path)
    if damage != "folder open to others":  # a folder others may write is neither trusted nor written
        backbone._SHA_CACHE.clear()
        assert json.loads(digest_entries()[0].read_text())["sha256"] == sha256_of(path)
