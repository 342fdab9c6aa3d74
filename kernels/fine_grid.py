"""The grid the scores are computed on: refined, shifted and scaled logits, and where pixels sample it.

The winner's score is ``1 / sum_c exp(x_c - x_win)`` with ``x = logit_scale * v``: at scale 100 an
exponent off by 1e-6 moves a score by up to 2.5e-7, and float32 holds ``x ~ 30`` only to 1e-6. So the
exponents must be formed where they are small. Two exact rewrites make them small:

* **Shift.** Subtracting one number from every class at a grid point (its largest logit) and
  interpolating shifts every class at a pixel by the same amount (the interpolated maxima), which
  the softmax and the argmax ignore. Every class then sits at or below 0 at the grid points, and
  the classes that matter (within ~20 of the winner) are small numbers there.
* **Refinement.** Between grid points the winner dips below the interpolated maxima (on a region
  border the two classes that cross are both below the line joining their peaks), by up to half
  the cell's rise. On a grid refined ``REFINE`` times (``(n - 1) * REFINE + 1`` points per axis,
  point ``i`` at position ``i / REFINE``) every refined cell is a sub-rectangle of a grid cell, on
  which the bilinear interpolant is the bilinear interpolant of its own corner values: the pixel
  values are unchanged in exact arithmetic, and the dip shrinks with the cell.

The refined values are computed in float64 from the logits and rounded once to float32; a pixel
then costs two float32 interpolations, as on the original grid. Measured at C=150, 512x512,
scale 100 (scores against the float64 reference): random logits 3e-7 with or without refinement;
scene-like logits 8.9e-7 on the original grid, 3.9e-7 refined twice, no better with 4 or 8.
"""

from __future__ import annotations

import torch

from kernels.cells import AxisSampling, Workspace

#: Refined grid points per grid cell side.
REFINE = 2


def refined_size(grid_size: int, factor: int = REFINE) -> int:
    """Points of an axis of ``grid_size`` grid points refined ``factor`` times."""
    return (grid_size - 1) * factor + 1


def refine_sampling(axis: AxisSampling, grid_size: int, factor: int = REFINE) -> AxisSampling:
    """``axis`` (output positions on a grid axis of ``grid_size`` points) on the refined axis.

    A pixel at ``index0 + lambda1`` (``index1 = index0 + 1``) is at refined position
    ``factor * index0 + factor * lambda1``: refined index ``factor * index0 + k`` with ``k`` the integer
    part of ``factor * lambda1`` (at most ``factor - 1``) and weight ``factor * lambda1 - k``, both exact
    in float32 (``factor`` is a power of two). A pixel that samples one grid point (``index1 ==
    index0``: the clamped border, ATen's copy) samples its refined point with weight 0.
    """
    if factor & (factor - 1) or factor < 1:
        raise ValueError(f"factor must be a power of two, got {factor}")
    moving = axis.index1 != axis.index0
    scaled = axis.lambda1 * factor
    step = scaled.floor().clamp_(0, factor - 1)
    index0 = axis.index0 * factor + torch.where(moving, step.long(), 0)
    lambda1 = torch.where(moving, scaled - step, 0.0)
    index1 = index0 + moving.long()
    points = torch.arange(refined_size(grid_size, factor), device=index0.device)
    start = torch.searchsorted(index0, points, right=False)
    end = torch.searchsorted(index0, points, right=True)
    return AxisSampling(index0, index1, lambda1, start, end)


def relative_logits(
    values: torch.Tensor, rows: range, logit_scale: float, factor: int = REFINE, pad: bool = False
) -> torch.Tensor:
    """``logit_scale * (v - max_c v)`` at refined grid points: rows ``rows`` of the refined grid, every column.

    Args:
        values: logits ``[B, h, w, C]`` (any float dtype; read as float64).
        rows: refined rows (a ``range`` with step 1).
        logit_scale: the softmax scale.
        factor: the refinement (a power of two).
        pad: add a class ``C`` at float32's lowest number (interpolating it keeps it there, below
            every class): the padding slot of gathered class lists.
    Returns:
        ``[B, len(rows), (w - 1) * factor + 1, C (+ 1)]`` float32, at most 0 (the largest class at
        each point is 0). A view of this thread's workspace: valid until the next call.
    """
    batch, grid_h, grid_w, num_classes = values.shape
    device = values.device
    top = rows.start // factor
    bottom = min((rows.stop - 1 + factor - 1) // factor, grid_h - 1)  # the grid rows the band reads
    fine_w = refined_size(grid_w, factor)
    read_rows = refined_size(bottom - top + 1, factor)
    grid = values[:, top : bottom + 1].double()  # [B, g, w, C]
    scratch = _workspace.buffer(batch * (read_rows * grid_w + len(rows) * fine_w) * num_classes, device, torch.float64)
    along_rows = scratch[: batch * read_rows * grid_w * num_classes].view(batch, read_rows, grid_w, num_classes)
    _refine(grid, 1, factor, along_rows)
    along_rows = along_rows[:, rows.start - top * factor : rows.stop - top * factor]  # [B, r, w, C]
    start = batch * read_rows * grid_w * num_classes
    refined = scratch[start : start + batch * len(rows) * fine_w * num_classes].view(batch, len(rows), fine_w, -1)
    _refine(along_rows, 2, factor, refined)
    refined.sub_(refined.amax(dim=-1, keepdim=True)).mul_(logit_scale)  # float64, <= 0
    out = _workspace.buffer(batch * len(rows) * fine_w * (num_classes + int(pad)), device)
    out = out.view(batch, len(rows), fine_w, num_classes + int(pad))
    out[..., :num_classes] = refined
    if pad:
        out[..., num_classes] = torch.finfo(torch.float32).min
    return out


def _refine(grid: torch.Tensor, dim: int, factor: int, out: torch.Tensor) -> None:
    """``out`` (``(n - 1) * factor + 1`` along ``dim``): ``grid``'s points, and ``factor - 1`` evenly
    spaced interpolations between each two (float64; no gathers, one strided ``lerp`` each)."""
    every = [slice(None)] * out.dim()
    every[dim] = slice(0, None, factor)
    out[tuple(every)] = grid
    size = grid.shape[dim]
    for step in range(1, factor):
        every[dim] = slice(step, None, factor)
        torch.lerp(grid.narrow(dim, 0, size - 1), grid.narrow(dim, 1, size - 1), step / factor, out=out[tuple(every)])


def workspace_bytes() -> int:
    """Bytes this thread's workspace holds (kept between calls; see ``cells.Workspace``)."""
    return _workspace.bytes()


def release_workspace() -> None:
    """Drop this thread's workspace (the next call makes it again, at the size it needs)."""
    _workspace.release()


_workspace = Workspace()
