"""Upsample + argmax + winner score in PyTorch, for CPUs (and any device torch runs on).

The same result as ``upsample_argmax.py`` without Triton, never holding anything of size
``C x H x W``. On CPU tensors, where the native kernel is built (``kernels/native.py``: a C
compiler, ``$PACL_FAST_NATIVE``), it computes both, block of pixels by block in registers:

* with scores, ``kernels/scores.py`` on a refined, shifted grid (``kernels/fine_grid.py``), each
  cell evaluating the classes whose terms can reach ``score_tolerance / C`` of the winner's (all
  of them on structureless logits, a few on scenes);
* labels only, the classes that can win in each cell of the grid.

Elsewhere (no compiler, other devices) eager torch: labels only, ``kernels/separable.py``, one
output row at a time, evaluating at each pixel only the classes on the upper envelope of its row
of its cell (3-4 even on structureless logits); with scores, ``kernels/scores.py``'s dense or
gathered torch evaluation.

A pixel is background when its float32 score is strictly below ``background_threshold``, whatever
path computed it (the same rule as ``kernels.reference.segment_reference``).
"""

from __future__ import annotations

import torch

from kernels import cells, native, scores
from kernels.reference import BACKGROUND


@cells.fused_head
def segment_tiled(call: cells.SegmentCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels and winner scores of ``kernels.reference.segment_reference``, band by band.

    Called as ``segment_tiled(logits, out_size, *, grid_extent, logit_scale, background_threshold,
    score_tolerance, with_scores, out)``: the arguments of ``cells.segment_call``, which checks them.
    Returns:
        labels ``[B, H, W]`` int16 (ties: the lowest class index) and scores ``[B, H, W]`` float32
        (None without scores).
    """
    kernel = native.kernel() if call.values.device.type == "cpu" else None
    labels, probabilities = call.labels, call.scores
    scores.segment(
        call.values, call.rows, call.cols, labels, probabilities, call.logit_scale, call.score_tolerance, kernel=kernel
    )
    if probabilities is not None and call.background_threshold is not None:
        labels.masked_fill_(probabilities < call.background_threshold, BACKGROUND)
    return labels, probabilities
