"""OpenVINO encoder: the image graph through OpenVINO's CPU plugin in fp32, bf16, or int8 quantized by NNCF.

The image graph is the ONNX export of :mod:`pacl_fast.encoders.export` (one graph per input size,
dynamic batch), converted with ``openvino.convert_model``; int8 graphs are then quantized by
NNCF's post-training quantization (``nncf.quantize``, transformer preset) on calibration images.
Converted and quantized models are saved as OpenVINO IR (``model.xml`` + ``model.bin``) in a
cache folder keyed by everything that changes them::

    <cache>/openvino/<export key>-<hash>/image-224x224-fp32/model.xml              (fp32 and bf16)
    <cache>/openvino/<export key>-<hash>/image-224x224-int8-synthetic300-<hash>/model.xml
    <cache>/openvino/<export key>-<hash>/image-224x224-int8-images300-<hash>/model.xml

The export key covers the weights, the CLIP config and the method (:func:`~.artifacts.export_key`);
the first hash the OpenVINO version and the CPU model (``/proc/cpuinfo``); an int8 folder names
its calibration source and image count, and its hash covers NNCF's version and the calibration
set (for a folder: the chosen files' paths, sizes and times). bf16 is a compile-time setting of
the CPU plugin (``INFERENCE_PRECISION_HINT``) over the fp32 graph, so it shares the fp32 folder.
Each folder is written to a temporary folder and renamed into place, with an ``entry.json`` that
records what it is and the sizes of its files: an entry that is not a folder, or whose record or
files are missing, truncated or unloadable, is named in a warning and built again, once
(:class:`~pacl_fast.encoders.artifacts.ArtifactStore`).

Calibration images are preprocessed as the segmenter's inputs are (:mod:`pacl_fast.images`):
resized (bicubic, antialiased, aspect kept) so that the image just covers the graph's ``H x W``,
centre-cropped to it, normalised with the CLIP's mean/std. For an image whose aspect matches the
graph's (a square scene at the native size; a 4:3 photo and a 4:3 canvas) that is exactly the
segmenter's :func:`~pacl_fast.images.fit_to_model` input; other aspects are cropped, not padded.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pacl_fast.encoders.artifacts import (
    ENTRY_JSON,
    ArtifactStore,
    export_all,
    export_key,
    image_artifact,
    image_entry,
    read_record,
    record_problem,
    short_digest,
    write_record,
)
from pacl_fast.encoders.base import EncoderUnavailableError, as_size, check_out, check_pixels
from pacl_fast.encoders.calibration import DEFAULT_CALIBRATION_SIZE, Calibration, CalibrationImages
from pacl_fast.encoders.export import OnnxCache
from pacl_fast.encoders.graph import model_device
from pacl_fast.encoders.torch_encoder import TorchEncoder
from pacl_fast.files import atomic_folder, default_cache_dir
from pacl_fast.profiling import cpu_name

logger = logging.getLogger(__name__)

OPENVINO_FORMAT = 1  # bump when what is saved in a cache folder changes for the same inputs
PRECISIONS = ("fp32", "bf16", "int8")
HINTS = ("LATENCY", "THROUGHPUT")
MODEL_XML, MODEL_BIN = "model.xml", "model.bin"
#: NNCF settings; part of the int8 cache key.
QUANTIZE_SETTINGS = {"model_type": "transformer", "preset": "default (mixed for transformers)", "batch": 1}
EXTRA = "pip install pacl-fast[openvino]"


def import_openvino():  # noqa: ANN201 - the module
    """``openvino``, or :class:`EncoderUnavailableError` naming the extra to install."""
    try:
        import openvino
    except ImportError as error:
        raise EncoderUnavailableError(f"encoder='openvino' needs OpenVINO, which is not installed: {EXTRA}") from error
    return openvino


def import_nncf():  # noqa: ANN201 - the module
    """``nncf`` (int8 quantization), or :class:`EncoderUnavailableError` naming the extra to install."""
    try:
        import nncf
    except ImportError as error:
        raise EncoderUnavailableError(
            f"encoder='openvino' with precision='int8' needs NNCF to quantize, which is not installed: {EXTRA}"
        ) from error
    return nncf


def require_bf16(capabilities: Sequence[str], cpu: str) -> None:
    """Raise :class:`EncoderUnavailableError` unless the CPU plugin lists ``BF16`` (AVX512-BF16 or AMX).

    Without it OpenVINO would quietly run the graph in fp32: asking for bf16 there is an error.
    """
    if "BF16" not in capabilities:
        raise EncoderUnavailableError(
            f"precision='bf16' needs a CPU with bf16 instructions (AVX512-BF16 or AMX); OpenVINO's CPU plugin "
            f"reports {sorted(capabilities)} on this CPU ({cpu}). Use precision='fp32' or 'int8'"
        )


# --- OpenVINO and the signal stack ------------------------------------------------------------------


class _StackT(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]  # Linux's stack_t


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Leave the calling thread's alternate signal stack as it was, whatever OpenVINO does inside.

    Why: OpenVINO's CPU plugin registers an alternate signal stack on the calling thread when it
    builds an engine (``create_plugin_engine`` in ``libopenvino_intel_cpu_plugin.so``, seen with gdb)
    and frees it with the engine without always unregistering it. CPython installs its signal
    handlers with ``SA_ONSTACK`` (SIGINT; torch's DataLoader adds SIGCHLD), so the next such signal
    then runs on freed memory: the test suite segfaulted in a later SIGINT and in a DataLoader
    worker's SIGCHLD. Linux only (elsewhere a no-op); two system calls per use.
    """
    libc = _libc()
    if libc is None:
        yield
        return
    before = _StackT()
    libc.sigaltstack(None, ctypes.byref(before))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(before), None)


@functools.cache
def _libc():  # noqa: ANN202 - ctypes.CDLL or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# --- the cache ---------------------------------------------------------------------------------------


def entry_problem(folder: Path) -> str | None:
    """Why the cache folder cannot be used, or None if it looks whole (record and files present, sizes as recorded)."""
    return record_problem(folder, (MODEL_XML, MODEL_BIN))


def cache_key(onnx_key: str, openvino_version: str, cpu: str) -> str:
    """The key of a model's OpenVINO folder: built from its fp32 ONNX graph, so that graph's key, extended
    by what changes the conversion (this format, OpenVINO's version, the CPU)."""
    return f"{onnx_key}-{short_digest({'format': OPENVINO_FORMAT, 'openvino': openvino_version, 'cpu': cpu})}"


def cached_sizes(model: nn.Module, cache_dir: str | os.PathLike | None = None) -> list[tuple[int, int]]:
    """The input sizes whose fp32 (and so bf16) OpenVINO model of ``model`` is whole in the cache: what an
    encoder loads without building. Cheap when there is none: the weights are hashed (to find this model's
    folder) only when a folder of this method's models exists."""
    base = Path(cache_dir or default_cache_dir()) / "openvino"
    try:
        candidates = [p.name for p in base.iterdir() if p.name.startswith(f"{model.method}-fp32-")]
    except OSError:
        return []
    if not candidates:
        return []
    key = cache_key(export_key(model, torch.float32), import_openvino().__version__, cpu_name())
    sizes = []
    for folder in sorted((base / key).glob("image-*-fp32")):
        match = re.fullmatch(r"image-(\d+)x(\d+)-fp32", folder.name)
        if match and entry_problem(folder) is None:
            sizes.append((int(match[1]), int(match[2])))
    return sizes


@dataclass
class _Compiled:
    """One compiled image model and its infer requests (one per stream the plugin chose)."""

    folder: Path
    compiled: object  # openvino.CompiledModel
    requests: list
    lock: threading.Lock


class OpenVINOEncoder:
    """Runs a model's image tower (PACL or a training-free method) through OpenVINO's CPU plugin.

    Precisions: ``fp32``; ``bf16`` (the CPU plugin's inference precision over the fp32 graph;
    only on CPUs with AVX512-BF16 or AMX, elsewhere an error rather than a quiet fp32 run);
    ``int8`` (NNCF post-training quantization of the fp32 graph; the operations NNCF leaves
    unquantized run in fp32). Outputs are float32 whatever the precision.

    The text tower and CLIP's global image embedding are not converted: ``encode_text`` and
    ``encode_global`` run the model itself in PyTorch fp32 (as the TensorRT encoder does). The
    text tower runs once per vocabulary and the segmenter caches its output.

    The first call with an input size converts (and for int8 quantizes) its graph and caches it
    (see the module docstring); later encoders load it from the cache.

    Args:
        model: the model, on the CPU (not modified).
        precision: ``"fp32"``, ``"bf16"`` or ``"int8"``.
        cache_dir: root of the ONNX and OpenVINO caches (default ``$PACL_FAST_CACHE`` or ``~/.cache/pacl-fast``).
        calibration: int8 only: ``"synthetic"`` (scenes of the synthetic world's training seed,
            rendered at the CLIP's native size) or a folder of images (searched recursively).
            None: an int8 model of this model and size already in the cache (the newest, e.g.
            one made by ``pacl-fast export --format openvino``), else ``"synthetic"`` with a
            warning: the synthetic world calibrates the demo CLIP; a CLIP trained on photos
            should be calibrated on images like the ones it will segment.
        calibration_size: calibration images (default 300; all of a folder that has fewer).
        threads: CPU threads for inference (default: torch's).
        hint: the CPU plugin's performance hint. ``"LATENCY"`` (default): one stream runs each
            batch on every thread. ``"THROUGHPUT"``: several streams, a batch split among them
            (issue 15's trial ran one request per call under THROUGHPUT and measured it slower
            on 2 cores; split, ViT-B-16 int8 ran about as fast as LATENCY here).
        progress: show a progress bar while calibration images are checked (NNCF draws its own for its passes).
    Raises:
        EncoderUnavailableError: OpenVINO (or NNCF, for int8) is not installed; bf16 on a CPU without it.
    """

    name = "openvino"
    dtype = torch.float32

    def __init__(
        self,
        model: nn.Module,
        precision: str = "fp32",
        *,
        cache_dir: str | os.PathLike | None = None,
        calibration: str | os.PathLike | None = None,
        calibration_size: int = DEFAULT_CALIBRATION_SIZE,
        threads: int | None = None,
        hint: str = "LATENCY",
        progress: bool = True,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"encoder='openvino': precision must be one of {PRECISIONS}, got {precision!r}")
        if hint not in HINTS:
            raise ValueError(f"encoder='openvino': hint must be one of {HINTS}, got {hint!r}")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"encoder='openvino': threads must be a positive integer or None, got {threads!r}")
        if precision != "int8" and calibration is not None:
            raise ValueError(f"calibration is used only with precision='int8', not {precision!r}")
        self.device = model_device(model)
        if self.device.type != "cpu":
            raise ValueError(f"encoder='openvino' runs on the CPU; the model is on {self.device} (pass device='cpu')")
        self.ov = import_openvino()
        self.nncf = import_nncf() if precision == "int8" else None
        self.core = self.ov.Core()
        self.cpu = cpu_name()
        if precision == "bf16":
            require_bf16(self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"), self.cpu)
        self.precision = precision
        self.threads = threads or torch.get_num_threads()
        self.hint = hint
        self.progress = progress
        self.calibration_size = calibration_size
        self.calibration = None if calibration is None else Calibration.resolve(calibration, calibration_size)
        # Used when no int8 model is cached for a size; made now so that a bad calibration_size fails now.
        self.synthetic_calibration = Calibration.resolve("synthetic", calibration_size)
        backbone = model.backbone
        self.embed_dim = backbone.embed_dim
        self.pixel_multiple, self.grid_patch = model.pixel_multiple, model.grid_patch
        self.image_size, (self.mean, self.std) = backbone.image_size, backbone.mean_std
        self.onnx = OnnxCache(model, torch.float32, cache_dir)
        key = cache_key(self.onnx.key, self.ov.__version__, self.cpu)
        self.store = ArtifactStore(cache_dir, f"openvino/{key}", "OpenVINO")
        self.root = self.store.root
        self.torch = TorchEncoder(model, torch.float32)  # text and global image embeddings
        self._compiled: dict[tuple[int, int], _Compiled] = {}
        self._lock = threading.Lock()

    # --- where models live ---------------------------------------------------------------------------

    def model_folder(self, image_size: tuple[int, int]) -> Path:
        """The cache folder of this precision's model for inputs ``(H, W)`` (it may not exist yet)."""
        name = self._plan(as_size(image_size))[0]
        found = [root / name for root in self.store.roots() if os.path.lexists(root / name)]
        return found[0] if found else self.store.build_root / name

    def _plan(self, image_size: tuple[int, int]) -> tuple[str, Calibration | None]:
        """The cache entry's name for this size and the calibration that builds it (None: fp32, or a cached
        int8 model)."""
        stem = image_artifact(image_size)
        if self.precision != "int8":
            return f"{stem}-fp32", None  # bf16 is a compile setting over the fp32 graph
        calibration = self.calibration
        if calibration is None:
            cached = self._cached_int8(stem)
            if cached is not None:
                return cached, None
            logger.warning(
                "precision='int8' without calibration: calibrating on %d scenes of the synthetic world. That suits "
                "the demo CLIP; for a CLIP trained on photos pass calibration=<a folder of such images>",
                self.calibration_size,
            )
            calibration = self.synthetic_calibration
        slug = calibration.slug({"nncf": self.nncf.__version__, "settings": QUANTIZE_SETTINGS})
        return f"{stem}-int8-{slug}", calibration

    def _cached_int8(self, stem: str) -> str | None:
        """The name of the newest whole int8 entry for this size, whatever its calibration, or None."""
        whole = [f for root in self.store.roots() for f in root.glob(f"{stem}-int8-*") if entry_problem(f) is None]
        if not whole:
            return None
        newest = max(whole, key=lambda f: (f / ENTRY_JSON).stat().st_mtime_ns)
        logger.info("precision='int8' without calibration: using the cached int8 model %s", newest)
        return newest.name

    def model_path(self, image_size: tuple[int, int]) -> Path:
        """Path of the IR (``model.xml``) for inputs ``(H, W)``, building it now if missing or broken."""
        return self._prepare(as_size(image_size)).folder / MODEL_XML

    # --- building ------------------------------------------------------------------------------------

    def _convert(self, image_size: tuple[int, int]):  # noqa: ANN202 - openvino.Model
        """The fp32 OpenVINO model from the cached ONNX export; an export OpenVINO cannot read is redone, once."""
        return self.onnx.image(image_size, load=lambda path: self.ov.convert_model(str(path)))

    def _quantize(self, ov_model, image_size: tuple[int, int], calibration: Calibration):  # noqa: ANN001, ANN202
        """NNCF post-training quantization of an ``openvino.Model`` on the calibration images (transformer preset)."""
        nncf = self.nncf
        images = CalibrationImages(
            calibration, image_size, self.image_size, self.mean, self.std, progress=self.progress
        )
        logger.info("calibrating on %d %s images", len(images), calibration.kind)
        return nncf.quantize(
            ov_model,
            nncf.Dataset(images),
            subset_size=len(images),
            model_type=nncf.ModelType.TRANSFORMER,
        )

    def _build(self, image_size: tuple[int, int], folder: Path, calibration: Calibration | None) -> None:
        """Convert (and with a calibration, quantize) the model for this size into ``folder`` atomically
        (a temporary folder, then rename)."""
        start = time.perf_counter()
        ov_model = self._convert(image_size)
        if calibration is not None:
            ov_model = self._quantize(ov_model, image_size, calibration)
        # Another process that finished the same model first wins when its folder is whole.
        with atomic_folder(folder, lambda done: entry_problem(done) is None) as tmp:
            self.ov.save_model(ov_model, str(tmp / MODEL_XML), compress_to_fp16=False)
            record = {
                "format": OPENVINO_FORMAT,
                "onnx_key": self.onnx.key,
                "image_size": list(image_size),
                "graph": "fp32" if calibration is None else "int8",
                "openvino": self.ov.__version__,
                "cpu": self.cpu,
                "calibration": None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.perf_counter() - start, 1),
            }
            if calibration is not None:
                record["calibration"] = {**calibration.describe(), "nncf": self.nncf.__version__}
                record["quantize"] = QUANTIZE_SETTINGS
            write_record(tmp, record)

    def _config(self) -> dict:
        precision = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[self.precision]
        # The hint is explicit for fp32 too: on bf16-capable CPUs the plugin's default is bf16.
        return {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": self.hint,
            "INFERENCE_NUM_THREADS": self.threads,
        }

    def _load(self, folder: Path) -> _Compiled:
        compiled = self.core.compile_model(self.core.read_model(str(folder / MODEL_XML)), "CPU", self._config())
        streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        return _Compiled(folder, compiled, [compiled.create_infer_request() for _ in range(streams)], threading.Lock())

    def _prepare(self, image_size: tuple[int, int]) -> _Compiled:
        """The compiled model for this size: from the cache when whole, else built; a broken entry is rebuilt once."""
        with self._lock, keep_signal_stack():
            if image_size not in self._compiled:
                name, calibration = self._plan(image_size)
                kind = "image model" if calibration is None else "int8 image model (quantizing)"
                self._compiled[image_size] = self.store.get(
                    name,
                    f"the {image_size[0]}x{image_size[1]} {kind}",
                    lambda folder: self._build(image_size, folder, calibration),
                    self._load,
                    problem=entry_problem,
                )
            return self._compiled[image_size]

    def compiled_model(self, image_size: tuple[int, int]):  # noqa: ANN201 - openvino.CompiledModel
        """OpenVINO's compiled model for inputs ``(H, W)`` (built or loaded now): its properties and runtime graph."""
        return self._prepare(as_size(image_size)).compiled

    # --- running -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, h, w, E]`` unit embeddings (float32, CPU).

        ``out``: an optional contiguous ``[B, h, w, E]`` float32 CPU tensor to write into.
        """
        grid = check_pixels(pixels, self.pixel_multiple, self.grid_patch)
        pixels = pixels.to("cpu", torch.float32).contiguous()
        patches = check_out(out, (pixels.shape[0], *grid, self.embed_dim), torch.float32, torch.device("cpu"))
        model = self._prepare(as_size(pixels.shape[-2:]))
        # A batch is split among the plugin's streams (one with the LATENCY hint); each request reads
        # and writes its slice of the torch tensors in place.
        chunks = min(len(model.requests), pixels.shape[0])
        with model.lock, keep_signal_stack():
            used = []
            for request, inputs, outputs in zip(model.requests, pixels.chunk(chunks), patches.chunk(chunks)):
                request.set_input_tensor(self.ov.Tensor(inputs.numpy(), shared_memory=True))
                request.set_output_tensor(self.ov.Tensor(outputs.numpy(), shared_memory=True))
                request.start_async()
                used.append(request)
            for request in used:
                request.wait()
        return patches

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, L]`` token ids -> ``[T, E]`` unit text embeddings (float32): the model's own, in PyTorch fp32."""
        return self.torch.encode_text(tokens)

    @torch.inference_mode()
    def encode_global(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` (native size) -> ``[B, E]`` CLIP's unit image embeddings: the model's own, PyTorch fp32."""
        return self.torch.encode_global(pixels)

    def __repr__(self) -> str:
        return f"OpenVINOEncoder(precision={self.precision!r}, hint={self.hint!r}, threads={self.threads})"


def export_openvino(
    model: nn.Module,
    out: str | os.PathLike,
    image_sizes: Sequence[tuple[int, int]],
    precision: str = "fp32",
    calibration: str | os.PathLike | None = None,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    *,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Build ``model``'s OpenVINO image models for ``image_sizes`` into ``out`` (an encoder cache folder)
    and write ``out/manifest.json`` describing them; returns the manifest.

    Models already in ``out`` are reused, so an interrupted export resumes. Point an encoder at
    ``out`` (``cache_dir=out``; for int8 with ``calibration=None`` it finds the quantized model).
    Arguments as :class:`OpenVINOEncoder`'s; ``calibration`` defaults to ``"synthetic"`` for int8.
    """
    out = Path(out)
    if precision == "int8" and calibration is None:
        calibration = "synthetic"
    encoder = OpenVINOEncoder(
        model,
        precision,
        cache_dir=out,
        calibration=calibration,
        calibration_size=calibration_size,
        threads=threads,
        progress=progress,
    )
    encoder.store.temporary = encoder.onnx.store.temporary = False  # an export writes where it is asked, or fails

    def job(size: tuple[int, int]) -> dict:
        path = encoder.model_path(size)  # built now, not on the first batch
        return image_entry(
            path.relative_to(out).as_posix(),
            size,
            encoder.grid_patch,
            encoder.embed_dim,
            "float32",
            precision=precision,
            calibration=read_record(path.parent).get("calibration"),
        )

    sizes = [as_size(size) for size in image_sizes]
    jobs = [(f"image {h}x{w} ({precision})", lambda size=(h, w): job(size)) for h, w in sizes]
    header = {
        "format": "openvino",
        "method": model.method,
        "precision": precision,
        "key": encoder.root.name,
        "openvino": encoder.ov.__version__,
        "cpu": encoder.cpu,
    }
    return export_all(out, header, jobs, progress=progress)
