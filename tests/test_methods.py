"""The training-free last blocks (MaskCLIP, SCLIP, ClearCLIP, NACLIP) held to plain references.

Every expected value here comes from an independent computation: ``kernels/reference.py`` (the
blocks from their equations, head by head, in float64), a bicubic resize written out below from
PyTorch's documented sampling rule, NACLIP's own Gaussian construction (window + convolution) and
open_clip's own modules for blocks ``1..L-1``. The CLIPs are random-init with their LayerNorms,
attention biases and LayerScales randomised too (open_clip initialises them to 1 and 0, which would
hide a bias applied twice or a LayerNorm skipped).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_load_clip
from open_clip.transformer import LayerScale, QuickGELU

from kernels.reference import gaussian_neighbourhood as reference_gaussian
from kernels.reference import last_block_reference, training_free_embeddings_reference
from pacl_fast.backbone import resize_positional_scale_factor
from pacl_fast.demo import TINY_CLIP_CONFIG
from pacl_fast.methods import (
    POSITIONAL_RESIZE,
    TRAINING_FREE,
    LastBlock,
    TrainingFreeCLIP,
    gaussian_neighbourhood,
)

TINY_LS_CONFIG = {
    **TINY_CLIP_CONFIG,
    "quick_gelu": True,
    "vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "ls_init_value": 0.5},
}


def randomise(backbone, seed: int):
    """Give the image tower's LayerNorms, attention biases and LayerScales random values (in place)."""
    generator = torch.Generator().manual_seed(seed)

    def noise(tensor: torch.Tensor, std: float) -> torch.Tensor:
        return std * torch.randn(tensor.shape, generator=generator)

    with torch.no_grad():
        for module in backbone.visual.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + noise(module.weight, 0.2))
                module.bias.copy_(noise(module.bias, 0.2))
            elif isinstance(module, torch.nn.MultiheadAttention):
                module.in_proj_bias.copy_(noise(module.in_proj_bias, 0.2))
                module.out_proj.bias.copy_(noise(module.out_proj.bias, 0.2))
            elif isinstance(module, LayerScale):
                module.gamma.copy_(0.5 + torch.rand(module.gamma.shape, generator=generator))
    return backbone


def load_randomised(config, seed: int):
    torch.manual_seed(seed)
    return randomise(quiet_load_clip(config), seed + 1)


# Own instances (the shared tiny_backbone fixture must not be perturbed).
@pytest.fixture(scope="module")
def tiny():
    return load_randomised(TINY_CLIP_CONFIG, 10)


@pytest.fixture(scope="module")
def tiny_ls():
    """LayerScale, which the repos' CLIPs lack and open_clip models may have, and QuickGELU, which all three
    repos' CLIPs run (SCLIP ``clip/model.py`` l. 181, NACLIP ``clip/model.py`` l. 36, ClearCLIP's open_clip
    through ``load_openai_model``: ``open_clip/openai.py`` l. 73, ``open_clip/model.py`` l. 453 and 499)."""
    return load_randomised(TINY_LS_CONFIG, 20)


@pytest.fixture(scope="module")
def vit_b16():
    return load_randomised("ViT-B-16", 30)


MODELS = {  # fixture name -> a grid that is not square (nor the native one)
    "tiny": (9, 5),
    "tiny_ls": (5, 7),
    "vit_b16": (14, 10),  # 224 x 160 pixels
}


def block_weights(block) -> dict:
    """An open_clip ResidualAttentionBlock's tensors, as kernels.reference.last_block_reference takes them."""
    attn, mlp = block.attn, block.mlp
    assert type(mlp.gelu) in (torch.nn.GELU, QuickGELU) and getattr(mlp.gelu, "approximate", "none") == "none"
    return {
        "num_heads": attn.num_heads,
        "ln_1_weight": block.ln_1.weight,
        "ln_1_bias": block.ln_1.bias,
        "ln_1_eps": block.ln_1.eps,
        "in_proj_weight": attn.in_proj_weight,
        "in_proj_bias": attn.in_proj_bias,
        "out_proj_weight": attn.out_proj.weight,
        "out_proj_bias": attn.out_proj.bias,
        "ls_1": block.ls_1.gamma if isinstance(block.ls_1, LayerScale) else None,
        "ls_2": block.ls_2.gamma if isinstance(block.ls_2, LayerScale) else None,
        "ln_2_weight": block.ln_2.weight,
        "ln_2_bias": block.ln_2.bias,
        "ln_2_eps": block.ln_2.eps,
        "fc_weight": mlp.c_fc.weight,
        "fc_bias": mlp.c_fc.bias,
        "proj_weight": mlp.c_proj.weight,
        "proj_bias": mlp.c_proj.bias,
        "activation": "quick_gelu" if isinstance(mlp.gelu, QuickGELU) else "gelu",
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# --- the last block against its reference -------------------------------------------------------


@pytest.mark.parametrize("method", TRAINING_FREE)
@pytest.mark.parametrize("model", list(MODELS))
def test_last_block_matches_reference(request, model, method):
    """fp32 and bf16 against the float64 reference, on what the block adds to its input.

    For maskclip and sclip the output is ``x + branch``; comparing it whole would let the residual
    hide a wrong attention, so the branch (``out - x``) is what is compared for every method.
    """
    backbone = request.getfixturevalue(model)
    grid = MODELS[model]
    block = backbone.blocks[-1]
    generator = torch.Generator().manual_seed(10 * list(MODELS).index(model) + TRAINING_FREE.index(method))
    x = torch.randn(2, 1 + grid[0] * grid[1], backbone.token_dim, generator=generator)  # [B, N, D]
    residual = method in ("maskclip", "sclip")

    expected = last_block_reference(x, block_weights(block), method, grid)  # [B, N, D] float64
    expected_branch = expected - x.double() if residual else expected

    last = LastBlock(block, method)
    with torch.no_grad():
        out = last(x, grid)
        out_bf16 = copy.deepcopy(last).to(torch.bfloat16)(x.bfloat16(), grid)
    assert out.shape == x.shape and out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
    branch = out.double() - x.double() if residual else out.double()
    branch_bf16 = out_bf16.double() - x.bfloat16().double() if residual else out_bf16.double()

    assert cosine(branch, expected_branch) >= 0.9999
    assert (branch - expected_branch).abs().max() <= 1e-5 * expected_branch.abs().max()  # fp32: much tighter
    assert cosine(branch_bf16, expected_branch) >= 0.999


def test_reduced_methods_drop_residual_and_ffn(tiny):
    """clearclip and naclip return out_proj of the attention alone: no residual, no FFN, nothing after."""
    grid = (4, 6)
    block = tiny.blocks[-1]
    x = torch.randn(1, 1 + 24, tiny.token_dim)
    with torch.no_grad():
        y = block.ln_1(x)
        q, k, v = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        heads = block.attn.num_heads

        def attend(a, b, mask=None):  # softmax(a b^T s + mask) v, heads split, through the block's MHA out_proj
            split = [t.view(1, 25, heads, -1).transpose(1, 2) for t in (a, b, v)]
            out = F.scaled_dot_product_attention(*split, attn_mask=mask)
            return block.attn.out_proj(out.transpose(1, 2).reshape(1, 25, -1))

        torch.testing.assert_close(LastBlock(block, "clearclip")(x, grid), attend(q, q))
        gauss = reference_gaussian(grid, 5.0).float()
        torch.testing.assert_close(LastBlock(block, "naclip")(x, grid), attend(k, k, gauss))


# --- NACLIP's Gaussian -----------------------------------------------------------------------------


def naclip_construction(grid: tuple[int, int], std: float) -> torch.Tensor:
    """NACLIP's own way (sinahmr/NACLIP clip/model.py l. 153-176): a (2h-1)x(2w-1) Gaussian window of
    ``exp(-|offset|^2 / (2 std^2))`` convolved ('same' padding) with one one-hot image per patch,
    then a zero row and column for the class token."""
    h, w = grid
    axes = [(torch.arange(2 * n - 1, dtype=torch.float64) - (n - 1)) / (std * math.sqrt(2)) for n in (h, w)]
    window = torch.exp(-(torch.stack(torch.meshgrid(*axes, indexing="ij")) ** 2).sum(0))  # [2h-1, 2w-1]
    one_hot = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    out = F.conv2d(one_hot, window[None, None], padding="same").view(h * w, h * w)
    return F.pad(out, (1, 0, 1, 0))


@pytest.mark.parametrize("grid", [(1, 1), (3, 7), (9, 5), (14, 10)])
def test_gaussian_neighbourhood(grid):
    n = grid[0] * grid[1]
    ours = gaussian_neighbourhood(grid, 5.0, torch.float64)
    reference = reference_gaussian(grid, 5.0)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)  # built in float32, as NACLIP
    torch.testing.assert_close(reference, naclip_construction(grid, 5.0), rtol=1e-10, atol=1e-10)
    assert ours.shape == (1 + n, 1 + n)
    assert torch.equal(ours[0], torch.zeros(1 + n, dtype=torch.float64))  # class row
    assert torch.equal(ours[:, 0], torch.zeros(1 + n, dtype=torch.float64))  # class column
    assert torch.equal(ours[1:, 1:].diagonal(), torch.ones(n, dtype=torch.float64))  # 1 on the diagonal
    if grid[1] >= 3 and grid[0] >= 2:  # not normalised: patch (0, 0) and patch (1, 2) at distance^2 = 5
        assert reference[1, 1 + grid[1] + 2].item() == pytest.approx(math.exp(-5 / 50), rel=1e-12)
        assert ours[1, 1 + grid[1] + 2].item() == pytest.approx(math.exp(-5 / 50), rel=1e-6)
    assert torch.equal(ours, ours.T)


def test_naclip_neighbourhood_cache(tiny):
    """Eager calls reuse one tensor per (grid, dtype, device); moving the model drops the cache."""
    last = LastBlock(tiny.blocks[-1], "naclip")
    cpu = torch.device("cpu")
    first = last.neighbourhood((3, 4), torch.float32, cpu)
    assert last.neighbourhood((3, 4), torch.float32, cpu) is first
    assert last.neighbourhood((3, 4), torch.bfloat16, cpu).dtype == torch.bfloat16
    last.float()
    assert last._neighbourhood_cache == {}


def test_tracing_leaves_no_fake_tensor_in_the_cache(tiny):
    """Export traces with fake tensors; a cache miss while tracing must not store one for eager calls."""
    last = LastBlock(tiny.blocks[-1], "naclip")

    class FixedGrid(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.last = last

        def forward(self, x):
            return self.last(x, (3, 4))

    x = torch.randn(1, 13, tiny.token_dim)
    torch.export.export(FixedGrid(), (x,), strict=False)
    assert all(type(t) is torch.Tensor for t in last._neighbourhood_cache.values())
    with torch.no_grad():
        torch.testing.assert_close(
            FixedGrid()(x), last_block_reference(x, block_weights(tiny.blocks[-1]), "naclip", (3, 4)).float()
        )


# --- positional embeddings ---------------------------------------------------------------------


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights (PyTorch's a = -0.75) of the taps at offsets -1, 0, 1, 2."""

    def near(s):  # |s| <= 1
        return ((a + 2) * s - (a + 3)) * s * s + 1

    def far(s):  # 1 < |s| < 2
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(n_in: int, n_out: int, step: float) -> torch.Tensor:
    """``[n_out, n_in]``: output ``i`` samples the input at ``(i + 0.5) * step - 0.5``, taps clamped to the border."""
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        source = (i + 0.5) * step - 0.5
        base = math.floor(source)
        for offset, weight in zip(range(-1, 3), cubic_weights(source - base)):
            matrix[i, min(max(base + offset, 0), n_in - 1)] += weight
    return matrix


def resize_by_hand(patch_pos: torch.Tensor, grid: tuple[int, int], scale_factor: bool) -> torch.Tensor:
    """``[g0, g1, D]`` -> ``[h, w, D]``: the repos' ``scale_factor=((h + 0.1) / g0, (w + 0.1) / g1)``
    (sampling step ``g / (n + 0.1)``) or ``size=(h, w)`` (step ``g / n``)."""
    (g0, g1), (h, w) = patch_pos.shape[:2], grid
    steps = (g0 / (h + 0.1), g1 / (w + 0.1)) if scale_factor else (g0 / h, g1 / w)
    rows, cols = bicubic_matrix(g0, h, steps[0]), bicubic_matrix(g1, w, steps[1])
    return torch.einsum("ia,abd,jb->ijd", rows, patch_pos.double(), cols)


@pytest.mark.parametrize(
    "native, grid", [((8, 8), (9, 5)), ((8, 8), (5, 7)), ((14, 14), (14, 10)), ((14, 14), (23, 37))]
)
def test_scale_factor_resize_is_the_repos_formula(native, grid):
    patch_pos = torch.randn(1, 16, *native)  # [1, D, g0, g1]
    ours = resize_positional_scale_factor(patch_pos, grid)  # [1, D, h, w]
    by_hand = resize_by_hand(patch_pos[0].permute(1, 2, 0), grid, scale_factor=True).permute(2, 0, 1)[None]
    torch.testing.assert_close(ours.double(), by_hand, rtol=1e-5, atol=1e-5)
    # NACLIP's exact call (clip/model.py l. 140-148; SCLIP and ClearCLIP leave recompute_scale_factor at None).
    # Its `w`/`h` are the input's dims 2/3, i.e. height/width: the first factor is the rows'.
    naclip = F.interpolate(
        patch_pos,
        mode="bicubic",
        scale_factor=((grid[0] + 0.1) / native[0], (grid[1] + 0.1) / native[1]),
        align_corners=False,
        recompute_scale_factor=False,
    )
    torch.testing.assert_close(ours, naclip, rtol=0, atol=0)


def test_scale_factor_and_size_resizes_differ(tiny):
    """The difference issue 12 asks to show: same grid, same bicubic, other sampling positions."""
    grid = (9, 5)
    cpu = torch.device("cpu")
    by_size = tiny.positional_embedding(grid, torch.float32, cpu, resize="size")  # [1 + h*w, D]
    by_scale = tiny.positional_embedding(grid, torch.float32, cpu, resize="scale_factor_if_count_differs")
    native = tiny.visual.positional_embedding.detach()
    patch_pos = native[1:].reshape(*tiny.visual.grid_size, -1)  # [g0, g1, D]
    for resized, scale_factor in ((by_size, False), (by_scale, True)):
        torch.testing.assert_close(resized[0], native[0])  # the class token's embedding is kept
        expected = resize_by_hand(patch_pos, grid, scale_factor).reshape(grid[0] * grid[1], -1)
        torch.testing.assert_close(resized[1:].double(), expected, rtol=1e-5, atol=1e-5)
    difference = (by_scale[1:] - by_size[1:]).abs().max().item()
    assert difference > 0.05 * native[1:].abs().max().item(), difference


def test_each_method_resizes_as_its_code():
    """MaskCLIP resizes by size (mmseg resize_pos_embed, vit.py l. 405-406); the other three by scale factor;
    all four only when the number of patches differs from the native grid's."""
    assert POSITIONAL_RESIZE == {
        "maskclip": "size_if_count_differs",
        "sclip": "scale_factor_if_count_differs",
        "clearclip": "scale_factor_if_count_differs",
        "naclip": "scale_factor_if_count_differs",
    }


def repository_tower_input(visual, pixels: torch.Tensor, method: str) -> torch.Tensor:
    """The authors' tower input, as their forward computes it (NLD, before the blocks): SCLIP ``clip/model.py``
    l. 233-244 (NACLIP l. 98-109 and ClearCLIP ``open_clip/transformer.py`` l. 502-516 are the same lines),
    with ``interpolate_pos_encoding`` (SCLIP l. 263-281) called only when the token count differs; for
    MaskCLIP ``vit.py`` l. 367-380 and 399-410 (``resize`` to ``hw_shape``, bicubic)."""
    patch = visual.patch_size[0]
    _, _, w, h = pixels.shape  # the repositories name the input's height w and its width h
    with torch.no_grad():
        x = visual.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        table = visual.positional_embedding
        if x.shape[1] != table.shape[0]:
            n = table.shape[0] - 1
            side, dim = int(math.sqrt(n)), x.shape[-1]
            grid_table = table[1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
            if method == "maskclip":
                resized = F.interpolate(grid_table, size=(w // patch, h // patch), mode="bicubic", align_corners=False)
            else:
                w0, h0 = w // patch + 0.1, h // patch + 0.1
                resized = F.interpolate(grid_table, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
            resized = resized.permute(0, 2, 3, 1).reshape(1, -1, dim)
            x = x + torch.cat((table[[0]].unsqueeze(0), resized), dim=1)
        else:
            x = x + table
        return visual.ln_pre(x)


@pytest.mark.parametrize("method", TRAINING_FREE)
@pytest.mark.parametrize("size", [(32, 128), (128, 32), (72, 40), (64, 64)])
def test_positional_embeddings_are_resized_when_the_repositories_resize_them(tiny, method, size):
    """Issue 19 item 4. The tiny CLIP's native grid is 8 x 8: a 4 x 16 or 16 x 4 grid has its 64 patches, so the
    repositories add the native table unresized, in row-major order; 9 x 5 is resized, 8 x 8 is native."""
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    model = TrainingFreeCLIP(tiny, method)
    with torch.no_grad():
        ours, grid = tiny.embed_patches(pixels, resize=model.positional_resize)
    assert grid == (size[0] // 8, size[1] // 8)
    torch.testing.assert_close(ours, repository_tower_input(tiny.visual, pixels, method), rtol=1e-5, atol=1e-5)
    if grid[0] * grid[1] == 64 and grid != (8, 8):  # PACL, the engine's own rule, resizes these
        with torch.no_grad():
            resized, _ = tiny.embed_patches(pixels, resize="size")
        assert (resized - ours).abs().max() > 1e-2


# --- the whole image tower ---------------------------------------------------------------------


def independent_embeddings(backbone, pixels: torch.Tensor, method: str) -> torch.Tensor:
    """Pixels -> unit patch embeddings ``[B, h, w, E]`` without pacl_fast: the tower input written out
    (positional resize by hand), blocks ``1..L-1`` as open_clip's modules, then the reference."""
    visual = backbone.visual
    patch = visual.patch_size[0]
    grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    with torch.no_grad():
        x = F.conv2d(pixels, visual.conv1.weight, stride=patch).flatten(2).transpose(1, 2)  # [B, h*w, D]
        x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)  # [B, 1 + h*w, D]
        native = visual.positional_embedding
        patch_pos = native[1:].reshape(*visual.grid_size, -1)
        if grid[0] * grid[1] == native.shape[0] - 1:  # the repositories resize only when the count differs
            x = x + native
        else:
            resized = resize_by_hand(patch_pos, grid, scale_factor=method != "maskclip")
            x = x + torch.cat([native[:1], resized.reshape(grid[0] * grid[1], -1).float()])
        x = F.layer_norm(x, x.shape[-1:], visual.ln_pre.weight, visual.ln_pre.bias, visual.ln_pre.eps)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        ln_post = (visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)
        last = visual.transformer.resblocks[-1]
        return training_free_embeddings_reference(x, block_weights(last), method, grid, ln_post, visual.proj)


def check_embeddings(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(ours.shape[:-1]), rtol=0, atol=1e-5)
    per_patch = F.cosine_similarity(ours.double(), expected, dim=-1)  # [B, h, w]
    assert per_patch.min().item() >= 0.9999, per_patch.min().item()


@pytest.mark.parametrize("method", TRAINING_FREE)
@pytest.mark.parametrize("size", [(72, 40), (32, 128)])  # grid 9 x 5; 4 x 16, the native count of patches
def test_encode_image_matches_independent_computation(tiny, method, size):
    model = TrainingFreeCLIP(tiny, method)
    pixels = torch.randn(2, 3, *size)
    ours = model.encode_image(pixels)
    assert ours.shape == (2, size[0] // 8, size[1] // 8, tiny.embed_dim)
    check_embeddings(ours, independent_embeddings(tiny, pixels, method))


@pytest.mark.slow
def test_encode_image_vit_b16(vit_b16):
    pixels = torch.randn(1, 3, 224, 160)
    for method in ("naclip", "maskclip"):  # one of each positional resize
        check_embeddings(
            TrainingFreeCLIP(vit_b16, method).encode_image(pixels), independent_embeddings(vit_b16, pixels, method)
        )


def test_parameters_shared_and_no_multihead_attention(tiny_ls):
    """LastBlock holds the block's own tensors (no copies) and no nn.MultiheadAttention to be swapped."""
    backbone_tensors = {id(p) for p in tiny_ls.parameters()}
    for method in TRAINING_FREE:
        last = TrainingFreeCLIP(tiny_ls, method).last_block
        owned = list(last.parameters())
        assert owned and all(id(p) in backbone_tensors for p in owned)
        assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in last.modules())
        expected = {"ln_1", "out_proj", "ls_1"} | (
            {"ln_2", "mlp", "ls_2"} if method in ("maskclip", "sclip") else set()
        )
        assert {name for name, _ in last.named_children()} == expected
        assert last.in_proj_weight is tiny_ls.blocks[-1].attn.in_proj_weight


def test_traceable_view_computes_the_same(tiny):
    """encoders.graph swaps blocks 1..L-1's attention for SDPA; the last block must come through unchanged."""
    from pacl_fast.encoders.graph import ImageTower

    model = TrainingFreeCLIP(tiny, "naclip")
    pixels = torch.randn(1, 3, 40, 56)
    tower = ImageTower(model)
    assert tower.model.last_block is model.last_block
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), model.encode_image(pixels), rtol=1e-5, atol=1e-5)


# --- backends ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", TRAINING_FREE)
def test_onnx_export_matches_torch(tiny, tmp_path, method):
    from pacl_fast.encoders.onnx_encoder import OnnxRuntimeEncoder

    model = TrainingFreeCLIP(tiny, method)
    pixels = torch.randn(2, 3, 72, 40)
    encoder = OnnxRuntimeEncoder(model, torch.float32, cache_dir=tmp_path)
    torch.testing.assert_close(encoder.encode_image(pixels), model.encode_image(pixels), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_matches_eager(tiny):
    from pacl_fast.encoders.torch_encoder import TorchEncoder

    model = TrainingFreeCLIP(tiny, "naclip")
    pixels = torch.randn(2, 3, 72, 40)
    compiled = TorchEncoder(model, compile=True)
    out = compiled.encode_image(pixels)
    torch.testing.assert_close(out.float(), model.encode_image(pixels), rtol=1e-4, atol=1e-4)
    assert all(type(t) is torch.Tensor for t in model.last_block._neighbourhood_cache.values())


# --- bad input ---------------------------------------------------------------------------------


def test_resnet_clip_is_refused_with_its_name():
    from pacl_fast.build import build_model

    with pytest.raises(ValueError, match=r"CLIP RN50 .*ViT"):
        import warnings

        from pacl_fast.backbone import RandomWeightsWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            build_model("RN50", None, method="naclip", device="cpu")


def test_custom_attention_block_is_refused():
    config = {**TINY_CLIP_CONFIG, "vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "qk_norm": True}}
    backbone = quiet_load_clip(config)
    with pytest.raises(ValueError, match=rf"CLIP {backbone.identity.arch} cannot run sclip: .*nn.MultiheadAttention"):
        TrainingFreeCLIP(backbone, "sclip")


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="maskclip"):
        TrainingFreeCLIP(tiny, "maskclop")
    with pytest.raises(ValueError, match="not 'pacl'"):
        LastBlock(tiny.blocks[-1], "pacl")
    with pytest.raises(ValueError, match="a 3x4 grid needs 13"):
        LastBlock(tiny.blocks[-1], "naclip")(torch.randn(1, 12, tiny.token_dim), (3, 4))


# --- CUDA: the training-free towers through every GPU backend present (run by benchmarks/gpu_check.sh) -------

GPU_BACKENDS = [("torch", torch.float16), ("compile", torch.float16), ("tensorrt", torch.float16)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("method", TRAINING_FREE)
@pytest.mark.parametrize("backend,dtype", GPU_BACKENDS)
def test_training_free_tower_on_cuda_matches_fp32(method, backend, dtype, tmp_path):
    from pacl_fast.encoders import EncoderUnavailableError, make_encoder

    torch.manual_seed(0)
    model = TrainingFreeCLIP(quiet_load_clip("ViT-B-16", device="cuda"), method)
    pixels = torch.randn(2, 3, 224, 160, device="cuda")
    with torch.no_grad():
        reference = model.encode_image(pixels).float()
    options = {"cache_dir": tmp_path} if backend == "tensorrt" else {}
    try:
        encoder = make_encoder(backend, model, dtype, **options)
    except EncoderUnavailableError as error:
        pytest.skip(f"needs TensorRT: {error}")
    got = encoder.encode_image(pixels).float()
    assert torch.nn.functional.cosine_similarity(got, reference, dim=-1).min() >= 0.99
