"""``dtype="auto"`` and ``encoder="auto"``: the precision and the encoder this machine runs best, and why
(DESIGN §3, "Fast by default"). Every choice made here can be overridden by naming it.

Precision (:func:`native_dtype`):

* CPU: bf16 where it has bf16 units, AVX512-BF16 or AMX (``/proc/cpuinfo`` flags ``avx512_bf16`` /
  ``amx_bf16``; elsewhere, where there is no such file, fp32); else fp32.
* CUDA: bf16 from Ampere (sm >= 80); fp16 on Volta and Turing (sm 70-75, tensor cores); fp32 below
  (Pascal's consumer parts run fp16 at 1/64 of fp32's rate).
* The encoder's own limits come first: onnxruntime runs fp32 on the CPU (its fp16 kernels are
  emulated there) and fp16 on CUDA; TensorRT fp16; OpenVINO bf16 or fp32 as the CPU above. int8 is
  never chosen (accuracy: it is calibrated on images, and wrong calibration costs points).

Encoder (:func:`choose_encoder`). An exported encoder pays a build for every input size (an ONNX
export and an OpenVINO conversion) and then saves a little on every image of that size; eager torch
starts at once. So the choice needs to know how long the work is: ``expected_images``, a hint of how
many images the caller will segment (``pacl-fast segment``: its inputs; ``eval``: the dataset's
size; ``serve``: ``math.inf``, a service runs until stopped; None: unknown, as for ``predict`` on a
few images). The rule:

1. OpenVINO installed, the model on the CPU, and ``expected_images >= OPENVINO_MIN_IMAGES[units]``:
   ``openvino``; the work pays a build for every input size it meets.
2. OpenVINO installed, the model on the CPU, a model of these weights already cached for some input sizes
   (``pacl-fast export --format openvino``, or an earlier run), and fewer images announced (or none said):
   ``openvino`` for the cached sizes only, and every other size through eager torch in the precision rule 3
   would choose (:class:`CachedSizesEncoder`, its torch copy made when such a size first comes). An image of a
   new size never pays a build the work cannot repay (10-20 s for ViT-B-16), and what runs on a size that
   is not cached does not depend on what earlier runs left in the cache.
3. Otherwise eager ``torch``. ``compile`` is never chosen: on both CPUs measured it saves nothing
   over eager bf16 (below) and costs 30-60 s per input size; on CUDA it was not measured (no GPU
   was lent to this work), so it is not chosen blind there either.

The numbers behind the thresholds: ``python -m benchmarks.encoder_startup`` (random-init ViT-B-16
PACL, 224x224, batch 8; start = construction + first batch with an empty cache, i.e. the ONNX export
and the OpenVINO conversion), run twice on 2026-12-07 on this project's 2-core VM, an Intel Xeon with
AMX-BF16, shared with other jobs: run A at load average 9.5, run B at 7 (with a test run beside it for
its first half). Every time is several times a quiet machine's; the break-even, a ratio of two times
taken under the same load, moves far less:

=============  =============  ==============  ==============  ===============
encoder        start s A / B  ms/image A / B  saves ms A / B  pays back A / B
=============  =============  ==============  ==============  ===============
torch fp32     8.6 / 13.6     1016 / 1947     (baseline)
openvino fp32  56.9 / 93.4    644 / 672       371 / 1275      153 / 73 images
torch bf16     3.9 / 14.8     569 / 871       (baseline)
compile bf16   31.9 / 89.5    730 / 904       -161 / -33      never
openvino bf16  37.6 / 34.0    217 / 170       352 / 701       107 / 48 images
=============  =============  ==============  ==============  ===============

With its model cached, openvino started in 5.9 / 3.9 s (bf16) and 9.1 / 17.3 s (fp32). On the
project's earlier VM, an AMD EPYC with AVX512-BF16 but no AMX, quiet (``benchmarks/RESULTS.md``,
2026-12-01, batch 4): torch bf16 78.2 ms/image, compile bf16 85.7, openvino bf16 60.2, so OpenVINO
saves 18 ms an image against a build of ~18 s (ONNX export 12.5 s + conversion): ~1000 images to
pay back. Without AMX
OpenVINO's bf16 gain is small, so the threshold depends on the CPU's bf16 units
(:data:`OPENVINO_MIN_IMAGES`): about twice the break-even of one input size, because a run's images
often come in a few canvas sizes (a folder of photos with mixed aspect ratios pays one build per
distinct canvas; sliding windows and square inputs pay one) and the hint counts images, not sizes.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pacl_fast.choices import AUTO
from pacl_fast.encoders.base import Encoder, as_size, dtype_name, resolve_dtype
from pacl_fast.encoders.graph import model_device

CPUINFO = Path("/proc/cpuinfo")
#: Images that pay an OpenVINO build, by what OpenVINO would run: bf16 on AMX or on AVX512-BF16 alone, or fp32.
#: About twice one input size's break-even (measured, see the module docstring).
OPENVINO_MIN_IMAGES: dict[str, int] = {"AMX-BF16": 300, "AVX512-BF16": 2000, "fp32": 300}


@dataclass(frozen=True)
class Choice:
    """An encoder and precision, and why: ``str(choice)`` is the short line printed for users, e.g.
    ``encoder=openvino bf16 (OpenVINO installed, cached model found (224x224); CPU has AMX-BF16)``.

    ``only_sizes``: OpenVINO runs these input sizes ``(H, W)`` only (its cached models), eager torch in
    ``eager_dtype`` the others (:class:`CachedSizesEncoder`); None: the encoder runs every size."""

    encoder: str
    dtype: torch.dtype | None  # what make_encoder gets (None: the backend's default or ``options``' precision)
    precision: str  # what the encoder computes in: fp32, bf16, fp16, int8
    reasons: tuple[str, ...] = field(default=())
    only_sizes: tuple[tuple[int, int], ...] | None = None
    eager_dtype: torch.dtype | None = None

    def __str__(self) -> str:
        return f"encoder={self.encoder} {self.precision} ({'; '.join(self.reasons) or 'as given'})"


@functools.cache
def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU's feature flags (``/proc/cpuinfo``), or None where the system has no such file."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_bf16_units(cpuinfo: Path | None = None) -> str | None:
    """``"AMX-BF16"`` or ``"AVX512-BF16"`` when the CPU runs bf16 natively, else None."""
    flags = cpu_flags(cpuinfo or CPUINFO) or frozenset()
    if "amx_bf16" in flags:
        return "AMX-BF16"
    return "AVX512-BF16" if "avx512_bf16" in flags else None


def native_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The fastest precision ``device`` runs natively, and why (see the module docstring)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"GPU sm{major}{minor} runs bf16"
        if major >= 7:
            return torch.float16, f"GPU sm{major}{minor} runs fp16, not bf16"
        return torch.float32, f"GPU sm{major}{minor} has no fast fp16"
    if device.type != "cpu":
        return torch.float32, f"{device.type} device"
    units = cpu_bf16_units()
    return (torch.bfloat16, f"CPU has {units}") if units else (torch.float32, "CPU lacks AVX512-BF16 and AMX")


def choose_dtype(encoder: str, device: torch.device, options: dict) -> tuple[torch.dtype | None, str]:
    """``dtype="auto"`` for ``encoder`` on ``device``: the native precision within what the encoder runs."""
    if encoder == "openvino" and options.get("precision"):
        return None, f"precision {options['precision']} as given"
    if encoder == "tensorrt":
        return torch.float16, "TensorRT builds fp16"
    if encoder == "onnxruntime":
        if device.type == "cuda":
            return torch.float16, "onnxruntime on CUDA runs fp16"
        return torch.float32, "onnxruntime runs fp16 slowly on the CPU"
    dtype, why = native_dtype(device)
    if encoder == "openvino" and dtype == torch.float16:
        return torch.float32, why
    return dtype, why


def openvino_installed() -> bool:
    """OpenVINO and the ONNX exporter it converts from."""
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "onnx", "onnxscript"))


def _count(images: float) -> str:
    return "an unending stream of images" if math.isinf(images) else f"{images:g} images"


#: Encoder options only OpenVINO takes (they name it), and options only the torch encoders take.
OPENVINO_ONLY_OPTIONS = frozenset({"precision", "calibration", "calibration_size", "hint"})
TORCH_ONLY_OPTIONS = frozenset({"channels_last", "text_dtype"})


def choose_encoder(
    model: nn.Module,
    dtype: torch.dtype | None,
    expected_images: float | None,
    options: dict,
) -> tuple[str, str]:
    """``encoder="auto"``: OpenVINO when its model is cached or the work pays its build, else eager torch;
    and why (the rule in the module docstring)."""
    named = sorted(OPENVINO_ONLY_OPTIONS & set(options))
    if named:
        return "openvino", f"options only OpenVINO takes ({', '.join(named)})"
    if model_device(model).type != "cpu":
        return "torch", "eager: compiled encoders are not chosen on CUDA until measured there"
    count = None if expected_images is None else _count(expected_images)
    if dtype not in (None, torch.float32, torch.bfloat16):
        return "torch", f"eager: OpenVINO does not run {dtype_name(dtype)}"
    torch_only = sorted(TORCH_ONLY_OPTIONS & set(options))
    if torch_only:
        return "torch", f"eager: options only torch takes ({', '.join(torch_only)})"
    if not openvino_installed():
        return "torch", "eager: OpenVINO not installed (pip install pacl-fast[openvino])"
    from pacl_fast.encoders.openvino_encoder import cached_sizes

    units = (cpu_bf16_units() or "fp32") if dtype != torch.float32 else "fp32"
    needed = OPENVINO_MIN_IMAGES[units]
    if expected_images is not None and expected_images >= needed:
        return "openvino", f"OpenVINO installed; {count} pay its build (one per input size; >= {needed} do)"
    sizes = cached_sizes(model, options.get("cache_dir"))
    if sizes:
        found = ", ".join(f"{h}x{w}" for h, w in sizes)
        pays = "image count not given" if count is None else f"{count} do not pay a build (>= {needed} would)"
        return "openvino", f"OpenVINO installed, cached model found ({found}): other sizes eager, {pays}"
    if count is None:
        return "torch", "eager: OpenVINO installed, no model cached, image count not given (expected_images)"
    return "torch", f"eager: OpenVINO installed, no model cached, {count} do not pay its build (>= {needed} would)"


def choose(
    model: nn.Module,
    encoder: str = AUTO,
    dtype: str | torch.dtype | None = AUTO,
    *,
    expected_images: float | None = None,
    options: dict | None = None,
) -> Choice:
    """The encoder and precision for ``model`` (on its device): each ``"auto"`` decided here, the rest as given.

    Args:
        encoder: a backend name or ``"auto"``.
        dtype: a precision, None (the backend's default) or ``"auto"``.
        expected_images: how many images the caller will segment (None: unknown, a few); ``math.inf``: a service.
        options: the encoder's options (``cache_dir`` is where cached models are looked for; OpenVINO's
            ``precision``).
    """
    options = options or {}
    if expected_images is not None and not (isinstance(expected_images, (int, float)) and expected_images >= 0):
        raise ValueError(f"expected_images must be a number of images >= 0 or None, got {expected_images!r}")
    given = None if dtype in (AUTO, None) else resolve_dtype(dtype)
    reasons = []
    only_sizes = eager_dtype = None
    if encoder == AUTO:
        encoder, why = choose_encoder(model, given, expected_images, options)
        reasons.append(why)
        if encoder == "openvino" and "other sizes eager" in why:  # rule 2: the cached sizes only
            from pacl_fast.encoders.openvino_encoder import cached_sizes

            only_sizes = tuple(cached_sizes(model, options.get("cache_dir")))
            eager_dtype = given if dtype != AUTO else choose_dtype("torch", model_device(model), {})[0]
    if dtype == AUTO:
        chosen, why = choose_dtype(encoder, model_device(model), options)
        reasons.append(why)
    else:
        chosen = given
    precision = options.get("precision") if encoder == "openvino" and options.get("precision") else None
    precision = precision or _precision_of(encoder, chosen)
    return Choice(encoder, chosen, precision, tuple(reasons), only_sizes, eager_dtype)


class CachedSizesEncoder:
    """OpenVINO for the input sizes it has cached models of, eager torch for every other size (rule 2 of the
    module docstring): an image of a new size costs no build. The torch encoder (a copy of the model in
    ``eager_dtype``) is made when such a size first comes. Text and CLIP's global embedding: OpenVINO's (the
    model in PyTorch fp32), so that the text cache's entries do not depend on which sizes come.

    Args:
        openvino: the OpenVINO encoder (its model must stay as it is: the torch copy is made from it).
        sizes: the ``(H, W)`` OpenVINO runs.
        eager: makes the torch encoder for the other sizes.
    """

    name = "openvino"

    def __init__(self, openvino: Encoder, sizes: Sequence[tuple[int, int]], eager: Callable[[], Encoder]):
        self.openvino, self.sizes, self._make_eager = openvino, frozenset(sizes), eager
        self._eager: Encoder | None = None
        self._lock = threading.Lock()
        self.dtype, self.precision = openvino.dtype, openvino.precision

    def eager(self) -> Encoder:
        """The torch encoder of the sizes OpenVINO has no model of (made on first call)."""
        with self._lock:
            if self._eager is None:
                self._eager = self._make_eager()
            return self._eager

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, h, w, E]`` unit embeddings: OpenVINO's for a cached
        ``(H, W)``, eager torch's (float32 out) for any other."""
        if as_size(pixels.shape[-2:]) in self.sizes:
            return self.openvino.encode_image(pixels)
        return self.eager().encode_image(pixels).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, E]`` unit text embeddings: OpenVINO's (PyTorch fp32)."""
        return self.openvino.encode_text(tokens)

    def encode_global(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, E]`` CLIP's unit image embeddings: OpenVINO's (PyTorch fp32)."""
        return self.openvino.encode_global(pixels)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in sorted(self.sizes))
        return f"CachedSizesEncoder({self.openvino!r} for {sizes}, eager torch for other sizes)"


def _precision_of(encoder: str, dtype: torch.dtype | None) -> str:
    if dtype is not None:
        return dtype_name(dtype)
    return "fp16" if encoder == "tensorrt" else "fp32"  # the backends' defaults (pacl_fast.encoders.DEFAULT_DTYPES)
