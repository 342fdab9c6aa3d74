"""TensorRT encoder: image engines built from the ONNX export with TensorRT's Python API.

Written against the TensorRT 10.1+ Python API (``build_serialized_network``, a strongly typed
network, one optimisation profile over the batch axis, ``execute_async_v3``) and never run on
the machine it was written on (no GPU, no TensorRT there): its tests skip without them, and
``benchmarks/gpu_check.sh`` is the first thing to run on a GPU machine.

Precision lives in the graph: the engine is built from a float16 (or float32) ONNX export as a
*strongly typed* network. That is the one form TensorRT 10 and 11 both accept (11 removed
``BuilderFlag.FP16``); TensorRT still runs normalisation layers in float32.

Torch owns everything on the device: inputs and outputs are torch tensors, TensorRT's scratch
memory is a torch allocation handed over with ``set_device_memory``, and kernels are enqueued
on torch's current stream. No pycuda.

Engines are cached on disk, keyed by the weights' sha256 and the configs (the ONNX export key),
the input size, the batch profile, the TensorRT version and the GPU::

    <cache>/tensorrt/<export key>-trt<version>-<gpu>/image-448x448-b128.engine

An engine that is not a regular file, or that TensorRT cannot deserialise, is built again once
(:class:`~pacl_fast.encoders.artifacts.ArtifactStore`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

import torch
from torch import nn

from pacl_fast.encoders.artifacts import ArtifactStore, export_all, file_problem, image_entry
from pacl_fast.encoders.base import EncoderUnavailableError, as_size, check_out, check_pixels, dtype_name
from pacl_fast.encoders.export import OnnxCache
from pacl_fast.encoders.graph import IMAGE_INPUT, IMAGE_OUTPUT, model_device
from pacl_fast.files import atomic_write, default_cache_dir

logger = logging.getLogger(__name__)

MIN_TENSORRT = (10, 1)  # set_device_memory / device_memory_size_v2
ALIGNMENT = 256  # bytes TensorRT asks of tensor addresses


def import_tensorrt():  # noqa: ANN201 - the module
    """``tensorrt``, or :class:`EncoderUnavailableError` naming the extra to install."""
    try:
        import tensorrt
    except ImportError as error:
        raise EncoderUnavailableError(
            "encoder='tensorrt' needs TensorRT, which is not installed: pip install pacl-fast[trt]"
        ) from error
    version = tuple(int(part) for part in re.findall(r"\d+", tensorrt.__version__)[:2])
    if version < MIN_TENSORRT:
        raise EncoderUnavailableError(
            f"encoder='tensorrt' needs TensorRT >= {'.'.join(map(str, MIN_TENSORRT))}, found {tensorrt.__version__}: "
            "pip install -U pacl-fast[trt]"
        )
    return tensorrt


def require_cuda(device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise EncoderUnavailableError("encoder='tensorrt' needs a CUDA device, and torch sees none")
    if device.type != "cuda":
        raise ValueError(f"encoder='tensorrt' needs the model on a CUDA device, it is on {device} (pass device='cuda')")


def gpu_slug(device: torch.device) -> str:
    """``NVIDIA-H200-sm90``: engines are specific to a GPU model."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    major, minor = torch.cuda.get_device_capability(device)
    return f"{name}-sm{major}{minor}"


def engine_folder(cache_root: Path, export_key: str, trt_version: str, gpu: str) -> Path:
    """Where one model's engines live: one folder per (export key, TensorRT version, GPU)."""
    return cache_root / "tensorrt" / f"{export_key}-trt{trt_version}-{gpu}"


def engine_name(image_size: tuple[int, int], max_batch: int) -> str:
    """One engine per input size and batch profile."""
    return f"image-{image_size[0]}x{image_size[1]}-b{max_batch}.engine"


def _torch_dtype(trt, trt_dtype) -> torch.dtype:  # noqa: ANN001 - tensorrt module and DataType
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
    }
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[trt_dtype]


def _progress_monitor(trt, description: str):  # noqa: ANN001, ANN202 - a trt.IProgressMonitor
    """A ``trt.IProgressMonitor`` drawing one tqdm bar per build phase (TensorRT calls it from its threads)."""
    from tqdm.auto import tqdm

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm] = {}
            self.lock = threading.Lock()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self.lock:
                depth = len(self.bars)
                self.bars[phase_name] = tqdm(
                    total=num_steps, desc=f"{description}: {phase_name}", position=depth, leave=depth == 0
                )

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self.lock:
                bar = self.bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return BuildProgress()


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    input_name: str,
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    *,
    workspace_bytes: int = 4 << 30,
    progress: bool = True,
) -> Path:
    """Build a strongly typed engine from an ONNX file with one optimisation profile; write it atomically.

    Args:
        shapes: ``(min, opt, max)`` shapes of ``input_name``.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(profile)
    monitor = _progress_monitor(trt, f"TensorRT {engine_path.stem}") if progress else None
    if monitor is not None:
        config.progress_monitor = monitor  # must outlive the build: `monitor` is held until we return
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (its log above says why)")
    return atomic_write(engine_path, memoryview(serialized))


class _Engine:
    """One deserialised engine, its execution context and its torch-owned scratch memory."""

    def __init__(self, trt, runtime, path: Path, device: torch.device):  # noqa: ANN001
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialise {path}")
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        # Scratch for every shape of the profile; torch's allocator hands out 512-byte aligned blocks.
        self.scratch = torch.empty(self.engine.device_memory_size_v2, dtype=torch.uint8, device=device)
        self.context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(IMAGE_INPUT))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(IMAGE_OUTPUT))


class TensorRTEncoder:
    """Runs PACL's image tower as TensorRT engines (one per input size); text stays in PyTorch.

    The text tower runs once per vocabulary and the Segmenter caches its output, so a second
    engine would add minutes of build time and save nothing measurable: ``encode_text`` is the
    model's own (eager, on the same GPU).

    Args:
        model: the model (PACL or a training-free method), on a CUDA device (not modified).
        dtype: engine precision: float16 (default) or float32.
        max_batch: the optimisation profile covers batches 1..max_batch (tuned for max_batch);
            larger batches run in chunks.
        cache_dir: root of the ONNX and engine caches (default ``$PACL_FAST_CACHE`` or ``~/.cache/pacl-fast``).
        workspace_gib: TensorRT's builder workspace limit.
        progress: show build progress bars.
    """

    name = "tensorrt"

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype = torch.float16,
        *,
        max_batch: int = 32,
        cache_dir: str | os.PathLike | None = None,
        workspace_gib: float = 4.0,
        progress: bool = True,
    ):
        # Arguments first: a bad one is reported on any machine, with or without TensorRT and a GPU.
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"encoder='tensorrt' builds float16 or float32 engines, got dtype={dtype}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.trt = import_tensorrt()
        self.device = model_device(model)
        require_cuda(self.device)
        self.model = model
        self.dtype = dtype
        self.max_batch = max_batch
        self.workspace_bytes = int(workspace_gib * (1 << 30))
        self.progress = progress
        self.pixel_multiple, self.grid_patch = model.pixel_multiple, model.grid_patch
        self.embed_dim = model.backbone.embed_dim
        self.onnx = OnnxCache(model, dtype, cache_dir)
        cache_root = Path(cache_dir or default_cache_dir())
        folder = engine_folder(cache_root, self.onnx.key, self.trt.__version__, gpu_slug(self.device))
        self.store = ArtifactStore(cache_root, folder.relative_to(cache_root).as_posix(), "TensorRT")
        self.root = self.store.root
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)  # must outlive its engines
        self._engines: dict[tuple[int, int], _Engine] = {}
        self._done = torch.cuda.Event()  # the last enqueue: scratch memory is free after it
        self._pending = False

    def engine_path(self, image_size: tuple[int, int]) -> Path:
        """Where the engine for this input size is (or will be built)."""
        name = engine_name(as_size(image_size), self.max_batch)
        found = [root / name for root in self.store.roots() if os.path.lexists(root / name)]
        return found[0] if found else self.store.build_root / name

    def engine(self, image_size: tuple[int, int]) -> _Engine:
        """The engine for inputs of this size, built (from the cached ONNX export) on first use; an engine
        file TensorRT cannot load (stale, truncated) is built again once."""
        size = as_size(image_size)
        if size not in self._engines:
            self._engines[size] = self.store.get(
                engine_name(size, self.max_batch),
                f"the engine for {size[0]}x{size[1]} inputs, batch 1..{self.max_batch} (minutes)",
                lambda path: self._build(size, path),
                lambda path: _Engine(self.trt, self.runtime, path, self.device),
                problem=file_problem,
            )
        return self._engines[size]

    def _build(self, image_size: tuple[int, int], path: Path) -> Path:
        """Export (if needed) and build the engine for this input size at ``path``."""
        onnx_path = self.onnx.image(image_size)
        shape = (3, *image_size)
        return build_engine(
            onnx_path,
            path,
            IMAGE_INPUT,
            ((1, *shape), (self.max_batch, *shape), (self.max_batch, *shape)),
            workspace_bytes=self.workspace_bytes,
            progress=self.progress,
        )

    def _enqueue(self, engine: _Engine, chunk: torch.Tensor, out: torch.Tensor) -> None:
        context = engine.context
        if not context.set_input_shape(IMAGE_INPUT, tuple(chunk.shape)):
            raise ValueError(f"input shape {tuple(chunk.shape)} is outside the engine's profile")
        if tuple(context.get_tensor_shape(IMAGE_OUTPUT)) != tuple(out.shape):
            raise RuntimeError(
                f"engine output shape {tuple(context.get_tensor_shape(IMAGE_OUTPUT))} != expected {tuple(out.shape)}"
            )
        context.set_tensor_address(IMAGE_INPUT, chunk.data_ptr())
        context.set_tensor_address(IMAGE_OUTPUT, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if self._pending:  # the previous call may have run on another stream: its scratch use must end first
            stream.wait_event(self._done)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (its log above says why)")
        self._done.record(stream)
        self._pending = True

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, h, w, E]`` unit embeddings (engine precision).

        ``out``: an optional contiguous ``[B, h, w, E]`` tensor (engine precision, on the GPU) to write into.
        """
        grid = check_pixels(pixels, self.pixel_multiple, self.grid_patch)
        engine = self.engine(tuple(pixels.shape[-2:]))
        pixels = pixels.to(self.device, engine.input_dtype).contiguous()
        patches = check_out(out, (pixels.shape[0], *grid, self.embed_dim), engine.output_dtype, self.device)
        for start in range(0, pixels.shape[0], self.max_batch):
            chunk = pixels[start : start + self.max_batch]
            out = patches[start : start + self.max_batch]
            if chunk.data_ptr() % ALIGNMENT:
                chunk = chunk.clone()
            if out.data_ptr() % ALIGNMENT:  # write aligned, then copy into place
                aligned = torch.empty_like(out)
                self._enqueue(engine, chunk, aligned)
                out.copy_(aligned)
            else:
                self._enqueue(engine, chunk, out)
        return patches

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, E]`` unit text embeddings (float32), by the PyTorch model."""
        return self.model.encode_text(tokens.to(self.device)).float()

    @torch.inference_mode()
    def encode_global(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, E]`` CLIP's unit image embeddings (float32), by the PyTorch model
        (classification only: not worth an engine of its own)."""
        weight = self.model.backbone.visual.conv1.weight
        return self.model.encode_global(pixels.to(weight.device, weight.dtype)).float()


def export_tensorrt(
    model: nn.Module, out: str | os.PathLike, dtype: torch.dtype, image_sizes: list[tuple[int, int]], *,
    max_batch: int = 32, progress: bool = True,
) -> dict:  # fmt: skip
    """Build ``model``'s engines for ``image_sizes`` into ``out`` (an encoder cache folder: point an encoder at
    it) and write ``out/manifest.json``; returns the manifest."""
    out = Path(out)
    encoder = TensorRTEncoder(model, dtype, max_batch=max_batch, cache_dir=out, progress=progress)
    encoder.store.temporary = encoder.onnx.store.temporary = False  # an export writes where it is asked, or fails
    patch, embed_dim, name = encoder.grid_patch, encoder.embed_dim, dtype_name(dtype)

    def job(size: tuple[int, int]) -> dict:
        encoder.engine(size)
        path = encoder.engine_path(size).relative_to(out).as_posix()
        return image_entry(path, size, patch, embed_dim, name, batch_range=[1, max_batch])

    sizes = [as_size(size) for size in image_sizes]
    jobs = [(f"image {h}x{w}", lambda size=(h, w): job(size)) for h, w in sizes]
    header = {"format": "tensorrt", "method": model.method, "dtype": name, "key": encoder.onnx.key}
    return export_all(out, header, jobs, progress=progress)
