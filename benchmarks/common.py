"""What every benchmark here needs: the machine line, synchronised timing, peak memory, sizes."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pacl_fast.files import atomic_write
from pacl_fast.profiling import TensorMemoryTracker, cpu_name


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "open_clip", "onnxruntime", "tensorrt"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = "absent"
    return found


def machine_line(device: torch.device) -> str:
    """The chip (CPU: model, torch threads, OpenMP wait policy; or the GPU) and library versions."""
    if device.type == "cuda":
        chip = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        wait_policy = os.environ.get("OMP_WAIT_POLICY")
        chip = f"CPU {cpu_name()} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY={wait_policy})"
    return f"{chip}; " + ", ".join(f"{k} {v}" for k, v in versions().items())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak live tensor bytes above the start while ``fn`` runs (CPU: ``TensorMemoryTracker``)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak_bytes


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` or ``S`` (square) -> ``(H, W)``."""
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


def write_results(path: Path, payload: dict) -> None:
    """A benchmark's results as indented JSON at ``path`` (folders made, written atomically), and say where."""
    atomic_write(path, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds ``fn()`` takes on ``device`` (synchronised before and after), and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def matmul_size(device: torch.device) -> int:
    """Side of the square matmul that measures a machine's ceiling: large enough to reach it."""
    return 8192 if device.type == "cuda" else 2048


def matmul_seconds(size: int, dtype: torch.dtype, device: torch.device) -> Callable[[], float]:
    """A timer of one ``size``^3 matmul in ``dtype`` (operands made once, one warm-up run)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def run() -> float:
        return timed(lambda: torch.mm(a, b), device)[0]

    run()
    return run


def matmul_ceiling(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of the ceiling matmul in ``dtype`` on ``device``, best of ``repeats``."""
    size = matmul_size(device)
    run = matmul_seconds(size, dtype, device)
    return 2 * size**3 / min(run() for _ in range(repeats))


def encoder_flops(model: torch.nn.Module, image_size: int) -> int:
    """FLOPs of one image through the encoder graph (CLIP + the method's last step), attention included."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from pacl_fast.encoders.graph import ImageTower

    def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    weight = model.backbone.visual.conv1.weight
    # torch's registry counts the CUDA attention kernels but not the CPU one.
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        ImageTower(model)(torch.randn(1, 3, image_size, image_size, device=weight.device, dtype=weight.dtype))
    return counter.get_total_flops()
