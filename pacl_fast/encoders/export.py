"""ONNX export of PACL's towers, and the on-disk cache that compiled encoders share.

The image tower's positional embeddings are interpolated for one patch grid, so an image graph
serves one input size ``(H, W)``; its batch axis is dynamic. The text graph serves any number of
prompts. Exports land in a cache folder keyed by everything that changes the graph::

    <cache>/<key>/image-224x224/model.onnx (+ model.onnx.data)
    <cache>/<key>/text/model.onnx          (+ model.onnx.data)

``key`` hashes the weights themselves (CLIP and PACL tensors), the CLIP and PACL configs, the
precision and the exporter versions. Each artifact is written to a temporary folder and renamed
into place, so an interrupted export leaves nothing half-written and the next run redoes only
what is missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from pacl_fast.encoders.graph import ImageTower, TextTower, model_device, model_dtype
from pacl_fast.model import PACL

EXPORT_FORMAT = 1  # bump when the exported graph changes for the same model
ONNX_FILE = "model.onnx"
IMAGE_INPUT, IMAGE_OUTPUT = "pixels", "patches"
TEXT_INPUT, TEXT_OUTPUT = "tokens", "texts"
MAX_EXPORT_BATCH = 4096  # upper bound of the dynamic batch axis in exported graphs
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class EncoderUnavailableError(RuntimeError):
    """An encoder backend cannot run here: its library or device is missing. The message says what to install."""


def require_onnx() -> None:
    """Raise :class:`EncoderUnavailableError` naming the extra when the ONNX exporter's packages are missing."""
    missing = [name for name in ("onnx", "onnxscript") if _missing(name)]
    if missing:
        raise EncoderUnavailableError(
            f"ONNX export needs {' and '.join(missing)}, which are not installed: pip install pacl-fast[onnx]"
        )


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def default_cache_dir() -> Path:
    """``$PACL_FAST_CACHE`` or ``~/.cache/pacl-fast``."""
    return Path(os.environ.get("PACL_FAST_CACHE") or Path.home() / ".cache" / "pacl-fast")


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def weights_digest(model: PACL) -> str:
    """sha256 of every tensor that defines the encoders (CLIP and PACL), in a fixed order.

    Hashing the tensors, not the weights' file names, keeps two randomly initialised models (or a
    model whose weights were edited in memory) from sharing cache entries.
    """
    digest = hashlib.sha256()
    tensors = {f"clip.{k}": v for k, v in model.backbone.clip.state_dict().items()}
    tensors.update({f"pacl.{k}": v for k, v in model.state_dict().items()})
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_key(model: PACL, dtype: torch.dtype, weights_sha256: str | None = None) -> str:
    """Cache key of a model's exports in ``dtype`` (see the module docstring)."""
    import onnxscript

    description = {
        "format": EXPORT_FORMAT,
        "weights": weights_sha256 or weights_digest(model),
        "clip": str(model.backbone.identity.arch),
        "clip_config": model.backbone.model_cfg,
        "pacl_config": model.config.to_dict(),
        "dtype": dtype_name(dtype),
        "torch": torch.__version__,
        "onnxscript": onnxscript.__version__,
    }
    canonical = json.dumps(description, sort_keys=True, default=str)
    return f"{dtype_name(dtype)}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def image_artifact(size: tuple[int, int]) -> str:
    return f"image-{size[0]}x{size[1]}"


TEXT_ARTIFACT = "text"


def _cast_copy(model: PACL, dtype: torch.dtype) -> PACL:
    """``model`` in ``dtype``, copying only when the precision differs (the caller's model is never cast)."""
    if model_dtype(model) == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def _export(module: torch.nn.Module, example: torch.Tensor, names: tuple[str, str], folder: Path) -> Path:
    """``torch.onnx.export`` into ``folder/model.onnx`` atomically (temp folder, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
        input_name, output_name = names
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore", (UserWarning, DeprecationWarning, FutureWarning))
            torch.onnx.export(
                module,
                (example,),
                str(tmp / ONNX_FILE),
                dynamo=True,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=({0: batch},),
                external_data=True,
                verbose=False,
            )
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same export first: keep theirs
            if not (folder / ONNX_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / ONNX_FILE


def export_image_onnx(model: PACL, image_size: tuple[int, int], folder: str | os.PathLike, dtype: torch.dtype) -> Path:
    """Export the image tower for inputs ``[B, 3, H, W]`` (B dynamic) to ``folder/model.onnx``.

    Graph: ``pixels`` ``[B, 3, H, W]`` (``dtype``) -> ``patches`` ``[B, H/p, W/p, E]`` (``dtype``), unit rows.
    """
    require_onnx()
    model = _cast_copy(model, dtype)
    tower = ImageTower(model).eval()
    tower.prime(image_size)
    example = torch.zeros(2, 3, *image_size, dtype=dtype, device=model_device(model))
    return _export(tower, example, (IMAGE_INPUT, IMAGE_OUTPUT), Path(folder))


def export_text_onnx(model: PACL, folder: str | os.PathLike, dtype: torch.dtype) -> Path:
    """Export the text tower: ``tokens`` ``[T, L]`` int64 -> ``texts`` ``[T, E]`` (``dtype``), unit rows."""
    require_onnx()
    model = _cast_copy(model, dtype)
    tower = TextTower(model).eval()
    example = model.backbone.tokenize(["a photo of a cat.", "a photo of a dog."]).to(model_device(model))
    return _export(tower, example, (TEXT_INPUT, TEXT_OUTPUT), Path(folder))


class OnnxCache:
    """Where one model's ONNX graphs live, exporting each on first use.

    Args:
        model: the PACL model (not modified).
        dtype: precision of the exported graphs.
        cache_dir: root folder (default :func:`default_cache_dir`).
    """

    def __init__(self, model: PACL, dtype: torch.dtype, cache_dir: str | os.PathLike | None = None):
        require_onnx()
        self.model = model
        self.dtype = dtype
        self.weights_sha256 = weights_digest(model)
        self.key = export_key(model, dtype, self.weights_sha256)
        self.root = Path(cache_dir or default_cache_dir()) / "onnx" / self.key

    def image(self, image_size: tuple[int, int]) -> Path:
        """Path of the image graph for this input size, exported now if missing."""
        folder = self.root / image_artifact(image_size)
        if not (folder / ONNX_FILE).is_file():
            print(
                f"pacl-fast: exporting the image tower for {image_size[0]}x{image_size[1]} inputs to ONNX "
                f"(once per input size; cached in {self.root})",
                file=sys.stderr,
            )
            export_image_onnx(self.model, image_size, folder, self.dtype)
        return folder / ONNX_FILE

    def text(self) -> Path:
        """Path of the text graph, exported now if missing."""
        folder = self.root / TEXT_ARTIFACT
        if not (folder / ONNX_FILE).is_file():
            print(f"pacl-fast: exporting the text tower to ONNX (cached in {self.root})", file=sys.stderr)
            export_text_onnx(self.model, folder, self.dtype)
        return folder / ONNX_FILE
