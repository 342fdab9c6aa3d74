"""``pacl_fast.profiling.TensorMemoryTracker`` on allocations whose sizes are known by construction."""

from __future__ import annotations

import gc

import torch

from pacl_fast.profiling import TensorMemoryTracker


def test_counts_live_bytes_and_their_peak():
    """1000 float32 (4000 B) and 250 float64 (2000 B) are live together: the peak is 6000 B; freeing the first
    and making 500 float32 (2000 B) leaves 4000 B live, and the peak stays 6000 B."""
    with TensorMemoryTracker() as tracker:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(250, dtype=torch.float64)  # 2000 B
        assert (tracker.live_bytes, tracker.peak_bytes) == (6000, 6000)
        del a
        gc.collect()
        assert tracker.live_bytes == 2000
        c = torch.empty(500)  # 2000 B
        assert (tracker.live_bytes, tracker.peak_bytes) == (4000, 6000)
        d = torch.empty(3, 700, dtype=torch.int16)  # 4200 B
    assert (tracker.live_bytes, tracker.peak_bytes) == (8200, 8200)
    assert (tracker.largest_bytes, tracker.largest_shape) == (4200, (3, 700))
    del b, c, d


def test_released_memory_is_reused_without_raising_the_peak():
    """Ten 40 KB tensors made and dropped one after another never have more than one alive."""
    with TensorMemoryTracker() as tracker:
        for _ in range(10):
            block = torch.zeros(10_000)  # 40 000 B
            del block
            gc.collect()
    assert tracker.peak_bytes == 40_000 and tracker.live_bytes == 0


def test_views_in_place_results_and_earlier_tensors_cost_nothing():
    """Views and in-place results share their input's storage; tensors made before the tracker started are not
    counted; an out-of-place result of an earlier tensor is."""
    before = torch.ones(2000)  # 8000 B, not counted
    with TensorMemoryTracker() as tracker:
        view = before.view(40, 50)
        view.add_(1.0)  # in place
        strided = before[::2]
        transposed = view.t()
        assert tracker.peak_bytes == 0
        doubled = before * 2  # 8000 B
        summed = doubled.sum()  # one float32: 4 B
    assert tracker.peak_bytes == 8004 and tracker.largest_shape == (2000,)
    assert strided.shape == (1000,) and transposed.shape == (50, 40) and summed.item() == 8000.0


def test_peak_of_a_computation_with_a_temporary():
    """``(x @ w).relu().sum(0)`` with x [64, 32] and w [32, 128] float32: the product (32 KiB) is alive while its
    relu (32 KiB) is made, and dropped before the sum (512 B): the peak is 64 KiB, 512 B stay live."""
    x, w = torch.randn(64, 32), torch.randn(32, 128)
    with TensorMemoryTracker() as tracker:
        out = (x @ w).relu().sum(0)
    assert out.shape == (128,)
    assert tracker.peak_bytes == 2 * 64 * 128 * 4
    assert tracker.live_bytes == 128 * 4 and tracker.largest_bytes == 64 * 128 * 4
