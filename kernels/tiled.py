"""Upsample + argmax + winner score in tiled PyTorch, for CPUs (and any device torch runs on).

The same fusion as ``upsample_argmax.py`` without Triton. The output is made in bands of rows (a
band is the output rows of a few grid-cell rows); each pixel evaluates only its cell's candidate
classes (``cells.cell_candidates``, the exact bounds of DESIGN §4), so nothing of size
``C x H x W`` (nor ``C x rows x W``) ever exists.

Cells keep different numbers of classes (one inside a region, a few on its border), so pixels
are grouped by their cell's count rounded up to a power of two, and each group is one set of
vectorised ops on ``[pixels, K]``: padding a whole band to its largest cell would cost as much
as not pruning. Within a group the interpolation is separable: each (cell row, output column)
first interpolates its candidates along x on the two grid rows (``[pairs, K]``, small), then
every pixel is one ``lerp`` of those two.
"""

from __future__ import annotations

import torch

from kernels import cells
from kernels.reference import BACKGROUND

# Elements of one [pixels, K] float32 tensor of a group: 4 MiB; a few of them live at once.
GROUP_ELEMENTS = 1 << 20
# Elements of the [rows, w, C] pruning tensors of one band of cell rows (a few such tensors live).
PRUNE_ELEMENTS = 1 << 21
_ABSENT = -1e30  # scaled logit of a padding slot: never the argmax, and exp() of it is 0


def segment_tiled(
    logits: torch.Tensor,
    out_size: tuple[int, int],
    *,
    grid_extent: tuple[float, float] | None = None,
    logit_scale: float = 100.0,
    background_threshold: float | None = None,
    score_tolerance: float = cells.DEFAULT_SCORE_TOLERANCE,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and winner scores of ``kernels.reference.segment_reference``, band by band.

    Args:
        logits: ``[B, h, w, C]`` float32, float16 or bfloat16.
        out_size, grid_extent, logit_scale, background_threshold: as ``segment_reference``.
        score_tolerance: the most the class pruning may change a score.
        out: optional ``(labels [B, H, W] int16, scores [B, H, W] float32)`` to write into.
    Returns:
        labels ``[B, H, W]`` int16 (ties: the lowest class index) and scores ``[B, H, W]`` float32.
    """
    (height, width), (extent_h, extent_w) = cells.check_segment_inputs(
        logits, out_size, grid_extent, logit_scale, background_threshold
    )
    batch, grid_h, grid_w, num_classes = logits.shape
    labels, scores = cells.check_outputs(out, (batch, height, width), logits.device)
    values = logits.float().contiguous()  # [B, h, w, C]
    rows = cells.axis_sampling(grid_h, height, extent_h, logits.device)
    cols = cells.axis_sampling(grid_w, width, extent_w, logits.device)
    used = [r for r, (a, b) in enumerate(zip(rows.start.tolist(), rows.end.tolist())) if b > a]
    band_rows = cells.rows_per_band(grid_w * num_classes, PRUNE_ELEMENTS)
    for b in range(batch):
        for first in range(0, len(used), band_rows):
            band = range(used[first], used[min(first + band_rows, len(used)) - 1] + 1)
            candidates = cells.cell_candidates(values[b : b + 1], band, logit_scale, score_tolerance)
            _segment_band(
                values[b],
                candidates,
                rows,
                cols,
                logit_scale,
                background_threshold,
                labels[b].view(-1),
                scores[b].view(-1),
            )
    return labels, scores


def _segment_band(
    values: torch.Tensor,
    candidates: cells.CellCandidates,
    rows: cells.AxisSampling,
    cols: cells.AxisSampling,
    logit_scale: float,
    background_threshold: float | None,
    labels: torch.Tensor,
    scores: torch.Tensor,
) -> None:
    """Write the output rows of one band of cell rows of one image (flat ``labels``/``scores``).

    Work items are *pairs* (a segment of at most ``depth`` output rows of one cell row, one
    output column): a pair's pixels share their cell, hence their candidates and their x weights.
    """
    grid_h, _, num_classes = values.shape
    device = values.device
    width = cols.index0.numel()
    classes, count = candidates.classes[0], candidates.count[0]  # [r, w, K], [r, w]
    segment_row, segment_start, segment_length, depth = _row_segments(rows, candidates)  # [S] each
    group = _group_of(count)[segment_row][:, cols.index0]  # [S, W]: the group of each pair
    for group_id in group.unique().tolist():
        pair_segment, pair_col = (group == group_id).nonzero(as_tuple=True)  # [Q] each
        cell_row = segment_row[pair_segment]  # [Q], band-local
        slots = min(_GROUP_SLOTS[group_id], classes.shape[-1])
        step = cells.rows_per_band(depth * slots, GROUP_ELEMENTS)
        for start in range(0, pair_col.numel(), step):
            part = slice(start, start + step)
            pair_classes = classes[cell_row[part], cols.index0[pair_col[part]], :slots].long()  # [q, K]
            absent = pair_classes == num_classes
            safe = pair_classes.clamp_max(num_classes - 1)
            grid_row = cell_row[part] + candidates.first_row
            col_weight = cols.lambda1[pair_col[part], None]  # [q, 1]
            top = _along_x(values, grid_row, cols, pair_col[part], safe, col_weight, logit_scale, absent)
            next_row = (grid_row + 1).clamp_max(grid_h - 1)
            bottom = _along_x(values, next_row, cols, pair_col[part], safe, col_weight, logit_scale, absent)
            out_row = segment_start[pair_segment[part], None] + torch.arange(depth, device=device)  # [q, D]
            inside = out_row < (segment_start + segment_length)[pair_segment[part], None]  # [q, D]
            out_row = out_row.clamp_max(rows.index0.numel() - 1)
            row_weight = rows.lambda1[out_row, None]  # [q, D, 1]
            # One pass; lerp rounds like ATen's w0 * a + w1 * b to within an ulp.
            scaled = torch.lerp(top[:, None], bottom[:, None], row_weight)  # [q, D, K]: s * logits
            best, index = scaled.max(dim=-1)  # [q, D]; the first (lowest class) of equal maxima
            score = scaled.sub_(best[..., None]).exp_().sum(dim=-1).reciprocal_()  # 1 / Z; the winner's is 1
            label = pair_classes.gather(-1, index)  # [q, D]
            if background_threshold is not None:
                label = label.masked_fill_(score < background_threshold, BACKGROUND)
            flat = (out_row * width + pair_col[part, None])[inside]  # [pixels]
            labels.index_copy_(0, flat, label[inside].to(torch.int16))
            scores.index_copy_(0, flat, score[inside])


# Candidate slots per pixel group: powers of two and 1.5 x powers of two, so padding wastes < 1/3.
_GROUP_SLOTS = sorted({m << e for e in range(31) for m in (2, 3)} | {1})


def _group_of(count: torch.Tensor) -> torch.Tensor:
    """The smallest group (index into ``_GROUP_SLOTS``) with at least ``count`` slots."""
    slots = torch.tensor(_GROUP_SLOTS, device=count.device)
    return torch.searchsorted(slots, count.long())


def _row_segments(
    rows: cells.AxisSampling, candidates: cells.CellCandidates
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Split the band's output rows into segments of one cell row and at most ``depth`` rows.

    ``depth`` is the typical number of output rows per cell row, so that few segments are short
    (the first and last cell rows are taller, from ATen's clamping at the borders).
    Returns band-local cell rows, first output rows and lengths ``[S]``, and ``depth``.
    """
    first = candidates.first_row
    band = range(first, first + candidates.count.shape[1])
    starts = rows.start[band.start : band.stop].tolist()
    lengths = (rows.end[band.start : band.stop] - rows.start[band.start : band.stop]).tolist()
    used = sorted(n for n in lengths if n > 0)
    depth = used[len(used) // 2]
    segment_row, segment_start, segment_length = [], [], []
    for local, (start, length) in enumerate(zip(starts, lengths)):
        for offset in range(0, length, depth):
            segment_row.append(local)
            segment_start.append(start + offset)
            segment_length.append(min(depth, length - offset))
    device = rows.index0.device
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return as_tensor(segment_row), as_tensor(segment_start), as_tensor(segment_length), depth


def _along_x(
    values: torch.Tensor,
    grid_row: torch.Tensor,
    cols: cells.AxisSampling,
    pair_col: torch.Tensor,
    pair_classes: torch.Tensor,
    col_weight: torch.Tensor,
    logit_scale: float,
    absent: torch.Tensor,
) -> torch.Tensor:
    """``s * L`` on grid row ``grid_row[q]`` at output column ``pair_col[q]``, per candidate: ``[Q, K]``."""
    row = grid_row[:, None]  # [Q, 1]
    left = values[row, cols.index0[pair_col, None], pair_classes]  # [Q, K]
    right = values[row, cols.index1[pair_col, None], pair_classes]  # [Q, K]
    # ATen's form, w0 * left + w1 * right.
    scaled = left.mul_(1.0 - col_weight).add_(right.mul_(col_weight)).mul_(logit_scale)
    return scaled.masked_fill_(absent, _ABSENT)
