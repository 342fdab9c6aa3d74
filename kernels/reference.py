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
        background_threshold: pixels whose score is below it get label ``BACKGROUND`` (-1).
        with_scores: False skips the softmax and returns ``None`` for the scores (labels only:
            upsample + argmax, what the public re-implementations compute).
    Returns:
        labels ``[B, H, W]`` int16 (ties go to the lowest class index, as ``torch.argmax``) and
        scores ``[B, H, W]`` float32 (or None).
    """
    check_scores_request(with_scores, background_threshold)
    upsampled = upsample_logits(logits, out_size, grid_extent)  # [B, C, H, W]
    if not with_scores:
        return upsampled.argmax(dim=1).to(torch.int16), None
    probabilities = torch.softmax(upsampled * logit_scale, dim=1)  # [B, C, H, W]
    labels = upsampled.argmax(dim=1)  # [B, H, W]
    scores = probabilities.gather(1, labels.unsqueeze(1)).squeeze(1)  # [B, H, W]
    if background_threshold is not None:
        labels = torch.where(scores < background_threshold, torch.full_like(labels, BACKGROUND), labels)
    return labels.to(torch.int16), scores.float()


def check_scores_request(with_scores: bool, background_threshold: float | None) -> None:
    """The background threshold compares scores, so it cannot go without them."""
    if not with_scores and background_threshold is not None:
        raise ValueError("background_threshold needs the scores: pass with_scores=True or no threshold")
