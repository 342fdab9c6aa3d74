"""Upsample + argmax + winner score in tiled PyTorch, for CPUs (and any device torch runs on).

The same fusion as ``upsample_argmax.py`` without Triton. The output is made in bands of rows (a
band is the output rows of a few grid-cell rows); each pixel evaluates only its cell's candidate
classes (``cells.cell_candidates``, the exact bounds of DESIGN §4), so nothing of size
``C x H x W`` (nor ``C x rows x W``) ever exists. Labels without scores take another exact path,
``kernels/separable.py``: one output row at a time, the classes that can win along each row of a
cell are the upper envelope of lines, a few even where the 2-D bound keeps half of the classes.

Cells keep different numbers of classes (one inside a region, a few on its border), so pixels
are grouped by their cell's count rounded up to a power of two, and each group is one set of
vectorised ops on ``[pixels, K]``: padding a whole band to its largest cell would cost as much
as not pruning. Within a group the interpolation is separable: each (cell row, output column)
first interpolates its candidates along x on the two grid rows (``[pairs, K]``, small), then
every pixel is one ``lerp`` of those two.
"""

from __future__ import annotations

import torch

from kernels import cells, separable
from kernels.reference import BACKGROUND

# Elements of one [K, pairs, rows] float32 tensor of a group: 1 MiB; a few of them live at once.
GROUP_ELEMENTS = 1 << 18
# Pixels per chunk, for the [pairs, rows] int64 index tensors: 512 KiB each.
GROUP_PIXELS = 1 << 16
# Elements of the [rows, w, 4, C] corner tensor that prunes one band of cell rows: 4 MiB. Each
# band costs a fixed ~300 small ops (one set per pixel group), so fewer, taller bands are faster
# and costlier in memory: a 32x32 grid at C=150 in 1 band took 38 ms with an 8.0 MiB peak, in 2
# bands 40 ms and 6.1 MiB, in 3 bands 44-50 ms and 5.6 MiB (the reference: 400-450 ms, 450 MiB).
PRUNE_ELEMENTS = 1 << 20
_ABSENT = -1e30  # scaled logit of a padding slot: never the argmax, and exp() of it is 0


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
        with_scores: False computes labels only (scores None), through ``kernels.separable``: each
            row of each cell evaluates only the classes that can win along it, 1-4 even on
            structureless logits, where the scores would need nearly all.
        out: optional ``(labels [B, H, W] int16, scores [B, H, W] float32)`` to write into.
    Returns:
        labels ``[B, H, W]`` int16 (ties: the lowest class index) and scores ``[B, H, W]`` float32
        (None without scores).
    """
    (height, width), (extent_h, extent_w) = cells.check_segment_inputs(
        logits, out_size, grid_extent, logit_scale, background_threshold, with_scores
    )
    batch, grid_h, grid_w, num_classes = logits.shape
    labels, scores = cells.check_outputs(out, (batch, height, width), logits.device, with_scores)
    values = logits.float().contiguous()  # [B, h, w, C]
    rows = cells.axis_sampling(grid_h, height, extent_h, logits.device)
    cols = cells.axis_sampling(grid_w, width, extent_w, logits.device)
    if not with_scores:
        separable.segment_labels(values, rows, cols, labels)
        return labels, None
    used = [r for r, (a, b) in enumerate(zip(rows.start.tolist(), rows.end.tolist())) if b > a]
    band_rows = cells.balanced_band_rows(len(used), 4 * grid_w * num_classes, PRUNE_ELEMENTS)
    with cells.one_intra_op_thread(logits.device):
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
    group = _group_of(count)[segment_row][:, cols.index0].flatten()  # [S * W]: the group of each pair
    order = group.argsort(stable=True)  # pairs sorted by group
    sizes = torch.bincount(group, minlength=len(_GROUP_SLOTS)).tolist()
    offsets = torch.arange(depth, device=device)
    first = 0
    for group_id, size in enumerate(sizes):
        pairs, first = order[first : first + size], first + size
        if size == 0:
            continue
        # Per-pair quantities of the whole group ([q]); chunks slice them.
        pair_segment, pair_col = pairs // width, pairs % width
        cell_row = segment_row[pair_segment]
        first_row = segment_start[pair_segment]
        # A segment shorter than ``depth`` repeats its last row: same pixel, same value.
        last_offset = (segment_length[pair_segment] - 1).clamp_max(depth - 1)
        slots = min(_GROUP_SLOTS[group_id], classes.shape[-1])
        pair_cell = cell_row * classes.shape[1] + cols.index0[pair_col]  # [q]: band-local cell index
        if slots > 1:
            grid_row = cell_row + candidates.first_row
            along_x = _AlongX(values, grid_row, (grid_row + 1).clamp_max(grid_h - 1), cols, pair_col, logit_scale)
        # Chunks of pairs: [K, q, D] floats and [q, D] int64 indices within their budgets.
        step = min(cells.rows_per_band(depth * slots, GROUP_ELEMENTS), cells.rows_per_band(depth, GROUP_PIXELS))
        for start in range(0, size, step):
            part = slice(start, start + step)
            out_row = first_row[part, None] + torch.minimum(offsets, last_offset[part, None])  # [q, D]
            flat = (out_row * width + pair_col[part, None]).flatten()  # [q * D]
            pair_classes = classes.view(-1, classes.shape[-1])[pair_cell[part], :slots]  # [q, K]
            if slots == 1:
                # One class can matter: it wins, and the dropped ones move its score (1) by < tolerance.
                labels.index_copy_(0, flat, pair_classes.expand(-1, depth).flatten().to(torch.int16))
                scores.index_fill_(0, flat, 1.0)
                continue
            top, bottom = along_x(part, pair_classes.T.contiguous(), num_classes)  # [K, q] each
            # [K, q, D], classes outermost so that the reductions below run over whole planes.
            # lerp is one pass and rounds like ATen's w0 * a + w1 * b to within an ulp.
            scaled = torch.lerp(top[:, :, None], bottom[:, :, None], rows.lambda1[out_row])  # s * logits
            best = scaled.amax(dim=0)  # [q, D]
            shifted = scaled.sub_(best)  # <= 0, and exactly 0 where a slot holds the maximum
            # The first slot (lowest class: slots ascend) holding the maximum, as torch.argmax picks;
            # through amax because max/argmax with indices over dim 0 are not vectorised on CPUs,
            # and with an in-place float compare, 4x faster here than ``==`` into a bool tensor.
            at_best = torch.ge(shifted, 0.0, out=torch.empty_like(shifted))  # [K, q, D]: 1.0 or 0.0
            first_best = at_best.mul_(_descending(slots, device)).amax(dim=0)  # [q, D]: slots - index
            label = pair_classes.long().gather(1, slots - first_best.long())  # [q, D]
            score = shifted.exp_().sum(dim=0).reciprocal_()  # 1 / Z; the winner's term is 1
            if background_threshold is not None:
                label = label.masked_fill_(score < background_threshold, BACKGROUND)
            labels.index_copy_(0, flat, label.flatten().to(torch.int16))
            scores.index_copy_(0, flat, score.flatten())


# Candidate slots per pixel group: powers of two and 1.5 x powers of two, so padding wastes < 1/3.
_GROUP_SLOTS = sorted({m << e for e in range(31) for m in (2, 3)} | {1})


def _descending(slots: int, device: torch.device) -> torch.Tensor:
    """``[slots, 1, 1]`` float32: ``slots, slots - 1, ..., 1`` (exact: slots stay far below 2**24)."""
    return torch.arange(slots, 0, -1, dtype=torch.float32, device=device)[:, None, None]


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


class _AlongX:
    """``s * L`` of each pair's two grid rows at its output column, per candidate (``[K, q]`` each).

    The flat offsets and x weights are per pair; a chunk of pairs brings its candidate classes.
    """

    def __init__(
        self,
        values: torch.Tensor,
        grid_row: torch.Tensor,
        next_row: torch.Tensor,
        cols: cells.AxisSampling,
        pair_col: torch.Tensor,
        logit_scale: float,
    ):
        width, num_classes = values.shape[1:]
        self.flat = values.view(-1)
        left, right = cols.index0[pair_col], cols.index1[pair_col]
        self.offsets = [((row * width + col) * num_classes) for row in (grid_row, next_row) for col in (left, right)]
        weight = cols.lambda1[pair_col]  # [q]
        self.left_weight, self.right_weight = 1.0 - weight, weight
        self.logit_scale = logit_scale

    def __call__(self, part: slice, classes: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        absent = classes == num_classes  # [K, q]
        safe = classes.clamp_max(num_classes - 1).long()
        w0, w1 = self.left_weight[part], self.right_weight[part]
        rows = []
        for left, right in (self.offsets[:2], self.offsets[2:]):
            values0 = self.flat.take(left[part] + safe)  # [K, q]
            values1 = self.flat.take(right[part] + safe)
            # ATen's form, w0 * left + w1 * right.
            row = values0.mul_(w0).add_(values1.mul_(w1)).mul_(self.logit_scale)
            rows.append(row.masked_fill_(absent, _ABSENT))
        return rows[0], rows[1]
