"""Triton: bilinear upsample + argmax + winner score, one program per (refined) grid cell.

The reference upsamples to ``[B, C, H, W]`` and reads it back twice (softmax, argmax). Here one
program owns one grid cell (the output pixels that interpolate between the same four grid
points, ``kernels.cells``): it loops over the cell's candidate classes only (the exact pruning
of DESIGN §4, computed on the grid by ``cells.cell_candidates``), interpolates each one over its
pixel tile in registers, and keeps a running argmax and an online softmax denominator. The only
output traffic is ``H * W`` int16 labels and float32 scores.

With scores, the kernel reads ``kernels.fine_grid.relative_logits`` (the logits on a grid refined
twice, each point's classes minus its largest, times ``logit_scale``, computed in float64 and
rounded once) instead of the logits: the same pixels' values up to a per-pixel shift the softmax
and the argmax ignore, but small numbers where float32 is precise (scores within 4e-7 of the
float64 reference at scale 100, where float32 values of ``logit_scale * v ~ 30`` were off by 1e-6).
Labels alone read the logits (the argmax needs no such precision: ties within ~1e-7 may go either
way, as in the reference's float32 labels-only path).

Semantics are ``kernels.reference.segment_reference``'s: ``F.interpolate(mode="bilinear",
align_corners=False)`` with the crop mapping of ``grid_extent`` (the sampling positions come
from ``cells.axis_sampling``, ATen's own), ties to the lowest class index, score = the winner's
softmax probability over all classes at ``logit_scale`` (to ``score_tolerance``), label ``-1``
where the score is strictly below ``background_threshold``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import cells, fine_grid
from kernels._triton import interpreting, launchable, next_power_of_2

# Elements of the [B, rows, w, 4, C] corner tensor of the pruning per launch (16 MiB); larger
# grids launch in bands of cell rows.
PRUNE_ELEMENTS = 1 << 22


@triton.jit
def _upsample_argmax(
    logits_ptr,  # [B, grid_rows, w, C] float32, contiguous: grid rows first_grid_row.. of [B, h, w, C]
    classes_ptr,  # [B, band_rows, w, slots] int32: candidate classes, ascending
    count_ptr,  # [B, band_rows, w] int32
    used_row_ptr,  # [cells] int32: the band's cells that own output pixels (band-local row)
    used_col_ptr,  # [cells] int32
    row_start_ptr,  # [h] int32: first output row of each cell row
    row_end_ptr,  # [h] int32
    col_start_ptr,  # [w] int32
    col_end_ptr,  # [w] int32
    row_lambda_ptr,  # [H] float32: weight of the lower grid row
    col_lambda_ptr,  # [W] float32: weight of the right grid column
    labels_ptr,  # [B, H, W] int16
    scores_ptr,  # [B, H, W] float32
    grid_h,
    grid_w,
    num_classes,
    first_row,
    first_grid_row,
    grid_rows,
    band_rows,
    used_cells,
    slots,
    out_h,
    out_w,
    logit_scale,
    background_threshold,
    HAS_BACKGROUND: tl.constexpr,
    WITH_SCORES: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    program = tl.program_id(0)
    image = program // used_cells
    local_row = tl.load(used_row_ptr + program % used_cells)
    cell_col = tl.load(used_col_ptr + program % used_cells)
    cell = (image * band_rows + local_row) * grid_w + cell_col  # index into count / classes
    cell_row = first_row + local_row
    next_row = tl.minimum(cell_row + 1, grid_h - 1)
    next_col = tl.minimum(cell_col + 1, grid_w - 1)
    y_start = tl.load(row_start_ptr + cell_row)
    y_end = tl.load(row_end_ptr + cell_row)
    x_start = tl.load(col_start_ptr + cell_col)
    x_end = tl.load(col_end_ptr + cell_col)
    count = tl.load(count_ptr + cell)
    candidates = classes_ptr + cell.to(tl.int64) * slots
    # logits_ptr holds grid rows first_grid_row .. first_grid_row + grid_rows - 1 of each image.
    image_logits = logits_ptr + image.to(tl.int64) * grid_rows * grid_w * num_classes
    row0, row1 = cell_row - first_grid_row, next_row - first_grid_row
    corner00 = image_logits + (row0 * grid_w + cell_col).to(tl.int64) * num_classes
    corner01 = image_logits + (row0 * grid_w + next_col).to(tl.int64) * num_classes
    corner10 = image_logits + (row1 * grid_w + cell_col).to(tl.int64) * num_classes
    corner11 = image_logits + (row1 * grid_w + next_col).to(tl.int64) * num_classes

    image_out = image.to(tl.int64) * out_h * out_w

    for y0 in range(y_start, y_end, BLOCK_Y):
        ys = y0 + tl.arange(0, BLOCK_Y)
        y_inside = ys < y_end
        wy1 = tl.load(row_lambda_ptr + ys, mask=y_inside, other=0.0)[None, :, None]  # [1, BY, 1]
        for x0 in range(x_start, x_end, BLOCK_X):
            xs = x0 + tl.arange(0, BLOCK_X)
            x_inside = xs < x_end
            wx1 = tl.load(col_lambda_ptr + xs, mask=x_inside, other=0.0)[None, :]  # [1, BX]
            best = tl.full((BLOCK_Y, BLOCK_X), float("-inf"), tl.float32)
            label = tl.full((BLOCK_Y, BLOCK_X), 0, tl.int32)
            running_max = tl.full((BLOCK_Y, BLOCK_X), float("-inf"), tl.float32)
            total = tl.full((BLOCK_Y, BLOCK_X), 0.0, tl.float32)
            # BLOCK_K candidates at a time, as a [BK, BY, BX] tile.
            for k0 in range(0, count, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_inside = ks < count
                c = tl.load(candidates + ks, mask=k_inside, other=0)  # [BK] int32, ascending
                # a + w * (b - a): the weights 1 - w and w summing to 1 exactly, as torch.lerp.
                left = tl.load(corner00 + c)[:, None]
                top = left + wx1 * (tl.load(corner01 + c)[:, None] - left)  # [BK, BX]
                left = tl.load(corner10 + c)[:, None]
                bottom = left + wx1 * (tl.load(corner11 + c)[:, None] - left)
                value = top[:, None, :] + wy1 * (bottom[:, None, :] - top[:, None, :])  # [BK, BY, BX]
                value = tl.where(k_inside[:, None, None], value, float("-inf"))
                chunk_best = tl.max(value, axis=0)  # [BY, BX]
                # The lowest class among the chunk's maxima (torch.argmax's tie rule), then the
                # chunk replaces the running winner only if strictly better (earlier chunks hold
                # lower classes).
                at_best = value == chunk_best[None, :, :]
                chunk_label = tl.min(tl.where(at_best, c[:, None, None], num_classes), axis=0)
                better = chunk_best > best
                best = tl.where(better, chunk_best, best)
                label = tl.where(better, chunk_label, label)
                if WITH_SCORES:  # online softmax denominator over s * value
                    new_max = tl.maximum(running_max, chunk_best * logit_scale)
                    chunk_total = tl.sum(tl.exp(value * logit_scale - new_max[None, :, :]), axis=0)
                    total = total * tl.exp(running_max - new_max) + chunk_total
                    running_max = new_max
            offsets = image_out + ys[:, None] * out_w + xs[None, :]
            inside = y_inside[:, None] & x_inside[None, :]
            if WITH_SCORES:
                score = tl.exp(best * logit_scale - running_max) / total
                if HAS_BACKGROUND:
                    label = tl.where(score < background_threshold, -1, label)
                tl.store(scores_ptr + offsets, score, mask=inside)
            tl.store(labels_ptr + offsets, label.to(tl.int16), mask=inside)


@cells.fused_head
def segment_triton(call: cells.SegmentCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels and winner scores of ``kernels.reference.segment_reference``, fused.

    Runs compiled on CUDA tensors and under the Triton interpreter on CPU tensors (tests). Called as
    ``segment_triton(logits, out_size, *, grid_extent, logit_scale, background_threshold, score_tolerance,
    with_scores, out)``: the arguments of ``cells.segment_call``, which checks them.
    Returns:
        labels ``[B, H, W]`` int16 and scores ``[B, H, W]`` float32 (None without scores).
    """
    values, rows, cols, labels, scores = call.values, call.rows, call.cols, call.labels, call.scores
    batch, grid_h, grid_w, num_classes = values.shape
    height, width = labels.shape[1:]
    device, with_scores = values.device, scores is not None
    threshold = call.background_threshold
    if with_scores:  # the refined, shifted grid (module docstring), at scale 1: it is scaled already
        rows, cols = fine_grid.refine_sampling(rows, grid_h), fine_grid.refine_sampling(cols, grid_w)
        grid_h, grid_w = fine_grid.refined_size(grid_h), fine_grid.refined_size(grid_w)
    # A [BLOCK_K, BLOCK_Y, BLOCK_X] float32 tile per program: 8K elements on a GPU (registers);
    # the interpreter runs one numpy op per tile, so there it is larger and loops less.
    tile = 1 << 17 if interpreting() else 1 << 13
    block_x = min(next_power_of_2(cols.largest_span), 64)
    block_y = min(next_power_of_2(rows.largest_span), 32, max(1, tile // (8 * block_x)))
    kernel = launchable(_upsample_argmax, device)
    row_start, row_end = rows.start.int(), rows.end.int()
    col_start, col_end = cols.start.int(), cols.end.int()
    used = [r for r, (a, b) in enumerate(zip(rows.start.tolist(), rows.end.tolist())) if b > a]
    used_cols = torch.nonzero(cols.end > cols.start).flatten().int()  # [wu]
    band_rows = cells.balanced_band_rows(len(used), 4 * batch * grid_w * num_classes, PRUNE_ELEMENTS)
    for first in range(0, len(used), band_rows):
        band_used = used[first : first + band_rows]
        band = range(band_used[0], band_used[-1] + 1)
        read = range(band.start, min(band.stop + 1, grid_h))  # the grid rows the band's cells read
        if with_scores:
            grid = fine_grid.relative_logits(values, read, call.logit_scale)  # [B, rows read, wf, C]
            scale = 1.0
        else:
            grid, scale = values[:, read.start : read.stop].contiguous(), call.logit_scale
        local = range(0, len(band))
        candidates = cells.cell_candidates(grid, local, scale, call.score_tolerance if with_scores else None)
        # One program per cell that owns output pixels (downsampling leaves most cells empty).
        local_rows = torch.tensor(band_used, dtype=torch.int32, device=device) - band.start
        used_row = local_rows.repeat_interleave(used_cols.numel())  # [cells]
        used_col = used_cols.repeat(local_rows.numel())  # [cells]
        block_k = min(next_power_of_2(candidates.classes.shape[-1]), max(1, tile // (block_y * block_x)), 32)
        kernel[(batch * used_row.numel(),)](
            grid,
            candidates.classes,
            candidates.count,
            used_row,
            used_col,
            row_start,
            row_end,
            col_start,
            col_end,
            rows.lambda1,
            cols.lambda1,
            labels,
            labels if scores is None else scores,  # never written without scores
            grid_h,
            grid_w,
            num_classes,
            band.start,
            read.start,
            len(read),
            len(band),
            used_row.numel(),
            candidates.classes.shape[-1],
            height,
            width,
            scale,
            float(threshold or 0.0),
            HAS_BACKGROUND=threshold is not None,
            WITH_SCORES=with_scores,
            BLOCK_Y=block_y,
            BLOCK_X=block_x,
            BLOCK_K=block_k,
            num_warps=8 if block_k * block_y * block_x >= 4096 else 4,
        )
    return labels, scores
