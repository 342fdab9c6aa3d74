"""Labels only (upsample + argmax, no scores), exactly, one output row at a time.

Bilinear upsampling is separable. For one output row, interpolating the two grid rows around it
gives a table ``R[c, x]`` (each class at each grid column, at this row), and along the row each
class is linear between two grid columns: a pixel of the 1-D cell ``x0..x1`` at weight ``t``
sees ``v_c(t) = (1 - t) A_c + t B_c`` (``A = R[:, x0]``, ``B = R[:, x1]``). The classes that can
win somewhere in that row of the cell are the lines on the upper envelope of ``C`` lines over
``t in [0, 1]``: 3.3 on average even on structureless logits (C=150), where the 2-D four-corner
bound of ``cells.cell_candidates`` keeps 69.

**The test** (exact). Let ``w0`` win at ``t = 0`` and ``w1`` at ``t = 1``. A class ``c`` that wins
at some ``s`` by a margin ``m`` beats ``w0`` after the point where their lines cross (``c`` is not
above ``w0`` at 0, so ``v_c - v_w0`` grows), and ``w1`` before theirs, by at least ``m`` from
``s`` on (resp. up to ``s``). Hence for any ``tA``, ``tB`` in ``[0, 1]`` and any third line ``p``
(which ``c`` beats at ``s``, so at ``tA`` or at ``tB`` too when ``s`` lies between them, a line
minus a line being linear), ``c`` reaches, by at least ``m``, the lower of ``w0`` and ``p`` at
``tA`` or the lower of ``p`` and ``w1`` at ``tB``: the test keeps only such classes. It is tightest
where those lower lines are as high as can be: at the kinks of the upper envelope of ``w0, p, w1``
(``tA``: ``p`` crosses ``w0``; ``tB``: ``p`` crosses ``w1``) with ``p`` the highest class at
``t*``, where ``w0`` and ``w1`` cross. (In the plane of the points ``(A_c, B_c)`` the envelope's
classes are the convex hull's vertices from the largest ``A`` to the largest ``B``: these are
quickhull's first two steps.) Round 1 runs over every class with ``p`` = ``w0`` and ``tA = tB =
t*`` (7.6 classes kept per (row, cell) on iid logits at C=150); round 2 over those, with ``p`` the
highest at ``t*`` (3.6 kept; the envelope itself has 3.3). A small slack keeps the ties through
float rounding (``w0``, ``p`` and ``w1`` themselves, whose values in the test and in the bound
come from different ops, and duplicated classes); a class kept in excess costs time only, as
every kept class is evaluated at every pixel of its (row, cell).

**The labels.** The kept classes are evaluated at the cell's pixels with ``torch.argmax``'s rule
(the lowest index wins ties). ``w0``, that rule's winner at ``t = 0``, is the label of pixels at
weight 0, of cells with one grid column and of every pixel of a (row, cell) keeping one class,
so every pixel is first written with its left grid column's winner, and only the (row, cell)
pairs keeping several classes are evaluated and written again.

Everything runs on ``[C, rows, columns]`` tensors (classes outermost: reductions over classes are
element-wise maxima of whole planes, which torch vectorises, while reductions over an inner
dimension, ``argmax`` included, are 5-20x slower on the CPU), in bands of output rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import cells

# Elements of one [C, rows, grid columns] float32 tensor of a band: 4 MiB; two live in the workspace.
# A 32x32 grid at C=150 to 512 rows is 2.5 M elements: 3 bands.
BAND_ELEMENTS = 1 << 20
# Slack of the test, relative to the magnitude of the reference lines' values (float rounding of an
# interpolation is ~2^-23 of it). The tests pass without it: it is a margin against different ops
# rounding the same line differently (vectorised or not, fused multiply-add or not).
_SLACK = 2.0**-18
# Pixels evaluated at once: [pixels] int64 indices of 2 MiB.
ITEM_PIXELS = 1 << 18
_TINY = torch.finfo(torch.float32).tiny
_workspace = cells.Workspace()


def segment_labels(
    values: torch.Tensor,
    rows: cells.AxisSampling,
    cols: cells.AxisSampling,
    labels: torch.Tensor,
    tally: list[int] | None = None,
) -> None:
    """Write the ``upsample + argmax`` labels of float32 logits ``values`` ``[B, h, w, C]`` into
    ``labels`` ``[B, H, W]`` (int16, contiguous), sampled as ``rows`` / ``cols`` say.

    Works along the rows of the output, or along its columns (on the transposed problem, then
    transposed back) when that reads fewer (output line, grid point) pairs: ``H * w`` against
    ``W * h``, the size of the ``[C, ...]`` tables. On one intra-op thread (``cells.one_intra_op_thread``).
    ``tally``, if given (``[0, 0]``), gets the (pixel, class) evaluations and the pixels evaluated
    added (padding of short segments included): the other pixels took their winner from a grid
    column, one class each.
    """
    _, grid_h, grid_w, _ = values.shape
    height, width = labels.shape[1:]
    with cells.one_intra_op_thread(values.device):
        if width * grid_h * 4 < height * grid_w * 3:
            transposed = labels.new_empty((labels.shape[0], width, height))
            _segment_rows(values.transpose(1, 2), cols, rows, transposed, tally)
            labels.copy_(transposed.transpose(1, 2))
        else:
            _segment_rows(values, rows, cols, labels, tally)


def workspace_bytes() -> int:
    """Bytes this thread's workspace holds (kept between calls; see ``cells.Workspace``)."""
    return _workspace.bytes()


def release_workspace() -> None:
    """Drop this thread's workspace (the next call makes it again, at the size it needs)."""
    _workspace.release()


def _workspace_buffer(numel: int, device: torch.device) -> torch.Tensor:
    """The two band-sized tables' float32 buffer, of at least ``numel`` elements."""
    return _workspace.buffer(numel, device)


@dataclass(frozen=True)
class _Columns:
    """The grid columns a call reads, and the output columns of its 1-D cells.

    ``columns``: the grid columns read (ascending); ``pixel_left[x]``: output column ``x``'s left
    grid column, as an index into ``columns``. *Sloped* cells have two grid columns and a pixel at
    a weight above 0 (the others, the clamped last column and ATen's copy when sizes match, take
    the left column's winner); ``left`` / ``right`` ``[m]`` (into ``columns``) are their grid
    columns, and ``view_start`` is set when they are ``view_start + arange(m)`` and that plus 1.
    Their pixels at weights above 0 are split into segments of at most ``depth``: ``segment_x``
    ``[S, depth]`` (output columns; a short segment repeats its last one) and ``segment_t`` (their
    weights); cell ``i`` has ``cell_segments[i]`` segments from ``segment_of_cell[i]`` on.
    """

    columns: torch.Tensor
    pixel_left: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    view_start: int | None
    segment_x: torch.Tensor
    segment_t: torch.Tensor
    cell_segments: torch.Tensor
    segment_of_cell: torch.Tensor
    single_segments: bool


def _column_layout(cols: cells.AxisSampling, grid_w: int) -> _Columns:
    device = cols.index0.device
    index0, weights = cols.index0.tolist(), cols.lambda1.tolist()
    moving: dict[int, list[int]] = {}  # sloped cell -> its output columns at weights above 0
    for x, (cell, weight) in enumerate(zip(index0, weights)):
        if weight > 0.0 and cell < grid_w - 1:
            moving.setdefault(cell, []).append(x)
    sloped = sorted(moving)
    columns = sorted(set(index0) | {g + 1 for g in sloped})
    local = {g: i for i, g in enumerate(columns)}
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    left, right = [local[g] for g in sloped], [local[g + 1] for g in sloped]
    in_order = bool(left) and left == list(range(left[0], left[0] + len(left))) and right == [i + 1 for i in left]
    spans = [len(moving[g]) for g in sloped]
    # Segment length: the cells' pixels padded to whole segments, fewest in all (cells of 34 and 35
    # pixels: 35; of 16 and one of 40: 16).
    depth = min(set(spans), key=lambda d: (sum(-(-n // d) * d for n in spans), d)) if spans else 1
    segment_x, cell_segments, segment_of_cell = [], [], []
    for g in sloped:
        xs = moving[g]
        segment_of_cell.append(len(segment_x))
        for first in range(0, len(xs), depth):
            part = xs[first : first + depth]
            segment_x.append(part + [part[-1]] * (depth - len(part)))
        cell_segments.append(len(segment_x) - segment_of_cell[-1])
    segment_x = as_long(segment_x).view(-1, depth)  # [S, depth]
    return _Columns(
        columns=as_long(columns),
        pixel_left=as_long([local[g] for g in index0]),
        left=as_long(left),
        right=as_long(right),
        view_start=left[0] if in_order else None,
        segment_x=segment_x,
        segment_t=cols.lambda1[segment_x],
        cell_segments=as_long(cell_segments),
        segment_of_cell=as_long(segment_of_cell),
        single_segments=all(n == 1 for n in cell_segments),
    )


def _segment_rows(
    values: torch.Tensor,
    rows: cells.AxisSampling,
    cols: cells.AxisSampling,
    labels: torch.Tensor,
    tally: list[int] | None,
) -> None:
    """:func:`segment_labels` along the output rows (``values`` may be a transposed view)."""
    _, _, grid_w, num_classes = values.shape
    height, width = labels.shape[1:]
    layout = _column_layout(cols, grid_w)
    columns = layout.columns.numel()
    band_rows = cells.balanced_band_rows(height, num_classes * columns, BAND_ELEMENTS)
    workspace = _workspace_buffer(2 * num_classes * band_rows * columns, values.device)
    descending = torch.arange(num_classes, 0, -1, dtype=torch.float32, device=values.device)[:, None, None]
    for b in range(values.shape[0]):
        table = values[b].index_select(1, layout.columns).permute(2, 0, 1).contiguous()  # [C, h, n]
        flat_labels = labels[b].view(-1)
        for first in range(0, height, band_rows):
            band = range(first, min(first + band_rows, height))
            tables = workspace[: 2 * num_classes * len(band) * columns].view(2, num_classes, len(band), columns)
            _label_band(table, rows, band, layout, descending, tables, flat_labels, width, tally)


def _interpolate_rows(table: torch.Tensor, rows: cells.AxisSampling, band: range, out: torch.Tensor) -> None:
    """``out[c, y, x] = lerp(table[c, y0], table[c, y1], a_y)`` for the band's output rows (``[C, rows, n]``)."""
    index0 = rows.index0[band.start : band.stop]
    index1 = rows.index1[band.start : band.stop]
    weight = rows.lambda1[band.start : band.stop]
    grid_rows, counts = torch.unique_consecutive(index0, return_counts=True)
    if grid_rows.numel() * 2 > len(band):  # about one output row per grid row (downsampling): gathered
        torch.lerp(table.index_select(1, index0), table.index_select(1, index1), weight[None, :, None], out=out)
        return
    start = 0
    for grid_row, count in zip(grid_rows.tolist(), counts.tolist()):
        part = slice(start, start + count)
        next_row = int(index1[start])
        # One lerp per grid row, broadcast over its output rows: 10x faster here than one lerp of
        # gathered [C, rows, n] copies, as the downsampling branch does.
        torch.lerp(
            table[:, grid_row : grid_row + 1],
            table[:, next_row : next_row + 1],
            weight[None, part, None],
            out=out[:, part],
        )
        start += count


def _first_at(values: torch.Tensor, peak: torch.Tensor, descending: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The lowest index along dim 0 where ``values`` reaches ``peak`` (``[C, ...]`` -> ``[...]`` int64),
    through ``amax`` (``argmax`` over dim 0 is not vectorised): flag the maxima, weight them
    ``C, C-1, ..., 1`` (the last ``C`` of ``descending``), take the largest. ``out`` may be ``values``."""
    num_classes = values.shape[0]
    flags = torch.ge(values, peak, out=out).mul_(descending[-num_classes:])
    return num_classes - flags.amax(dim=0).long()


def _crossing(gap0: torch.Tensor, gap1: torch.Tensor, same: torch.Tensor | float) -> torch.Tensor:
    """Where two lines cross, given how far the first is above at 0 and the second above at 1
    (both >= 0): ``gap0 / (gap0 + gap1)`` in ``[0, 1]``, and ``same`` where both are 0 (one line twice)."""
    total = gap0 + gap1
    return torch.where(total > 0, gap0 / total.clamp_min(_TINY), same).clamp_(0.0, 1.0)


def _label_band(
    table: torch.Tensor,
    rows: cells.AxisSampling,
    band: range,
    layout: _Columns,
    descending: torch.Tensor,
    tables: torch.Tensor,
    flat_labels: torch.Tensor,
    width: int,
    tally: list[int] | None,
) -> None:
    """Labels of one band of output rows of one image (``flat_labels``: the image's, flat;
    ``tables``: ``[2, C, rows, n]`` of workspace)."""
    num_classes, _, columns = table.shape
    band_rows = len(band)
    values, scratch = tables[0], tables[1]  # [C, r, n] each
    _interpolate_rows(table, rows, band, values)
    winner = _first_at(values, values.amax(dim=0), descending, scratch)  # [r, n]: the lowest-index argmax
    band_labels = flat_labels[band.start * width : band.stop * width].view(band_rows, width)
    torch.index_select(winner.to(torch.int16), 1, layout.pixel_left, out=band_labels)
    cells_count = layout.left.numel()
    if cells_count == 0:
        return
    # The (row, sloped cell) pairs: each class's line goes from A (left column) to B (right).
    if layout.view_start is not None:
        start = layout.view_start
        left_values = values[:, :, start : start + cells_count]
        right_values = values[:, :, start + 1 : start + 1 + cells_count]
    else:
        left_values = values.index_select(2, layout.left)
        right_values = values.index_select(2, layout.right)
    flat_values = values.view(-1)
    row_base = torch.arange(band_rows, device=table.device)[:, None] * columns  # [r, 1]

    def line(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of one class per pair (``[r, m]`` class indices)."""
        offset = classes * (band_rows * columns) + row_base
        return flat_values.take(offset + layout.left), flat_values.take(offset + layout.right)

    m0, w0_right = line(winner.index_select(1, layout.left))  # w0's line: the highest at t = 0
    w1_left, m1 = line(winner.index_select(1, layout.right))  # w1's line: the highest at t = 1
    kink = _crossing(m0 - w1_left, m1 - w0_right, 0.0)  # t*, [r, m]
    # Round 1, over every class: keep those reaching the lower of w0 and w1 at t* (less the slack).
    floor = torch.minimum(torch.lerp(m0, w0_right, kink), torch.lerp(w1_left, m1, kink))
    floor.sub_((m0.abs() + m1.abs() + w0_right.abs() + w1_left.abs()).mul_(_SLACK))
    kept = scratch.view(-1)[: num_classes * band_rows * cells_count].view(num_classes, band_rows, cells_count)
    torch.lerp(left_values, right_values, kink, out=kept).ge_(floor)  # [C, r, m]: 1.0 or 0.0
    references = torch.stack([kink, m0, w0_right, w1_left, m1]).view(5, -1)  # [5, r * m]
    _label_pairs(kept, values, references, layout, band, flat_labels, width, tally)


def _label_pairs(
    kept: torch.Tensor,
    values: torch.Tensor,
    references: torch.Tensor,
    layout: _Columns,
    band: range,
    flat_labels: torch.Tensor,
    width: int,
    tally: list[int] | None,
) -> None:
    """Round 2 of the test, then the labels of the (row, cell) pairs keeping several classes.

    ``kept`` ``[C, r, m]`` (1.0: the class passed round 1 in the pair), ``values`` ``[C, r, n]``
    (the band's table; ``kept``'s memory is reused once read), ``references`` ``[5, r * m]``: ``t*``
    and the lines (``A, B``) of ``w0`` and ``w1`` per pair. Round 2 runs on the kept (pair, class)
    entries. Then pairs are ordered by how many classes they keep, most first, so that those with a
    k-th class are a prefix, and each pixel keeps a running maximum over its pair's classes in
    ascending order, replaced only by a strictly larger value (the lowest index wins ties, as
    ``torch.argmax``): no pair is padded to another's count.
    """
    num_classes, band_rows, cells_count = kept.shape
    columns = values.shape[2]
    device = kept.device
    pairs = band_rows * cells_count
    count = kept.sum(dim=0).view(-1)  # [r * m]
    hard = (count > 1).nonzero().squeeze(1)  # [q]: pairs keeping several classes
    num_hard = hard.numel()
    if num_hard == 0:
        return
    flags = kept.view(num_classes, pairs).bool()
    if num_hard < pairs * 3 // 4:
        flags = flags.index_select(1, hard)
        references = references.index_select(1, hard)
    else:  # all pairs: cheaper than selecting most of them
        hard = torch.arange(pairs, device=device)
        num_hard = pairs
    # Pair-major flags, so that nonzero lists each pair's classes together, ascending.
    entries = flags.T.contiguous().view(torch.uint8).view(-1).nonzero().squeeze(1)  # [e]: pair * C + class
    del flags
    entry_pair = entries // num_classes
    entry_class = entries - entry_pair * num_classes
    pair_row = hard // cells_count  # band-local output row of each pair, [q]
    pair_cell = hard - pair_row * cells_count
    # Each entry's line: its class at the pair's two grid columns (one take for both: the two values
    # usually share a cache line, while consecutive entries jump between class planes).
    base = (pair_row * columns).index_select(0, entry_pair) + entry_class * (band_rows * columns)  # [e]
    ends = torch.stack([layout.left.index_select(0, pair_cell), layout.right.index_select(0, pair_cell)], dim=1)
    left, right = values.view(-1).take(base[:, None] + ends.index_select(0, entry_pair)).T.contiguous()  # [e] each

    # Round 2: p = the first entry at the highest value at t*; keep what reaches the lower of w0 and
    # p where they cross (tA), or of p and w1 where those cross (tB).
    kink, m0, w0_right, w1_left, m1 = references  # [q] each
    at_kink = torch.lerp(left, right, kink.index_select(0, entry_pair))  # [e]
    peak = torch.full((num_hard,), -torch.inf, device=device).scatter_reduce_(0, entry_pair, at_kink, "amax")
    numbers = torch.arange(entry_pair.numel(), device=device)
    at_peak = torch.where(at_kink >= peak.index_select(0, entry_pair), numbers, entry_pair.numel())
    first = torch.full((num_hard,), entry_pair.numel(), device=device).scatter_reduce_(0, entry_pair, at_peak, "amin")
    p_left, p_right = left.index_select(0, first), right.index_select(0, first)
    # Where p crosses w0, and w1 (any point is sound: these are the tightest). Where p is w0's line
    # (or w1's), there is no crossing: t* then.
    t_a = _crossing(m0 - p_left, p_right - w0_right, kink)
    t_b = _crossing(p_left - w1_left, m1 - p_right, kink)
    slack = (m0.abs() + m1.abs() + w0_right.abs() + w1_left.abs() + p_left.abs() + p_right.abs()).mul_(_SLACK)
    floor_a = torch.minimum(torch.lerp(m0, w0_right, t_a), torch.lerp(p_left, p_right, t_a)).sub_(slack)
    floor_b = torch.minimum(torch.lerp(w1_left, m1, t_b), torch.lerp(p_left, p_right, t_b)).sub_(slack)
    keep = torch.lerp(left, right, t_a.index_select(0, entry_pair)) >= floor_a.index_select(0, entry_pair)
    keep |= torch.lerp(left, right, t_b.index_select(0, entry_pair)) >= floor_b.index_select(0, entry_pair)
    survivors = keep.nonzero().squeeze(1)  # still by pair, classes ascending
    entry_pair, entry_class = entry_pair.index_select(0, survivors), entry_class.index_select(0, survivors)
    left, right = left.index_select(0, survivors), right.index_select(0, survivors)
    pair_count = torch.bincount(entry_pair, minlength=num_hard)  # [q]
    slot = numbers[: entry_pair.numel()] - (pair_count.cumsum(0) - pair_count).index_select(0, entry_pair)

    # Pairs by count, most first (``rank``: each pair's place). Those keeping one class (w0) are
    # labelled already and left out. [K, q] tables of the lines and classes by (slot, place): only
    # the prefix of pairs having a slot is ever read.
    order = torch.argsort(pair_count, descending=True, stable=True)  # [q]
    rank = torch.empty_like(order).index_copy_(0, order, torch.arange(num_hard, device=device))
    widest = int(pair_count.max())
    # with_slot[k]: how many pairs (in order) keep more than k classes.
    with_slot = torch.bincount(pair_count, minlength=widest + 1).flip(0).cumsum(0).flip(0)[1:].tolist()
    evaluated = with_slot[1] if widest > 1 else 0
    if evaluated == 0:
        return
    place = (slot, rank.index_select(0, entry_pair))
    spare = kept.view(-1)  # read already
    size = 2 * widest * num_hard
    lines = (spare[:size] if size <= spare.numel() else spare.new_empty(size)).view(2, widest, num_hard)
    lines[0].index_put_(place, left)
    lines[1].index_put_(place, right)
    classes = torch.empty((widest, num_hard), dtype=torch.int16, device=device)
    classes.index_put_(place, entry_class.to(torch.int16))
    order = order[:evaluated]
    ordered_cell = pair_cell.index_select(0, order)
    ordered_row = pair_row.index_select(0, order) + band.start
    if layout.single_segments:  # an item is a pair: its cell's one segment of pixels
        segment = layout.segment_of_cell.index_select(0, ordered_cell)
        items_with_slot = with_slot
    else:  # an item is (pair, segment of its cell); items follow their pairs' order
        per_pair = layout.cell_segments.index_select(0, ordered_cell)
        item_place = torch.repeat_interleave(torch.arange(evaluated, device=device), per_pair)
        ends_at = per_pair.cumsum(0)
        segment = layout.segment_of_cell.index_select(0, ordered_cell).index_select(0, item_place) + (
            torch.arange(item_place.numel(), device=device) - (ends_at - per_pair).index_select(0, item_place)
        )
        ordered_row = ordered_row.index_select(0, item_place)
        lines = lines.index_select(2, item_place)
        classes = classes.index_select(1, item_place)
        items_with_slot = [int(ends_at[min(n, evaluated) - 1]) if n else 0 for n in with_slot]
    items, depth = segment.numel(), layout.segment_x.shape[1]
    if tally is not None:
        tally[0] += (items + sum(items_with_slot[1:widest])) * depth
        tally[1] += items * depth
    step = max(1, ITEM_PIXELS // depth)
    for start in range(0, items, step):  # chunks of items, so that [I, D] tensors stay small
        stop = min(start + step, items)
        part = segment[start:stop]
        weight = layout.segment_t.index_select(0, part)  # [i, D]
        best = torch.lerp(lines[0, 0, start:stop, None], lines[1, 0, start:stop, None], weight)  # [i, D]
        label = classes[0, start:stop, None].expand_as(best).clone()
        for k in range(1, widest):
            n = min(items_with_slot[k], stop) - start  # the chunk's items with a k-th class: a prefix
            if n <= 0:
                break
            value = torch.lerp(lines[0, k, start : start + n, None], lines[1, k, start : start + n, None], weight[:n])
            higher = value > best[:n]
            torch.maximum(best[:n], value, out=best[:n])
            torch.where(higher, classes[k, start : start + n, None], label[:n], out=label[:n])
        flat = ordered_row[start:stop, None] * width + layout.segment_x.index_select(0, part)  # [i, D]
        flat_labels.index_copy_(0, flat.view(-1), label.view(-1))
