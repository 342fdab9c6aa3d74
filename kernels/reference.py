"""Plain PyTorch: the truth every fast op in ``kernels/`` is held to.

Nothing here is clever. Each function spells out one step of PACL inference or training in the
most direct way, materialising every intermediate, so that it can be read against DESIGN.md and
used as the reference in tests and benchmarks.
"""

from __future__ import annotations

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
