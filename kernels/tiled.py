"""Upsample + argmax + winner score in PyTorch, for CPUs (and any device torch runs on).

The same result as ``upsample_argmax.py`` without Triton, in two exact passes that never hold
anything of size ``C x H x W``:

* labels: ``kernels/separable.py``, one output row at a time, evaluating at each pixel only the
  classes on the upper envelope of its row of its cell (3-4 even on structureless logits);
* scores: ``kernels/scores.py``, the labels' softmax probabilities from exponents interpolated on
  a refined, shifted grid (``kernels/fine_grid.py``), evaluating the classes whose terms can reach
  ``score_tolerance / C`` of the winner's (all of them on structureless logits, a few on scenes).

A pixel is background when its float32 score is strictly below ``background_threshold``, whatever
path computed it (the same rule as ``kernels.reference.segment_reference``).
"""

from __future__ import annotations

import torch

from kernels import cells, scores, separable
from kernels.reference import BACKGROUND


def segment_tiled(
    logits: torch.Tensor,
    out_size: tuple[int, int],
    *,
    grid_extent: tuple[float, float] | None = None,
    logit_scale: float = 100.0,
    background_threshold: float | None = None,
    score_tolerance: float = cells.DEFAULT_SCORE_TOLERANCE,
    with_scores: bool = True,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels and winner scores of ``kernels.reference.segment_reference``, band by band.

    Args:
        logits: ``[B, h, w, C]`` float32, float16 or bfloat16.
        out_size, grid_extent, logit_scale, background_threshold: as ``segment_reference``.
        score_tolerance: the most the class pruning may change a score.
        with_scores: False computes labels only (scores None).
        out: optional ``(labels [B, H, W] int16, scores [B, H, W] float32)`` to write into.
    Returns:
        labels ``[B, H, W]`` int16 (ties: the lowest class index) and scores ``[B, H, W]`` float32
        (None without scores).
    """
    (height, width), (extent_h, extent_w) = cells.check_segment_inputs(
        logits, out_size, grid_extent, logit_scale, background_threshold, with_scores
    )
    batch, grid_h, grid_w, _ = logits.shape
    labels, probabilities = cells.check_outputs(out, (batch, height, width), logits.device, with_scores)
    values = logits.float().contiguous()  # [B, h, w, C]
    rows = cells.axis_sampling(grid_h, height, extent_h, logits.device)
    cols = cells.axis_sampling(grid_w, width, extent_w, logits.device)
    if not with_scores:
        separable.segment_labels(values, rows, cols, labels)
        return labels, None
    scores.segment_with_scores(values, rows, cols, labels, probabilities, logit_scale, score_tolerance)
    if background_threshold is not None:
        labels.masked_fill_(probabilities < background_threshold, BACKGROUND)
    return labels, probabilities
