"""Plain PyTorch: the truth every fast op in ``kernels/`` is held to.

Nothing here is clever. Each function spells out one step of PACL inference or training in the
most direct way, materialising every intermediate, so that it can be read against DESIGN.md and
used as the reference in tests and benchmarks.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

BACKGROUND = -1  # label of pixels whose winner score is under the background threshold


def compatibility_reference(
    patches: torch.Tensor, texts: torch.Tensor, patch_logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """PACL's compatibility for every (image, text) pair, written out.

    Args:
        patches: unit patch embeddings ``[B, N, E]``.
        texts: unit text embeddings ``[T, E]``.
        patch_logit_scale: ``1 / tau_p``.
    Returns:
        ``phi`` ``[B, T]``.
    """
    similarity = torch.einsum("bne,te->btn", patches, texts)  # [B, T, N]
    weights = torch.softmax(similarity * patch_logit_scale, dim=-1)  # [B, T, N]
    pooled = torch.einsum("btn,bne->bte", weights, patches)  # [B, T, E]
    return torch.einsum("bte,te->bt", F.normalize(pooled, dim=-1), texts)  # [B, T]


def patch_logits(patch_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch with every class: ``[B, h, w, E] x [C, E] -> [B, h, w, C]``."""
    patches = F.normalize(patch_embeddings.float(), dim=-1)
    classes = F.normalize(class_embeddings.float(), dim=-1)
    return torch.einsum("bhwe,ce->bhwc", patches, classes)


def embedder_logits(
    tokens: torch.Tensor,
    linear_weight: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    class_embeddings: torch.Tensor,
) -> torch.Tensor:
    """PACL's embedder then cosine with the classes, in float32: ``[..., D] -> [..., C]``.

    ``v = W_lin x + W_2 GELU(W_1 x + b_1) + b_2`` (``pacl_fast.model.VisionEmbedder``), then
    ``<v / |v|, t / |t|>``. Half inputs are upcast first, so this is the exact value the fused
    kernel approximates with float32 accumulation.
    """
    x = tokens.float()
    hidden = F.gelu(x @ fc1_weight.float().T + fc1_bias.float())
    embeddings = x @ linear_weight.float().T + hidden @ fc2_weight.float().T + fc2_bias.float()  # [..., E]
    return F.normalize(embeddings, dim=-1) @ F.normalize(class_embeddings.float(), dim=-1).T


def upsample_logits(
    logits: torch.Tensor, out_size: tuple[int, int], grid_extent: tuple[float, float] | None = None
) -> torch.Tensor:
    """Bilinear upsampling of patch logits to the original image, ``align_corners=False``.

    Args:
        logits: ``[B, h, w, C]`` on the patch grid.
        out_size: ``(H, W)`` of the original image.
        grid_extent: how many grid cells (fractional) the original image covers, ``(eh, ew)``;
            less than ``(h, w)`` when the model input was padded. None means the whole grid.
    Returns:
        ``[B, C, H, W]`` float32. Output pixel ``y`` samples the grid at
        ``(y + 0.5) * eh / H - 0.5``: exactly ``F.interpolate(logits, scale_factor=H / eh,
        mode="bilinear", align_corners=False, recompute_scale_factor=False)[..., :H, :W]``, and
        ``F.interpolate(logits, size=(H, W), ...)`` when the grid is not padded.
    """
    height, width = out_size
    grid_h, grid_w = logits.shape[1:3]
    extent_h, extent_w = grid_extent if grid_extent is not None else (grid_h, grid_w)
    channels_first = logits.permute(0, 3, 1, 2).float()  # [B, C, h, w]
    # The aten op F.interpolate calls, given both the output size and the scales so that the
    # sampling positions follow the crop (scale) while the output is exactly H x W.
    return torch.ops.aten.upsample_bilinear2d(
        channels_first, [height, width], False, height / extent_h, width / extent_w
    )


def sampling_positions(grid_size: int, out_size: int, extent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where :func:`upsample_logits` samples one axis, read from ATen itself.

    Returns ``index0`` ``[out_size]`` int64 and ``lambda1`` ``[out_size]`` float32: output index ``y``
    is at grid position ``index0 + lambda1`` (``lambda1`` weighs grid index ``index0 + 1``; it is 0
    where ATen samples a single index: its clamped border, or its copy when the sizes are equal).
    Got by upsampling the identity (grid index ``g`` as channel ``g``, one-hot) with the same size
    and scale (the other axis 1 -> 1), so that no detail of ATen's float32 arithmetic (the order of
    its operations, a fused multiply-add) has to be guessed: a position off by one float32 ulp
    (5e-7 at index 8) moves a score at logit scale 100 by ~1e-5 on a region border.
    """
    identity = torch.eye(grid_size, dtype=torch.float32)[None, :, :, None]  # [1, g, g, 1]
    spread = torch.ops.aten.upsample_bilinear2d(identity, [out_size, 1], False, out_size / extent, 1.0)
    spread = spread[0, :, :, 0].T  # [out, g]: each row's weights of the grid indices
    index0 = (spread > 0).to(torch.uint8).argmax(dim=1)  # the first index with weight
    following = (index0 + 1).clamp_max(grid_size - 1)
    lambda1 = torch.where(following > index0, spread.gather(1, following[:, None])[:, 0], 0.0)
    return index0, lambda1


def sampling_weights(grid_size: int, out_size: int, extent: float) -> torch.Tensor:
    """The bilinear weights of one axis, ``[out_size, grid_size]`` float64: ``1 - lambda1`` at ``index0``
    and ``lambda1`` at ``index0 + 1`` (:func:`sampling_positions`), exactly (they sum to 1)."""
    index0, lambda1 = sampling_positions(grid_size, out_size, extent)
    following = (index0 + 1).clamp_max(grid_size - 1)
    outputs = torch.arange(out_size)
    weights = torch.zeros(out_size, grid_size, dtype=torch.float64)
    weights[outputs, index0] = 1.0 - lambda1.double()
    weights[outputs, following] += lambda1.double()
    return weights


def upsample_logits_exact(
    logits: torch.Tensor, out_size: tuple[int, int], grid_extent: tuple[float, float] | None = None
) -> torch.Tensor:
    """:func:`upsample_logits` computed exactly: ``[B, C, H, W]`` float64.

    The same sampling positions (ATen's float32 ``lambda`` values, :func:`sampling_positions`), and
    the bilinear interpolation between them computed in float64, where the products and sums round
    at 2^-53: the interpolated value itself, not float32 arithmetic's approximation of it (off by
    ~2^-24 of the logits: 1.5e-8 at 0.3).
    """
    height, width = out_size
    grid_h, grid_w = logits.shape[1:3]
    extent_h, extent_w = grid_extent if grid_extent is not None else (grid_h, grid_w)
    rows = sampling_weights(grid_h, height, extent_h)  # [H, h]
    cols = sampling_weights(grid_w, width, extent_w)  # [W, w]
    along_rows = torch.einsum("yh,bhwc->bcyw", rows, logits.double())  # [B, C, H, w]
    return along_rows @ cols.T  # [B, C, H, W]


def segment_reference(
    logits: torch.Tensor,
    out_size: tuple[int, int],
    *,
    grid_extent: tuple[float, float] | None = None,
    logit_scale: float = 100.0,
    background_threshold: float | None = None,
    with_scores: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Patch logits -> per-pixel labels and winner scores at the original size.

    Args:
        logits: cosine logits ``[B, h, w, C]``.
        out_size, grid_extent: see :func:`upsample_logits`.
        logit_scale: the model's logit scale; the score is the winner's softmax probability over
            ``logit_scale * logits``.
        background_threshold: a pixel is background (label ``BACKGROUND``, -1) when its score is
            strictly below the threshold (both as float32): a score equal to it keeps its class.
        with_scores: False skips the softmax and returns ``None`` for the scores (labels only:
            upsample + argmax in float32, what the public re-implementations compute).
    Returns:
        labels ``[B, H, W]`` int16 (ties go to the lowest class index, as ``torch.argmax``) and
        scores ``[B, H, W]`` float32 (or None).

    With scores, everything is computed in float64 from the logits (:func:`upsample_logits_exact`,
    then the softmax): the score is the exact probability rounded once to float32, and the label
    the exact argmax. Float32 arithmetic is not exact enough to be the truth here: at
    ``logit_scale`` 100 its rounding of the upsampled logits moves the exponents by ~1e-6, and
    torch's float32 softmax sums its terms in order, both of which moved scores by up to 1.5e-6
    (measured on C=150, 512x512). Labels differ from the float32 labels-only argmax only where two
    classes are within float32 rounding (~1e-7) of each other.
    """
    check_scores_request(with_scores, background_threshold)
    if not with_scores:
        return upsample_logits(logits, out_size, grid_extent).argmax(dim=1).to(torch.int16), None
    scaled = upsample_logits_exact(logits, out_size, grid_extent).mul_(logit_scale)  # [B, C, H, W] float64
    labels = scaled.argmax(dim=1)  # [B, H, W]
    # The winner's probability, 1 / sum_c exp(x_c - x_max), in place (one float64 [B, C, H, W] tensor).
    scores = scaled.sub_(scaled.amax(dim=1, keepdim=True)).exp_().sum(dim=1).reciprocal_().float()  # [B, H, W]
    if background_threshold is not None:
        labels = torch.where(scores < background_threshold, torch.full_like(labels, BACKGROUND), labels)
    return labels.to(torch.int16), scores


def check_scores_request(with_scores: bool, background_threshold: float | None) -> None:
    """The background threshold compares scores, so it cannot go without them."""
    if not with_scores and background_threshold is not None:
        raise ValueError("background_threshold needs the scores: pass with_scores=True or no threshold")


# --- Training-free last blocks (MaskCLIP, SCLIP, ClearCLIP, NACLIP), written from their equations ---

TRAINING_FREE_METHODS = ("maskclip", "sclip", "clearclip", "naclip")


def gaussian_neighbourhood(grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """NACLIP's attention addition for a patch grid ``(h, w)``, float64 ``[1 + h*w, 1 + h*w]``.

    Token ``1 + p`` is patch ``p = r * w + c`` (row-major); ``G[1+p, 1+q] = exp(-((r_p - r_q)^2 +
    (c_p - c_q)^2) / (2 sigma^2))`` (patch units, 1 on the diagonal, not normalised); the class
    token's row and column (index 0) are 0. Filled one row at a time.
    """
    h, w = grid
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # [h*w]: r_q
    cols = torch.arange(w, dtype=torch.float64).repeat(h)  # [h*w]: c_q
    out = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.float64)
    for p in range(h * w):
        r_p, c_p = divmod(p, w)
        out[1 + p, 1:] = torch.exp(-((rows - r_p) ** 2 + (cols - c_p) ** 2) / (2.0 * sigma**2))
    return out


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def _activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / 2.0**0.5))
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"activation must be 'gelu' or 'quick_gelu', got {name!r}")


def last_block_reference(
    x: torch.Tensor, weights: dict, method: str, grid: tuple[int, int], sigma: float = 5.0
) -> torch.Tensor:
    """A CLIP ViT's last block as a training-free method computes it, in float64, head by head.

    Args:
        x: the output of block ``L-1``, ``[B, 1 + h*w, D]`` (class token first).
        weights: the block's tensors: ``num_heads`` (int); ``ln_1_weight``, ``ln_1_bias``,
            ``ln_1_eps``; ``in_proj_weight`` ``[3D, D]`` and ``in_proj_bias`` ``[3D]`` (q, k, v
            rows in that order); ``out_proj_weight``, ``out_proj_bias``; ``ls_1``, ``ls_2``
            (LayerScale ``[D]`` or None); ``ln_2_weight``, ``ln_2_bias``, ``ln_2_eps``,
            ``fc_weight``, ``fc_bias``, ``proj_weight``, ``proj_bias`` and ``activation``
            (``"gelu"`` | ``"quick_gelu"``) of the FFN. A bias may be None.
        method: ``"maskclip" | "sclip" | "clearclip" | "naclip"``.
        grid: the patch grid ``(h, w)``.
        sigma: NACLIP's Gaussian width, in patches.
    Returns:
        ``[B, 1 + h*w, D]`` float64. Per head, with ``s = d**-0.5`` and row softmaxes, the
        attention matrix ``A`` is: maskclip ``I`` (each token its own value); sclip
        ``softmax(QQ^T s) + softmax(KK^T s)``; clearclip ``softmax(QQ^T s)``; naclip
        ``softmax(KK^T s + G)`` (:func:`gaussian_neighbourhood`). ``a = out_proj(concat_h(A V))``,
        times ``ls_1``. maskclip and sclip keep the block's residual and FFN
        (``x' = x + a; x' + ls_2 * mlp(ln_2(x'))``); clearclip and naclip return ``a``.
    """
    if method not in TRAINING_FREE_METHODS:
        raise ValueError(f"method must be one of {TRAINING_FREE_METHODS}, got {method!r}")

    def get(name: str) -> torch.Tensor | None:
        value = weights.get(name)
        return None if value is None else value.detach().double()

    def linear(t: torch.Tensor, weight: str, bias: str) -> torch.Tensor:
        out = t @ get(weight).T
        return out if get(bias) is None else out + get(bias)

    x = x.double()
    batch, length, width = x.shape
    if length != 1 + grid[0] * grid[1]:
        raise ValueError(f"x has {length} tokens, a {grid[0]}x{grid[1]} grid needs {1 + grid[0] * grid[1]}")
    heads = int(weights["num_heads"])
    head_dim = width // heads
    scale = head_dim**-0.5
    y = _layer_norm(x, get("ln_1_weight"), get("ln_1_bias"), weights["ln_1_eps"])
    qkv = linear(y, "in_proj_weight", "in_proj_bias")  # [B, N, 3D]
    q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]  # [B, N, D] each
    gauss = gaussian_neighbourhood(grid, sigma) if method == "naclip" else None  # [N, N]
    outputs = []
    for head in range(heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        q_h, k_h, v_h = q[..., cols], k[..., cols], v[..., cols]  # [B, N, d]
        if method == "maskclip":
            attention = torch.eye(length, dtype=torch.float64).expand(batch, length, length)
        elif method == "sclip":
            attention = torch.softmax(q_h @ q_h.transpose(1, 2) * scale, dim=-1) + torch.softmax(
                k_h @ k_h.transpose(1, 2) * scale, dim=-1
            )
        elif method == "clearclip":
            attention = torch.softmax(q_h @ q_h.transpose(1, 2) * scale, dim=-1)
        else:
            attention = torch.softmax(k_h @ k_h.transpose(1, 2) * scale + gauss, dim=-1)
        outputs.append(attention @ v_h)  # [B, N, d]
    attended = linear(torch.cat(outputs, dim=-1), "out_proj_weight", "out_proj_bias")  # [B, N, D]
    if get("ls_1") is not None:
        attended = attended * get("ls_1")
    if method in ("clearclip", "naclip"):
        return attended
    x = x + attended
    hidden = _activation(
        linear(_layer_norm(x, get("ln_2_weight"), get("ln_2_bias"), weights["ln_2_eps"]), "fc_weight", "fc_bias"),
        weights["activation"],
    )
    ffn = linear(hidden, "proj_weight", "proj_bias")
    if get("ls_2") is not None:
        ffn = ffn * get("ls_2")
    return x + ffn


def training_free_embeddings_reference(
    x: torch.Tensor,
    weights: dict,
    method: str,
    grid: tuple[int, int],
    ln_post: tuple[torch.Tensor, torch.Tensor, float],
    proj: torch.Tensor,
    sigma: float = 5.0,
) -> torch.Tensor:
    """Block ``L-1``'s output ``[B, 1 + h*w, D]`` -> a method's unit patch embeddings ``[B, h, w, E]`` (float64).

    :func:`last_block_reference`, then ``ln_post`` (weight, bias, eps) and ``proj`` ``[D, E]`` on
    every token, the class token dropped, each patch divided by its L2 norm.
    """
    out = last_block_reference(x, weights, method, grid, sigma)
    weight, bias, eps = ln_post
    embeddings = _layer_norm(out, weight.detach().double(), bias.detach().double(), eps) @ proj.detach().double()
    patches = embeddings[:, 1:]  # [B, h*w, E]
    patches = patches / patches.norm(dim=-1, keepdim=True)
    return patches.reshape(x.shape[0], grid[0], grid[1], -1)


# --- ProxyCLIP (mc-lan/ProxyCLIP@e7b767f) and the vision foundation models it borrows attention from ---


def vit_features_reference(
    pixels: torch.Tensor,
    weights: dict,
    *,
    patch_size: int,
    num_heads: int,
    registers: int = 0,
    positional_resize: str = "dino",
    eps: float = 1e-6,
) -> torch.Tensor:
    """A DINO / DINOv2 ViT as its authors' hub model runs it: ImageNet-normalised pixels ``[B, 3, H, W]``
    -> the last block's tokens after the final norm, patch tokens only, ``[B, H/p, W/p, C]`` (float64).

    ``weights`` uses the authors' checkpoint names: ``cls_token`` ``[1, 1, C]``, ``pos_embed``
    ``[1, 1 + g0^2, C]`` (class position first), ``register_tokens`` ``[1, R, C]`` (DINOv2 with
    registers), ``patch_embed.proj.weight/bias``, ``blocks.{i}.norm1/attn.qkv/attn.proj/ls1.gamma/
    norm2/mlp.fc1/mlp.fc2/ls2.gamma`` (``ls*`` for DINOv2 only) and ``norm.weight/bias``.

    * DINO (facebookresearch/dino ``vision_transformer.py`` l. 174-233): tokens ``[cls, patches] +
      pos``, patch positions resized bicubic with ``scale_factor=((h + 0.1) / g0, (w + 0.1) / g0)``.
    * DINOv2 (``dinov2/models/vision_transformer.py`` l. 180-233, ``hub/backbones.py`` l. 113-124):
      patch positions resized bicubic to ``size=(h, w)`` with antialiasing; registers inserted
      after the class token once positions are added.
    Blocks: ``x + ls1 * attn(norm1(x))``, ``x + ls2 * mlp(norm2(x))``, softmax attention with
    ``d**-0.5`` per head, exact GELU.
    """

    def w(name: str) -> torch.Tensor:
        return weights[name].detach().double()

    x = F.conv2d(pixels.double(), w("patch_embed.proj.weight"), w("patch_embed.proj.bias"), stride=patch_size)
    batch, width, h, wd = x.shape
    x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
    pos = w("pos_embed")  # [1, 1 + g0^2, C]
    side = int(round((pos.shape[1] - 1) ** 0.5))
    patch_pos = pos[:, 1:].reshape(1, side, side, width).permute(0, 3, 1, 2)
    if (side, side) != (h, wd):
        if positional_resize == "dino":
            scale = ((h + 0.1) / side, (wd + 0.1) / side)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False)
        elif positional_resize == "dinov2":
            patch_pos = F.interpolate(patch_pos, size=(h, wd), mode="bicubic", antialias=True, align_corners=False)
        else:
            raise ValueError(f"positional_resize must be 'dino' or 'dinov2', got {positional_resize!r}")
    pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, h * wd, width)], dim=1)
    x = torch.cat([w("cls_token").expand(batch, 1, width), x], dim=1) + pos  # [B, 1 + h*w, C]
    if registers:
        x = torch.cat([x[:, :1], w("register_tokens").expand(batch, registers, width), x[:, 1:]], dim=1)
    head_dim = width // num_heads
    for i in itertools.count():
        if f"blocks.{i}.norm1.weight" not in weights:
            break
        b = f"blocks.{i}."
        y = _layer_norm(x, w(b + "norm1.weight"), w(b + "norm1.bias"), eps)
        qkv = y @ w(b + "attn.qkv.weight").T + w(b + "attn.qkv.bias")  # [B, N, 3C]
        heads = []
        for head in range(num_heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            q, k, v = (qkv[..., part * width :][..., cols] for part in range(3))
            heads.append(torch.softmax(q @ k.transpose(1, 2) * head_dim**-0.5, dim=-1) @ v)
        attended = torch.cat(heads, dim=-1) @ w(b + "attn.proj.weight").T + w(b + "attn.proj.bias")
        x = x + (attended * w(b + "ls1.gamma") if b + "ls1.gamma" in weights else attended)
        y = _layer_norm(x, w(b + "norm2.weight"), w(b + "norm2.bias"), eps)
        hidden = _activation(y @ w(b + "mlp.fc1.weight").T + w(b + "mlp.fc1.bias"), "gelu")
        mlp = hidden @ w(b + "mlp.fc2.weight").T + w(b + "mlp.fc2.bias")
        x = x + (mlp * w(b + "ls2.gamma") if b + "ls2.gamma" in weights else mlp)
    x = _layer_norm(x, w("norm.weight"), w("norm.bias"), eps)[:, 1 + registers :]
    return x.reshape(batch, h, wd, width)


def proxyclip_reference(
    x: torch.Tensor,
    weights: dict,
    grid: tuple[int, int],
    vfm_features: torch.Tensor,
    ln_post: tuple[torch.Tensor, torch.Tensor, float],
    proj: torch.Tensor,
    beta: float = 1.2,
    gamma: float = 3.0,
) -> torch.Tensor:
    """ProxyCLIP's last block and projection, in float64, one image and one head at a time.

    Written from mc-lan/ProxyCLIP@e7b767f ``open_clip/transformer.py`` l. 560-587 and 530-532:

    Args:
        x: the output of CLIP's block ``L-1``, ``[B, 1 + h*w, D]`` (class token first).
        weights: the last block's ``num_heads``, ``ln_1_weight``, ``ln_1_bias``, ``ln_1_eps``,
            ``in_proj_weight`` ``[3D, D]``, ``in_proj_bias``, ``out_proj_weight``, ``out_proj_bias``.
        grid: CLIP's patch grid ``(h, w)``.
        vfm_features: the VFM's patch tokens ``[B, H, W, C]`` (:func:`vit_features_reference`).
        ln_post: CLIP's final norm (weight, bias, eps); proj: ``[D, E]``.
    Returns:
        Unit patch embeddings on the VFM grid ``[B, H, W, E]``: per head, the values
        ``v = (ln_1(x) W_v + b_v)[1:]`` as a ``[d, h, w]`` map resized bilinearly
        (``align_corners=False``) to ``(H, W)``; ``S`` the cosine similarity of the VFM tokens;
        ``A = gamma * (S - beta * mean(S))``, entries ``< 0`` set to ``-inf``, a row left with none
        kept whole (the authors' NaN, defined); ``softmax(A) v``; heads concatenated, ``out_proj``,
        ``ln_post``, ``proj``, divided by the L2 norm. ``mean(S)`` is the image's own (the
        authors' whole-batch mean at their batch of 1).
    """

    def get(name: str) -> torch.Tensor | None:
        value = weights.get(name)
        return None if value is None else value.detach().double()

    x = x.double()
    batch, length, width = x.shape
    heads = int(weights["num_heads"])
    head_dim = width // heads
    out_h, out_w = vfm_features.shape[1:3]
    outputs = []
    for image in range(batch):
        y = _layer_norm(x[image], get("ln_1_weight"), get("ln_1_bias"), weights["ln_1_eps"])  # [N, D]
        v_all = y @ get("in_proj_weight")[2 * width :].T
        if get("in_proj_bias") is not None:
            v_all = v_all + get("in_proj_bias")[2 * width :]
        features = vfm_features[image].double().reshape(out_h * out_w, -1)  # [M, C]
        unit = features / features.norm(dim=-1, keepdim=True)
        similarity = unit @ unit.T  # [M, M]
        affinity = (similarity - similarity.mean() * beta) * gamma
        masked = affinity.clone()
        for row in range(masked.shape[0]):
            if (affinity[row] >= 0).any():
                masked[row][affinity[row] < 0] = float("-inf")
        attention = torch.softmax(masked, dim=-1)  # [M, M]
        per_head = []
        for head in range(heads):
            v = v_all[1:, head * head_dim : (head + 1) * head_dim]  # [h*w, d]
            v = v.T.reshape(1, head_dim, grid[0], grid[1])
            v = F.interpolate(v, size=(out_h, out_w), mode="bilinear", align_corners=False)
            per_head.append(attention @ v.reshape(head_dim, out_h * out_w).T)  # [M, d]
        attended = torch.cat(per_head, dim=-1) @ get("out_proj_weight").T  # [M, D]
        if get("out_proj_bias") is not None:
            attended = attended + get("out_proj_bias")
        weight, bias, eps = ln_post
        embedded = _layer_norm(attended, weight.detach().double(), bias.detach().double(), eps) @ proj.double()
        outputs.append(embedded / embedded.norm(dim=-1, keepdim=True))
    return torch.stack(outputs).reshape(batch, out_h, out_w, -1)
