"""ONNX Runtime encoder: exported towers run by onnxruntime (CPU, or CUDA when the model is on a GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pacl_fast.encoders.export import (
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    TEXT_INPUT,
    TEXT_OUTPUT,
    EncoderUnavailableError,
    OnnxCache,
    require_onnx,
)
from pacl_fast.encoders.graph import model_device
from pacl_fast.model import PACL

_NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def import_onnxruntime():  # noqa: ANN201 - the module
    try:
        import onnxruntime
    except ImportError as error:
        raise EncoderUnavailableError(
            "encoder='onnxruntime' needs onnxruntime, which is not installed: pip install pacl-fast[onnx]"
        ) from error
    return onnxruntime


def check_out(
    out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``out`` if it fits ``shape``/``dtype``/``device`` and is contiguous, a new tensor if None; else ValueError."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {shape} {dtype} tensor on {device}, got {tuple(out.shape)} {out.dtype} "
            f"on {out.device}{'' if out.is_contiguous() else ' (not contiguous)'}"
        )
    return out


class OnnxRuntimeEncoder:
    """Runs a :class:`PACL` as ONNX graphs in onnxruntime, on torch tensors without copies (I/O binding).

    The image graph is exported once per input size ``(H, W)`` (its positional embeddings are
    interpolated for one grid) and cached on disk (see :mod:`pacl_fast.encoders.export`); the
    first call with a new size exports it (seconds for ViT-B-16). Batches of any size share it.

    Args:
        model: the PACL model (not modified). Its device picks the execution provider: CPU, or
            CUDA (needs the ``onnxruntime-gpu`` package).
        dtype: float32 or float16. (float16 on CPU runs, slowly: it checks the half-precision graph
            that TensorRT builds from on machines without a GPU.)
        cache_dir: where exported graphs are kept (default ``$PACL_FAST_CACHE`` or ``~/.cache/pacl-fast``).
        threads: intra-op threads on CPU (default: torch's).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: PACL,
        dtype: torch.dtype = torch.float32,
        *,
        cache_dir: str | os.PathLike | None = None,
        threads: int | None = None,
    ):
        self.ort = import_onnxruntime()
        require_onnx()
        self.device = model_device(model)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in self.ort.get_available_providers():
                raise EncoderUnavailableError(
                    "encoder='onnxruntime' on CUDA needs onnxruntime's CUDA execution provider, which this "
                    "onnxruntime lacks: pip install onnxruntime-gpu (in place of onnxruntime)"
                )
            self.providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        elif self.device.type == "cpu":
            self.providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"encoder='onnxruntime' runs on cpu or cuda, not {self.device}")
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"encoder='onnxruntime' runs float32 or float16 graphs, got dtype={dtype}")
        self.dtype = dtype
        self.threads = threads or torch.get_num_threads()
        self.patch_size = model.backbone.patch_size
        self.embed_dim = model.config.embed_dim
        self.cache = OnnxCache(model, dtype, cache_dir)
        self._image_sessions: dict[tuple[int, int], object] = {}
        self._text_session = None

    def _session(self, path: Path):  # noqa: ANN202 - onnxruntime.InferenceSession
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3  # errors only
        # Idle intra-op threads would otherwise spin after each run, stealing the cores from the
        # torch work (the head) that follows it in the same process.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return self.ort.InferenceSession(str(path), options, providers=self.providers)

    def image_session(self, image_size: tuple[int, int]):  # noqa: ANN201
        """The session for inputs of this size, exporting its graph on first use."""
        image_size = (int(image_size[0]), int(image_size[1]))
        if image_size not in self._image_sessions:
            self._image_sessions[image_size] = self._session(self.cache.image(image_size))
        return self._image_sessions[image_size]

    def text_session(self):  # noqa: ANN201
        if self._text_session is None:
            self._text_session = self._session(self.cache.text())
        return self._text_session

    def _run(self, session, names: tuple[str, str], inputs: torch.Tensor, outputs: torch.Tensor) -> None:  # noqa: ANN001
        """One call of ``session`` reading ``inputs`` and writing ``outputs`` in place (both torch tensors)."""
        device_type, device_id = self.device.type, self.device.index or 0
        binding = session.io_binding()
        binding.bind_input(
            names[0], device_type, device_id, _NUMPY_TYPES[inputs.dtype], tuple(inputs.shape), inputs.data_ptr()
        )
        binding.bind_output(
            names[1], device_type, device_id, _NUMPY_TYPES[outputs.dtype], tuple(outputs.shape), outputs.data_ptr()
        )
        if device_type == "cuda":  # onnxruntime runs on its own stream: torch's work on the inputs must be done
            torch.cuda.current_stream(self.device).synchronize()
        session.run_with_iobinding(binding)
        if device_type == "cuda":
            binding.synchronize_outputs()

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, h, w, E]`` unit embeddings (in ``dtype``).

        ``out``: an optional contiguous ``[B, h, w, E]`` tensor (``dtype``, on the device) to write into.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
        height, width = pixels.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image sides must be multiples of the patch size {p}, got {height}x{width}")
        pixels = pixels.to(self.device, self.dtype).contiguous()
        shape = (pixels.shape[0], height // p, width // p, self.embed_dim)
        patches = check_out(out, shape, self.dtype, self.device)
        self._run(self.image_session((height, width)), (IMAGE_INPUT, IMAGE_OUTPUT), pixels, patches)
        return patches

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, E]`` unit text embeddings (float32)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [T, L], got {tuple(tokens.shape)}")
        tokens = tokens.to(self.device, torch.int64).contiguous()
        texts = torch.empty(tokens.shape[0], self.embed_dim, dtype=self.dtype, device=self.device)
        self._run(self.text_session(), (TEXT_INPUT, TEXT_OUTPUT), tokens, texts)
        return texts.float()
