"""Labels and winner scores on CPUs, exactly, band by band of refined cell rows.

A pixel's score is the softmax probability of its winner, ``exp(x_win) / sum_c exp(x_c)``, where
``x`` may be ``logit_scale * v`` shifted by any per-pixel constant. Here ``x`` is interpolated from
``fine_grid.relative_logits`` (at each point of a grid refined twice, every class minus the
largest, in float64 rounded once: see that module for why the exponents must be small numbers), so
``x <= 0`` (no overflow) and the classes that matter are near 0. The label is the argmax of the
same ``x``, by ``torch.max`` over the classes, which returns the first maximal index (documented):
ties go to the lowest class index, as ``torch.argmax`` in the reference.

**Pruning** (exact, per refined cell). Every pixel of a refined cell is a convex combination of
its 4 corners, so class ``c``'s exponent there is at most ``hi_c = max_k X[c, k]`` and the winner's
at least ``lo = max_c min_k X[c, k]`` (the class whose lowest corner is highest is below the
winner everywhere): relative to the winner's, ``c``'s term is at most ``b_c = exp(hi_c - lo)``. A
class with ``b_c < tolerance / C`` is dropped. The dropped terms sum to ``D < tolerance`` (relative
to the winner's), which ``Z = sum_c exp(x_c - x_win) >= 1`` loses: the score ``1 / Z`` moves by
``D / (Z (Z - D)) <= D / (Z - D) <= D < tolerance``, as the winner is never dropped (``hi_win >=
lo``, so ``b_win >= 1``) and ``Z - D >= 1``; nor is any class that can win a pixel, so the labels
are exact. (Float32 rounding of ``X``, ~1e-6 of an exponent, moves the bounds by ``exp(1e-6)``.)
At scale 100 and ``tolerance`` 1e-7 a cell of a scene keeps ~30 of 150 classes.

**The native kernel** (``kernels/native.py``, where a C compiler builds it: what the CPU head runs):
every block of pixels of one refined cell in vector lanes, the classes the bound below keeps for it
broadcast one at a time (every class where it keeps ``NATIVE_DENSE_FRACTION`` of them), the largest value,
its first class and the sum of exps in one pass (``kernels/_native_source.py``); with scores, where the
output is upsampled enough (``native.strips_fit``), as *strips*: 16 output columns in the lanes, each
class's exps a geometric progression down a cell's rows (two exps per class and chain of 8 rows, then a
multiply per row; each 16 columns evaluate the classes some cell under them keeps). The eager
evaluations below are its fallback; per (pixel, class) they cost one pass over memory per step, the
kernel about 0.4 ns for all of them together as blocks, 0.2 as strips (``benchmarks.head``). Labels alone
(:func:`segment` without scores) run it on the grid itself, each cell keeping the classes that can win there.

**Dense bands** (cells keep most classes: structureless logits, where at scale 100 nearly every
class is within ``exp(-20)`` of the winner; or blocks of a few pixels, where gathering a cell's
classes costs more than evaluating all of them): every class at every pixel, no gathers. Each output
row is interpolated between its two refined rows into a table ``T[column, class]``; along the row,
pixels between the same two refined columns form *segments* of at most ``depth`` pixels, so that
``[rows, segments, depth, C]`` is one ``lerp`` of broadcast columns, classes innermost: ``max`` and
the sum run over contiguous rows (float32 cascade sum: ~1e-7 of a score, where a strictly
sequential sum over 150 classes, as torch's softmax over dim 1 does, reached 1.5e-6).

**Sparse bands**: blocks of at most ``depth_y x depth_x`` pixels of one refined cell, grouped by
their cell's count of kept classes (rounded up to a power of two, or 1.5 times one); a group
gathers its classes' 4 corner values once per block and evaluates ``[K, depth_y, depth_x, blocks]``
(blocks innermost), summing over the classes pairwise.

**Exponents far below 0.** ``exp`` of float32 below -87 runs 40-100x slower (denormal and zero
results), so exponents are clamped at ``FLOOR`` where they can be below it: a term raised to
``exp(-87)`` adds under ``C * exp(-87 - UNDERFLOW)`` (relative) to ``Z``. Where a chunk's winner is
below ``UNDERFLOW`` (huge logit scales or slopes), each pixel's largest exponent is subtracted first.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

from kernels import cells, fine_grid, native, separable

# Elements of a float32 evaluation chunk ([rows, segments, depth, C] or [K, dy, dx, blocks]): 4 MiB.
CHUNK_ELEMENTS = 1 << 20
# Elements of a band's refined grid ([rows, refined columns, C + 1] float32): 4 MiB.
BAND_ELEMENTS = 1 << 20
# A band is evaluated densely (every class, no gathers) when its gathered evaluation would cost this
# share of the dense one: ``K (1 + GATHER_COST / pixels per block)`` against ``C`` per pixel, with ``K``
# the classes its cells keep (a gathered corner value cost ~4 evaluated ones: 4 corners, 16).
DENSE_FRACTION = 0.8
GATHER_COST = 16.0
# The native kernel evaluates every class (contiguous loads, no list) of a block keeping this share of them.
NATIVE_DENSE_FRACTION = 0.9
# With scores, the native kernel runs strips where the columns fit (``native.strips_fit``), each class's terms a
# geometric progression down a cell's rows where that is exact (``NATIVE_GEOMETRIC``); else blocks. (Tests turn
# each off to hold every path to the reference.)
NATIVE_STRIPS = True
NATIVE_GEOMETRIC = True
# Lowest exponent exp() is given (exp(-87) ~ 1.6e-38: float32's smallest normal numbers are near it).
FLOOR = -87.0
# A band whose winners may fall below this exponent subtracts each pixel's largest first.
UNDERFLOW = -40.0
# Class slots per block group: powers of two and 1.5 x powers of two, so padding wastes < 1/3.
_GROUP_SLOTS = sorted({m << e for e in range(31) for m in (2, 3)} | {1})


def segment(
    values: torch.Tensor,
    rows: cells.AxisSampling,
    cols: cells.AxisSampling,
    labels: torch.Tensor,
    scores: torch.Tensor | None,
    logit_scale: float,
    tolerance: float,
    tally: list[int] | None = None,
    kernel: native.NativeKernel | None = None,
) -> None:
    """Write each pixel's label (the argmax, the lowest class on ties) and score (its softmax
    probability) into ``labels`` ``[B, H, W]`` (int16) and ``scores`` ``[B, H, W]`` (float32), both
    contiguous; ``scores`` None: labels only. The CPU head's one entry, with or without the kernel.

    Args:
        values: logits ``[B, h, w, C]`` float32, sampled as ``rows`` / ``cols`` say.
        logit_scale: the softmax scale.
        tolerance: the most the pruning may change a score (module docstring).
        tally: if given (``[0, 0]``), gets the (pixel, class) evaluations (padding included) and the
            pixels evaluated (padding included) added (labels only in eager torch: as
            ``separable.segment_labels`` counts them).
        kernel: evaluate with this native kernel (``kernels.native``); None: eager torch.

    Labels only: the kernel runs on the grid itself (not refined), each point shifted by its largest
    class (the argmax ignores it), every cell evaluating only the classes that can win in it
    (``max_k X[c, k] >= max_c' min_k X[c', k]``); eager torch is ``kernels.separable``. With scores,
    eager torch works along the output rows, or along the columns (the transposed problem) when the
    image is taller than wide relative to the grid; on one intra-op thread (``cells.one_intra_op_thread``).
    """
    if scores is None and kernel is None:
        separable.segment_labels(values, rows, cols, labels, tally)
        return
    if scores is not None and not (0 < tolerance < 1):
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    batch, grid_h, grid_w, num_classes = values.shape
    height, width = labels.shape[1:]
    if kernel is None and width * grid_h * 4 < height * grid_w * 3:  # the choice separable.segment_labels makes
        shape = (batch, width, height)  # the transposed problem (never transposed again: it is wider)
        out_labels, out_scores = labels.new_empty(shape), scores.new_empty(shape)
        segment(values.transpose(1, 2), cols, rows, out_labels, out_scores, logit_scale, tolerance, tally)
        labels.copy_(out_labels.transpose(1, 2))
        scores.copy_(out_scores.transpose(1, 2))
        return
    factor = 1 if scores is None else fine_grid.REFINE  # labels only: the grid itself
    row_cells, col_cells = _refined_cells(rows, grid_h, factor), _refined_cells(cols, grid_w, factor)
    with cells.one_intra_op_thread(values.device):
        if kernel is not None:
            # The pruning of the module docstring, per block in the kernel; without scores, the classes that can win.
            bound = 0.0 if scores is None else math.log(tolerance / num_classes)
            scale = 1.0 if scores is None else logit_scale  # the argmax does not depend on it
            _segment_native(kernel, values, row_cells, col_cells, labels, scores, scale, bound, factor, tally)
            return
        # Eager torch along the output rows (``values`` may be a transposed view).
        fine_w = fine_grid.refined_size(grid_w)
        band_cells = cells.balanced_band_rows(row_cells.cells, fine_w * (num_classes + 1), BAND_ELEMENTS)
        block = row_cells.index.shape[1] * col_cells.index.shape[1]  # pixels a gathered block evaluates
        for b, band, in_band, points in _bands(batch, row_cells, band_cells):
            grid = fine_grid.relative_logits(values[b : b + 1], points, logit_scale, pad=True)[0]  # [p, wf, C + 1]
            work = _Band(b, band.start, in_band, grid, row_cells, col_cells, labels, scores, tally)
            keep = _kept_classes(grid[..., :num_classes], row_cells.upper, col_cells.upper, tolerance)
            count = keep.sum(dim=-1)  # [cy, cx]
            if count.float().mean() * (1 + GATHER_COST / block) >= DENSE_FRACTION * num_classes:
                _evaluate_dense(work)
            else:
                _evaluate_sparse(work, keep, count)


def workspace_bytes() -> int:
    """Bytes the workspaces of this thread's score evaluations hold (kept between calls:
    ``cells.Workspace``), the refined grid's and the native kernel's buffers included."""
    kernel = native.loaded()
    return _workspace.bytes() + fine_grid.workspace_bytes() + (kernel.buffer_bytes() if kernel else 0)


def release_workspace() -> None:
    """Drop this thread's workspaces (the next call makes them again, at the sizes it needs)."""
    _workspace.release()
    fine_grid.release_workspace()
    kernel = native.loaded()
    if kernel is not None:
        kernel.release_buffers()


@dataclass(frozen=True)
class _AxisCells:
    """The output indices of one axis grouped by refined cell, in segments of at most ``depth``.

    ``cell`` ``[S]``: each segment's cell (its first refined point; the second is ``cell + upper``);
    ``index`` ``[S, depth]``: its output indices (a short segment repeats its last); ``weight``
    ``[S, depth]``: their weights of the second point; ``cell_of`` / ``weight_of`` ``[N]``: the same
    per output index. A pixel on the last refined point belongs to the last cell, at weight 1; an
    axis of one point has one cell of one point (``upper`` 0).
    """

    cell: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    cell_of: torch.Tensor
    weight_of: torch.Tensor
    upper: int
    cells: int

    @cached_property
    def fits_strips(self) -> bool:
        """As columns, whether the native kernel's strips can run them (``native.strips_fit``; once per axis)."""
        return native.strips_fit(self.cell_of)


_REFINED_CELLS: dict[tuple[int, int, int], tuple[cells.AxisSampling, _AxisCells]] = {}
_REFINED_CELLS_LOCK = threading.Lock()


def _refined_cells(axis: cells.AxisSampling, grid_size: int, factor: int) -> _AxisCells:
    """``_axis_cells`` of ``axis`` refined ``factor`` times, kept for the same ``axis`` object (what
    ``cells.axis_sampling`` returns for the same sizes): an image size seen before costs nothing."""
    key = (id(axis), grid_size, factor)
    with _REFINED_CELLS_LOCK:
        found = _REFINED_CELLS.get(key)
    if found is not None and found[0] is axis:
        return found[1]
    grouped = _axis_cells(fine_grid.refine_sampling(axis, grid_size, factor), fine_grid.refined_size(grid_size, factor))
    with _REFINED_CELLS_LOCK:
        if len(_REFINED_CELLS) >= 64:
            _REFINED_CELLS.pop(next(iter(_REFINED_CELLS)))
        _REFINED_CELLS[key] = (axis, grouped)  # the axis is kept alive with it, so its id is not reused
    return grouped


def _axis_cells(axis: cells.AxisSampling, points: int) -> _AxisCells:
    """Group an axis refined to ``points`` points (``fine_grid.refine_sampling``) by cell."""
    last = max(points - 2, 0)
    cell = axis.index0.clamp_max(last)
    weight = torch.where(axis.index0 > last, 1.0, axis.lambda1) if points > 1 else torch.zeros_like(axis.lambda1)
    cell_list = cell.tolist()
    runs: list[list[int]] = []
    for i, c in enumerate(cell_list):
        if runs and cell_list[runs[-1][0]] == c:
            runs[-1].append(i)
        else:
            runs.append([i])
    spans = sorted({len(run) for run in runs})
    # The depth that pads the runs to whole segments with the fewest indices in all.
    depth = min(spans, key=lambda d: (sum(-(-len(run) // d) * d for run in runs), d))
    index = []
    for run in runs:
        for first in range(0, len(run), depth):
            part = run[first : first + depth]
            index.append(part + [part[-1]] * (depth - len(part)))
    index = torch.tensor(index, dtype=torch.long, device=cell.device).view(-1, depth)  # [S, depth]
    return _AxisCells(cell[index[:, 0]], index, weight[index], cell, weight, int(points > 1), last + 1)


def _segment_native(
    kernel: native.NativeKernel,
    values: torch.Tensor,
    row_cells: _AxisCells,
    col_cells: _AxisCells,
    labels: torch.Tensor,
    scores: torch.Tensor | None,
    logit_scale: float,
    bound: float,
    factor: int,
    tally: list[int] | None,
) -> None:
    """Bands of cell rows of the grid refined ``factor`` times (``fine_grid.relative_logits``), each
    evaluated by the native kernel, block by block, each block keeping the classes ``bound`` keeps
    (``NativeKernel.segment_blocks``)."""
    batch, _, grid_w, num_classes = values.shape
    fine_w = fine_grid.refined_size(grid_w, factor)
    # With scores, strips (each class's exps a geometric progression down the rows) where the columns fit them.
    strips = scores is not None and NATIVE_STRIPS and col_cells.fits_strips
    if strips:
        columns = (col_cells.cell_of, col_cells.weight_of, col_cells.upper)
        lanes = -(-labels.shape[2] // 16) * 16 * -(-row_cells.index.shape[1] // 4) * 4  # a segment's, 4 rows a pass
    else:
        columns = (col_cells.cell, col_cells.index, col_cells.weight, col_cells.upper)
        block = row_cells.index.shape[1] * col_cells.index.shape[1]
        lanes = -(-block // 16) * 16 * col_cells.cell.numel()  # its blocks' vectors' spare lanes included
    band_cells = cells.balanced_band_rows(row_cells.cells, fine_w * num_classes, BAND_ELEMENTS)
    for b, band, in_band, points in _bands(batch, row_cells, band_cells):
        grid = kernel.relative_logits(values[b].float().contiguous(), points, logit_scale, factor)  # [p, wf, C]
        band_rows = row_cells.cell.index_select(0, in_band) - band.start
        rows = (band_rows, row_cells.index[in_band], row_cells.weight[in_band], row_cells.upper)
        if strips:
            evaluated = kernel.segment_strips(
                grid, rows, columns, bound, NATIVE_DENSE_FRACTION, labels[b], scores[b], NATIVE_GEOMETRIC
            )
        else:
            evaluated = kernel.segment_blocks(
                grid, rows, columns, bound, NATIVE_DENSE_FRACTION, labels[b], None if scores is None else scores[b]
            )
        if tally is not None:
            tally[0] += evaluated
            tally[1] += in_band.numel() * lanes


def _bands(batch: int, row_cells: _AxisCells, band_cells: int) -> Iterator[tuple[int, range, torch.Tensor, range]]:
    """Each image's bands of ``band_cells`` cell rows that hold output rows: ``(image, band's cells,
    its row segments [s], the grid points it reads)`` (downsampling leaves some cells without a row)."""
    for b in range(batch):
        for first in range(0, row_cells.cells, band_cells):
            band = range(first, min(first + band_cells, row_cells.cells))
            in_band = ((row_cells.cell >= band.start) & (row_cells.cell < band.stop)).nonzero()[:, 0]
            if in_band.numel():
                yield b, band, in_band, range(band.start, band.stop + row_cells.upper)


def _cell_extremes(grid: torch.Tensor, upper_y: int, upper_x: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each refined cell's largest and smallest corner, per class: ``[cells_y, cells_x, C]`` each."""
    rows = grid.shape[0] - upper_y
    above, below = grid[:rows], grid[upper_y : upper_y + rows]  # [cy, wf, C]
    highest, lowest = torch.maximum(above, below), torch.minimum(above, below)
    columns = grid.shape[1] - upper_x
    highest = torch.maximum(highest[:, :columns], highest[:, upper_x : upper_x + columns])
    lowest = torch.minimum(lowest[:, :columns], lowest[:, upper_x : upper_x + columns])
    return highest, lowest


def _kept_classes(grid: torch.Tensor, upper_y: int, upper_x: int, tolerance: float) -> torch.Tensor:
    """``[cells_y, cells_x, C]`` bool: the classes each refined cell evaluates (module docstring)."""
    num_classes = grid.shape[-1]
    highest, lowest = _cell_extremes(grid, upper_y, upper_x)
    floor = lowest.amax(dim=-1, keepdim=True)  # the winner's exponent is at least this in the cell
    return highest.sub_(floor) >= math.log(tolerance / num_classes)


@dataclass
class _Band:
    """What both evaluations of one band of one image need."""

    image: int
    first_cell: int
    rows: torch.Tensor  # [s] the row segments in the band
    grid: torch.Tensor  # [band cells + upper, wf, C + 1]: the refined grid, class C the padding
    row_cells: _AxisCells
    col_cells: _AxisCells
    labels: torch.Tensor  # [B, H, W]
    scores: torch.Tensor
    tally: list[int] | None

    def write(self, pixel_rows: torch.Tensor, pixel_cols: torch.Tensor, label: torch.Tensor, score: torch.Tensor):
        """``labels[row, col], scores[row, col] = label, score`` (broadcast index blocks; padding
        repeats a pixel with its own values)."""
        width = self.labels.shape[2]
        flat = (pixel_rows * width + pixel_cols).reshape(-1)
        self.labels[self.image].view(-1).index_copy_(0, flat, label.reshape(-1).to(torch.int16))
        self.scores[self.image].view(-1).index_copy_(0, flat, score.reshape(-1))


def _evaluate_dense(work: _Band) -> None:
    """Every class at every pixel: per chunk of output rows, a row table, then ``[r, S, depth, C]``."""
    grid = work.grid[..., :-1].contiguous()  # without the padding class: lerp on slices ran 6x slower
    num_classes = grid.shape[-1]
    clamp = bool(grid.min() < FLOOR)
    row_cells, col_cells = work.row_cells, work.col_cells
    out_rows = torch.unique(row_cells.index.index_select(0, work.rows))  # the band's output rows, ascending
    segments, depth = col_cells.index.shape
    left, right = col_cells.cell, col_cells.cell + col_cells.upper
    weight = col_cells.weight[None, :, :, None]  # [1, S, depth, 1]
    step = cells.rows_per_band(segments * depth * num_classes, CHUNK_ELEMENTS)
    evaluated, table_size = step * segments * depth * num_classes, step * grid.shape[1] * num_classes
    buffer = _workspace.buffer(evaluated + table_size, grid.device)  # kept between calls: no page faults
    if work.tally is not None:
        work.tally[0] += out_rows.numel() * segments * depth * num_classes
        work.tally[1] += out_rows.numel() * segments * depth
    for start in range(0, out_rows.numel(), step):
        chunk = out_rows[start : start + step]
        table = buffer[evaluated : evaluated + chunk.numel() * grid.shape[1] * num_classes].view(-1, *grid.shape[1:])
        _row_table(grid, row_cells, chunk, work.first_cell, table)  # [r, wf, C]
        exponent = buffer[: chunk.numel() * segments * depth * num_classes].view(-1, segments, depth, num_classes)
        torch.lerp(
            table.index_select(1, left)[:, :, None], table.index_select(1, right)[:, :, None], weight, out=exponent
        )
        peak, label = exponent.max(dim=-1)  # [r, S, depth]: the first maximal class
        if bool(peak.min() < UNDERFLOW):
            exponent.sub_(peak[..., None])
            peak.zero_()
        if clamp:
            exponent.clamp_min_(FLOOR)
        score = peak.clamp_min_(FLOOR).exp_().div_(exponent.exp_().sum(dim=-1))
        work.write(chunk[:, None, None], col_cells.index[None], label, score)


def _row_table(
    grid: torch.Tensor, row_cells: _AxisCells, out_rows: torch.Tensor, first_cell: int, out: torch.Tensor
) -> None:
    """``out[r, column, class]``: each output row between its cell's two refined rows (ascending rows;
    one ``lerp`` per cell, broadcast over its rows)."""
    cell = row_cells.cell_of.index_select(0, out_rows) - first_cell
    weight = row_cells.weight_of.index_select(0, out_rows)
    points, counts = torch.unique_consecutive(cell, return_counts=True)
    start = 0
    for point, count in zip(points.tolist(), counts.tolist()):
        part = slice(start, start + count)
        following = point + row_cells.upper
        torch.lerp(grid[point : point + 1], grid[following : following + 1], weight[part, None, None], out=out[part])
        start += count


def _evaluate_sparse(work: _Band, keep: torch.Tensor, count: torch.Tensor) -> None:
    """Blocks of one refined cell, grouped by their cell's count of kept classes: ``[K, dy, dx, q]``
    (blocks innermost: every op then runs over long contiguous rows; with ``dx`` innermost, 8
    elements, lerp ran 3-4x slower per element)."""
    grid = work.grid
    row_cells, col_cells = work.row_cells, work.col_cells
    _, fine_w, padded = grid.shape
    depth_y, depth_x = row_cells.index.shape[1], col_cells.index.shape[1]
    cells_x = count.shape[1]
    # Blocks: (row segment, column segment) pairs, and their cells in the band.
    block_row = work.rows.repeat_interleave(col_cells.cell.numel())  # [q]: row segment
    block_col = torch.arange(col_cells.cell.numel(), device=grid.device).repeat(work.rows.numel())
    block_cell = (row_cells.cell[block_row] - work.first_cell) * cells_x + col_cells.cell[block_col]
    block_count = count.view(-1).index_select(0, block_cell)
    widest = int(count.max())  # over every cell of the band (some may own no pixel)
    classes = cells.compact(keep, widest).view(-1, widest)  # [cells, widest] int32, padded with C
    group = torch.searchsorted(torch.tensor(_GROUP_SLOTS, device=grid.device), block_count)
    order = group.argsort(stable=True)
    sizes = torch.bincount(group, minlength=len(_GROUP_SLOTS)).tolist()
    flat_grid = grid.view(-1)
    step_x, step_y = col_cells.upper * padded, row_cells.upper * fine_w * padded
    evaluated = _workspace.buffer(max(CHUNK_ELEMENTS, depth_y * depth_x * widest), grid.device)  # no page faults
    first = 0
    for group_id, size in enumerate(sizes):
        blocks, first = order[first : first + size], first + size
        if size == 0:
            continue
        k = min(_GROUP_SLOTS[group_id], widest)
        per_chunk = cells.rows_per_band(depth_y * depth_x * k, CHUNK_ELEMENTS)
        if work.tally is not None:
            work.tally[0] += size * depth_y * depth_x * k
            work.tally[1] += size * depth_y * depth_x
        for start in range(0, size, per_chunk):
            chunk = blocks[start : start + per_chunk]
            rs, cs = block_row.index_select(0, chunk), block_col.index_select(0, chunk)  # [q]
            block_classes = classes.index_select(0, block_cell.index_select(0, chunk))[:, :k].T.long()  # [k, q]
            cell_y = row_cells.cell.index_select(0, rs) - work.first_cell
            base = (cell_y * fine_w + col_cells.cell.index_select(0, cs)) * padded + block_classes  # [k, q]
            corner = [flat_grid.take(base + offset)[:, None] for offset in (0, step_x, step_y, step_y + step_x)]
            weight_x = col_cells.weight.index_select(0, cs).T.contiguous()  # [dx, q]
            top = torch.lerp(corner[0], corner[1], weight_x)[:, None]  # [k, 1, dx, q]
            bottom = torch.lerp(corner[2], corner[3], weight_x)[:, None]
            weight_y = row_cells.weight.index_select(0, rs).T.contiguous()[None, :, None]  # [1, dy, 1, q]
            exponent = evaluated[: k * depth_y * depth_x * chunk.numel()].view(k, depth_y, depth_x, -1)
            torch.lerp(top, bottom, weight_y, out=exponent)  # [k, dy, dx, q]
            peak, slot = exponent.max(dim=0)  # [dy, dx, q]: the first maximal slot (classes ascend)
            label = block_classes.gather(0, slot.view(-1, slot.shape[-1])).view(slot.shape)
            if bool(peak.min() < UNDERFLOW):
                exponent.sub_(peak)
                peak.zero_()
            exponent.clamp_min_(FLOOR)  # padding slots (and, where the grid reaches it, far classes)
            score = peak.clamp_min_(FLOOR).exp_().div_(_sum_classes(exponent.exp_()))
            pixel_rows = row_cells.index.index_select(0, rs).T[:, None, :]  # [dy, 1, q]
            pixel_cols = col_cells.index.index_select(0, cs).T[None]  # [1, dx, q]
            work.write(pixel_rows, pixel_cols, label, score)


def _sum_classes(terms: torch.Tensor) -> torch.Tensor:
    """``terms.sum(dim=0)`` pairwise (halving in place): a reduction over dim 0 adds the rows in
    order, whose float32 rounding grows with their number, where halving grows with its log."""
    rows = terms.shape[0]
    while rows > 1:
        half = rows // 2
        terms[:half].add_(terms[rows - half : rows])
        rows -= half
    return terms[0]


_workspace = cells.Workspace()
