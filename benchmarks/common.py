"""What every benchmark here needs: the machine line, synchronised timing, peak memory, sizes."""

from __future__ import annotations

import json
import os
import platform
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
