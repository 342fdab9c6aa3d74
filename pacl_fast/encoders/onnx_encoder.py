"""ONNX Runtime encoder: exported towers run by onnxruntime (CPU, or CUDA when the model is on a GPU)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pacl_fast.encoders.base import EncoderUnavailableError, as_size, check_out, check_pixels
from pacl_fast.encoders.export import OnnxCache, require_onnx
from pacl_fast.encoders.graph import GLOBAL_OUTPUT, IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT, model_device

_NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def import_onnxruntime():  # noqa: ANN201 - the module
    try:
        import onnxruntime
    except ImportError as error:
        raise EncoderUnavailableError(
            "encoder='onnxruntime' needs onnxruntime, which is not installed: pip install pacl-fast[onnx]"
        ) from error
    return onnxruntime


class OnnxRuntimeEncoder:
    """Runs a model (PACL or a training-free method) as ONNX graphs in onnxruntime, on torch tensors
    without copies (I/O binding).

    The image graph is exported once per input size ``(H, W)`` (its positional embeddings are
    interpolated for one grid) and cached on disk (see :mod:`pacl_fast.encoders.export`); the
    first call with a new size exports it (seconds for ViT-B-16). Batches of any size share it.

    Args:
        model: the model (not modified). Its device picks the execution provider: CPU, or
            CUDA (needs the ``onnxruntime-gpu`` package).
        dtype: float32 or float16. (float16 on CPU runs, slowly: it checks the half-precision graph
            that TensorRT builds from on machines without a GPU.)
        cache_dir: where exported graphs are kept (default ``$PACL_FAST_CACHE`` or ``~/.cache/pacl-fast``).
        threads: intra-op threads on CPU (default: torch's).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: nn.Module,
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
        self.patch_size = model.backbone.patch_size  # encode_global's
        self.pixel_multiple, self.grid_patch = model.pixel_multiple, model.grid_patch
        self.embed_dim = model.backbone.embed_dim
        self.cache = OnnxCache(model, dtype, cache_dir)
        self._sessions: dict[object, object] = {}

    def _session(self, path: Path):  # noqa: ANN202 - onnxruntime.InferenceSession
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3  # errors only
        # Idle intra-op threads would otherwise spin after each run, stealing the cores from the
        # torch work (the head) that follows it in the same process.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return self.ort.InferenceSession(str(path), options, providers=self.providers)

    def _cached_session(self, key: object, artifact: Callable[..., object]):  # noqa: ANN202
        """The session of one cached graph; a graph onnxruntime cannot load is exported again, once."""
        if key not in self._sessions:
            self._sessions[key] = artifact(load=self._session)
        return self._sessions[key]

    def image_session(self, image_size: tuple[int, int]):  # noqa: ANN201
        """The session for inputs of this size, exporting its graph on first use."""
        size = as_size(image_size)
        return self._cached_session(size, lambda load: self.cache.image(size, load))

    def text_session(self):  # noqa: ANN201
        return self._cached_session("text", self.cache.text)

    def global_session(self):  # noqa: ANN201
        return self._cached_session("global", self.cache.global_image)

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
        grid = check_pixels(pixels, self.pixel_multiple, self.grid_patch)
        pixels = pixels.to(self.device, self.dtype).contiguous()
        patches = check_out(out, (pixels.shape[0], *grid, self.embed_dim), self.dtype, self.device)
        self._run(self.image_session(tuple(pixels.shape[-2:])), (IMAGE_INPUT, IMAGE_OUTPUT), pixels, patches)
        return patches

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, E]`` unit text embeddings (float32).

        The text graph takes any token length on truncatable towers: prompts run grouped by the
        length up to their end-of-text token (``ClipBackbone.encode_text_by_length``), as the eager
        tower runs them. A fixed-length graph (other towers) takes ``[T, context]``.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [T, L], got {tuple(tokens.shape)}")
        tokens = tokens.to(self.device, torch.int64)
        session = self.text_session()

        def run(group: torch.Tensor) -> torch.Tensor:
            group = group.contiguous()
            texts = torch.empty(group.shape[0], self.embed_dim, dtype=self.dtype, device=self.device)
            self._run(session, (TEXT_INPUT, TEXT_OUTPUT), group, texts)
            return texts

        length = session.get_inputs()[0].shape[1]
        if isinstance(length, int):  # a fixed-length graph
            if tokens.shape[1] != length:
                raise ValueError(f"tokens must be [T, {length}] for this text graph, got {tuple(tokens.shape)}")
            return run(tokens).float()
        return self.cache.model.backbone.encode_text_by_length(tokens, run).float()

    @torch.inference_mode()
    def encode_global(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised pixels (native size) -> ``[B, E]`` CLIP's unit image embeddings (float32)."""
        check_pixels(pixels, self.patch_size)
        pixels = pixels.to(self.device, self.dtype).contiguous()
        images = torch.empty(pixels.shape[0], self.embed_dim, dtype=self.dtype, device=self.device)
        self._run(self.global_session(), (IMAGE_INPUT, GLOBAL_OUTPUT), pixels, images)
        return images.float()
