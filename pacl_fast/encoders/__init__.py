"""Interchangeable image/text encoders (DESIGN §5).

Every encoder runs a model of ``pacl_fast.methods`` (PACL, or a training-free method) and has
the same methods (:class:`~pacl_fast.encoders.base.Encoder`):

* ``encode_image(pixels)``: normalised pixels ``[B, 3, H, W]`` -> the method's unit patch
  embeddings ``[B, h, w, E]`` (CLIP and the method's last step as one graph);
* ``encode_text(tokens)``: token ids ``[T, L]`` -> unit CLIP text embeddings ``[T, E]`` (float32);
* ``encode_global(pixels)``: CLIP's own unit image embedding ``[B, E]`` (zero-shot classification).

Backends (:func:`make_encoder`):

=========== ========================================== ========================== ======================
name        what runs                                  precisions                 needs
=========== ========================================== ========================== ======================
torch       the model, eager (the reference)           float32, bfloat16, float16 -
compile     ``torch.compile`` (Inductor)               float32, bfloat16, float16 a C++ compiler on CPU
onnxruntime ONNX export, onnxruntime (CPU or CUDA EP)  float32, float16           ``pacl-fast[onnx]``
tensorrt    engine built from the ONNX export          float16, float32           ``pacl-fast[trt]``, CUDA
openvino    ONNX export, OpenVINO CPU plugin; int8 by  fp32, bf16, int8           ``pacl-fast[openvino]``
            NNCF post-training quantization            (bf16: AVX512-BF16/AMX)
=========== ========================================== ========================== ======================

``openvino`` takes its precision from ``dtype`` (float32 -> fp32, bfloat16 -> bf16) or from the
option ``precision="fp32" | "bf16" | "int8"``; int8 is only an option (its outputs are float32).

Modules, each with one job, importing one another in one direction only: ``base`` (the protocol, its
capabilities, dtypes) and ``graph`` (the traceable towers) below everything; ``artifacts`` (cache keys,
entry records, manifests, rebuilt-once); ``export`` (ONNX graphs); one module per backend;
``auto`` (``dtype="auto"`` / ``encoder="auto"``, :func:`choose`); this package's face on top.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pacl_fast.choices import ENCODERS, EXPORT_PRECISIONS
from pacl_fast.encoders.artifacts import check_writable
from pacl_fast.encoders.auto import AUTO, Choice, choose
from pacl_fast.encoders.base import Encoder, EncoderUnavailableError, dtype_name, resolve_dtype
from pacl_fast.encoders.calibration import DEFAULT_CALIBRATION_SIZE
from pacl_fast.encoders.torch_encoder import TorchEncoder

DEFAULT_DTYPES = {
    "torch": torch.float32,
    "compile": torch.float32,
    "onnxruntime": torch.float32,
    "tensorrt": torch.float16,
    "openvino": torch.float32,
}


def make_encoder(
    name: str,
    model: nn.Module,
    dtype: str | torch.dtype | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    **options,
) -> Encoder:
    """Build the encoder backend ``name`` for ``model`` (see the table above).

    Args:
        name: ``"torch"``, ``"compile"``, ``"onnxruntime"``, ``"tensorrt"`` or ``"openvino"``.
        dtype: precision; None picks the backend's default (float16 for tensorrt, else float32).
            For openvino float32 means fp32 and bfloat16 bf16; int8 is ``precision="int8"``.
        cache_dir: where onnxruntime, tensorrt and openvino keep exported graphs, engines and models.
        options: backend arguments (``channels_last``; ``threads``; ``max_batch``, ``workspace_gib``; openvino's
            ``precision``, ``calibration``, ``calibration_size``, ``hint``...).
    Raises:
        EncoderUnavailableError: the backend's library or device is missing (the message names the extra).
    """
    if name not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {name!r}")
    given = dtype is not None
    dtype = DEFAULT_DTYPES[name] if dtype is None else resolve_dtype(dtype)
    if name == "openvino":
        from pacl_fast.encoders.openvino_encoder import OpenVINOEncoder

        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"encoder='openvino' runs fp32, bf16 or int8 (precision='int8'), not dtype={dtype}")
        precision = options.pop("precision", None) or dtype_name(dtype)
        if given and dtype != torch.float32 and precision != dtype_name(dtype):
            raise ValueError(f"encoder='openvino': dtype={dtype} and precision={precision!r} disagree; give one")
        return OpenVINOEncoder(model, precision, cache_dir=cache_dir, **options)
    if name in ("torch", "compile"):
        return TorchEncoder(model, dtype, compile=name == "compile", **options)
    if name == "onnxruntime":
        from pacl_fast.encoders.onnx_encoder import OnnxRuntimeEncoder

        return OnnxRuntimeEncoder(model, dtype, cache_dir=cache_dir, **options)
    from pacl_fast.encoders.tensorrt_encoder import TensorRTEncoder

    return TensorRTEncoder(model, dtype, cache_dir=cache_dir, **options)


def export_artifacts(
    model: nn.Module,
    fmt: str,
    out: str | os.PathLike,
    precision: str,
    image_sizes: list[tuple[int, int]],
    *,
    max_batch: int = 32,
    calibration: str | os.PathLike | None = None,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    progress: bool = True,
) -> dict:
    """Export ``model``'s towers to ``out`` (an encoder cache folder: point an encoder at it) as ``fmt``
    (``onnx``, ``tensorrt`` or ``openvino``, in ``precision``: see ``choices.EXPORT_PRECISIONS``) and write
    ``out/manifest.json`` describing every artifact; returns the manifest.

    Raises :class:`EncoderUnavailableError` when the format's library (or, for TensorRT, a GPU) is missing,
    PermissionError when ``out`` cannot be written.
    """
    if fmt not in EXPORT_PRECISIONS:
        raise ValueError(f"format must be one of {tuple(EXPORT_PRECISIONS)}, got {fmt!r}")
    if precision not in EXPORT_PRECISIONS[fmt][0]:
        raise ValueError(f"format {fmt} builds {', '.join(EXPORT_PRECISIONS[fmt][0])}, not precision {precision!r}")
    check_writable(Path(out), f"the export folder {out}")  # before the weights are hashed and graphs exported
    if fmt == "openvino":
        from pacl_fast.encoders.openvino_encoder import export_openvino

        return export_openvino(model, out, image_sizes, precision, calibration, calibration_size, progress=progress)
    if calibration is not None:
        raise ValueError(f"calibration is used only by format openvino with precision int8, not {fmt}")
    if fmt == "onnx":
        from pacl_fast.encoders.export import export_onnx

        return export_onnx(model, out, resolve_dtype(precision), image_sizes, progress=progress)
    from pacl_fast.encoders.tensorrt_encoder import export_tensorrt

    return export_tensorrt(model, out, resolve_dtype(precision), image_sizes, max_batch=max_batch, progress=progress)


__all__ = [
    "AUTO",
    "Choice",
    "DEFAULT_DTYPES",
    "ENCODERS",
    "Encoder",
    "EncoderUnavailableError",
    "TorchEncoder",
    "choose",
    "export_artifacts",
    "make_encoder",
    "resolve_dtype",
]
