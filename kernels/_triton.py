"""When Triton kernels can run: compiled on CUDA, or interpreted on CPU tensors.

Triton 3.x reads ``TRITON_INTERPRET`` through ``triton.knobs.runtime.interpret`` when a function
is decorated with ``@triton.jit``: set, the decorator returns an ``InterpretedFunction`` (the body
runs in Python with numpy, on CPU copies of the tensors); unset, a ``JITFunction`` (compiled for
the GPU). Triton's own library (``tl.zeros``, ``tl.sum``, ...) is decorated the same way when
``triton`` is first imported, and a kernel can only call library functions of its own kind. So
the choice is made once per process, by the environment at the first ``import triton`` (which
``open_clip`` may already trigger): tests set ``TRITON_INTERPRET=1`` in ``conftest.py`` before
anything else, on machines without CUDA.
"""

from __future__ import annotations

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def interpreting() -> bool:
    """Whether this process runs Triton kernels in the interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(tl.zeros, InterpretedFunction)


def launchable(kernel, device: torch.device):  # noqa: ANN001, ANN201 - a triton kernel object
    """``kernel`` after checking that it can run on tensors on ``device`` in this process."""
    if isinstance(kernel, InterpretedFunction) != interpreting():
        raise RuntimeError(
            "TRITON_INTERPRET changed between `import triton` and importing kernels/: set it before "
            "the first import of triton (or open_clip) in the process"
        )
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "Triton kernels on CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton is first imported (tests do). On CPU the 'fast' head uses the tiled PyTorch path."
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on CUDA tensors (or CPU tensors, interpreted), got {device}")
    return kernel


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
