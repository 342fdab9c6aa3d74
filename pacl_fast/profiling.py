"""What benchmarks and caches need to know about the machine: the CPU's name, and peak tensor
memory on any device, CPU included.

``torch.cuda.max_memory_allocated`` exists only on CUDA. :class:`TensorMemoryTracker` sees every
tensor an aten op creates (a ``TorchDispatchMode``), counts each storage once while it is alive,
and records the peak of the live total. It does not see scratch memory that a single kernel
allocates and frees internally, nor tensors that existed before it started.
"""

from __future__ import annotations

import platform
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s ``model name``; the platform's processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class TensorMemoryTracker(TorchDispatchMode):
    """``with TensorMemoryTracker() as t: ...`` then ``t.peak_bytes`` (live bytes above the start),
    ``t.largest_bytes`` (the largest single storage) and ``t.largest_shape``."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0
        self.largest_shape: tuple[int, ...] = ()
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live_bytes -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen.add(key)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if nbytes > self.largest_bytes:
            self.largest_bytes, self.largest_shape = nbytes, tuple(tensor.shape)
        weakref.finalize(storage, self._release, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's hook signature
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: they allocate nothing.
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and not t.is_meta
        }
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and not item.is_meta and item.untyped_storage().data_ptr() not in inputs:
                self._track(item)
        return out
