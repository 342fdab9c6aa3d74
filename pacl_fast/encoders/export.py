"""ONNX export of a model's towers, and the on-disk cache that compiled encoders share.

The image tower's positional embeddings are interpolated for one patch grid, so an image graph
serves one input size ``(H, W)``; its batch axis is dynamic. The text graph serves any number of
prompts; the global graph is CLIP's own pooled image embedding at its native size (zero-shot
classification). Exports land in a cache folder keyed by everything that changes the graph::

    <cache>/onnx/<key>/image-224x224/model.onnx (+ model.onnx.data)
    <cache>/onnx/<key>/text/model.onnx          (+ model.onnx.data)
    <cache>/onnx/<key>/global/model.onnx        (+ model.onnx.data)

``key`` hashes the weights themselves (every tensor of the model), the CLIP config, the method
and its config, the precision and the exporter versions. Each artifact is written to a temporary
folder and renamed into place, so an interrupted export leaves nothing half-written and the next
run redoes only what is missing. A cache entry that is there but broken (truncated or garbage
``model.onnx``, truncated or missing ``model.onnx.data``) is named in a warning and exported again,
once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pacl_fast.encoders.base import EncoderUnavailableError, cast_copy, dtype_name
from pacl_fast.encoders.graph import GlobalTower, ImageTower, TextTower, model_device
from pacl_fast.files import atomic_folder, atomic_write, default_cache_dir

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when the exported graph changes for the same model
ONNX_FILE = "model.onnx"
IMAGE_INPUT, IMAGE_OUTPUT = "pixels", "patches"
TEXT_INPUT, TEXT_OUTPUT = "tokens", "texts"
GLOBAL_OUTPUT = "images"
MAX_EXPORT_BATCH = 4096  # upper bound of the dynamic batch axis in exported graphs


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


def weights_digest(model: nn.Module) -> str:
    """sha256 of every tensor that defines the encoders (the CLIP and the method's), in a fixed order.

    Hashing the tensors, not the weights' file names, keeps two randomly initialised models (or a
    model whose weights were edited in memory) from sharing cache entries.
    """
    digest = hashlib.sha256()
    tensors = model.state_dict()  # the CLIP (``backbone.*``) and what the method adds
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_key(model: nn.Module, dtype: torch.dtype, weights_sha256: str | None = None) -> str:
    """Cache key of a model's exports in ``dtype`` (see the module docstring); starts with the method's name."""
    import onnxscript

    description = {
        "format": EXPORT_FORMAT,
        "weights": weights_sha256 or weights_digest(model),
        "clip": str(model.backbone.identity.arch),
        "clip_config": model.backbone.model_cfg,
        **model.describe(),
        "dtype": dtype_name(dtype),
        "torch": torch.__version__,
        "onnxscript": onnxscript.__version__,
    }
    canonical = json.dumps(description, sort_keys=True, default=str)
    return f"{model.method}-{dtype_name(dtype)}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def image_artifact(size: tuple[int, int]) -> str:
    return f"image-{size[0]}x{size[1]}"


TEXT_ARTIFACT = "text-v2"  # v2: any token length (graphs named "text" took the full context only)
GLOBAL_ARTIFACT = "global"


def _export(
    module: torch.nn.Module,
    example: torch.Tensor,
    names: tuple[str, str],
    folder: Path,
    dynamic: dict[int, object] | None = None,
) -> Path:
    """``torch.onnx.export`` into ``folder/model.onnx`` atomically (temp folder, then rename).

    ``dynamic``: the input's dynamic axes (``torch.export.Dim`` by axis); default the batch axis.
    """
    dynamic = dynamic or {0: torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)}
    input_name, output_name = names
    # Another process that finished the same export first wins: its graph is the same.
    whole = lambda done: (done / ONNX_FILE).is_file()  # noqa: E731
    with atomic_folder(folder, whole) as tmp, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", (UserWarning, DeprecationWarning, FutureWarning))
        torch.onnx.export(
            module,
            (example,),
            str(tmp / ONNX_FILE),
            dynamo=True,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=(dynamic,),
            external_data=True,
            verbose=False,
        )
    return folder / ONNX_FILE


def export_image_onnx(
    model: nn.Module, image_size: tuple[int, int], folder: str | os.PathLike, dtype: torch.dtype
) -> Path:
    """Export the image tower for inputs ``[B, 3, H, W]`` (B dynamic) to ``folder/model.onnx``.

    Graph: ``pixels`` ``[B, 3, H, W]`` (``dtype``) -> ``patches`` ``[B, H/p, W/p, E]`` (``dtype``), unit rows.
    """
    require_onnx()
    model = cast_copy(model, dtype)
    tower = ImageTower(model).eval()
    tower.prime(image_size)
    example = torch.zeros(2, 3, *image_size, dtype=dtype, device=model_device(model))
    return _export(tower, example, (IMAGE_INPUT, IMAGE_OUTPUT), Path(folder))


def export_text_onnx(model: nn.Module, folder: str | os.PathLike, dtype: torch.dtype) -> Path:
    """Export the text tower: ``tokens`` ``[T, L]`` int64 -> ``texts`` ``[T, E]`` (``dtype``), unit rows.

    On truncatable towers (``ClipBackbone.text_truncatable``) ``L`` is a dynamic axis too (``length``,
    1 to the context length), so that onnxruntime runs prompts cut after their end-of-text token, as
    the eager tower does; other towers take ``L`` = the context length only.
    """
    require_onnx()
    model = cast_copy(model, dtype)
    backbone = model.backbone
    tower = TextTower(model).eval()
    example = backbone.tokenize(["a photo of a cat.", "a photo of a dog."], warn=False).to(model_device(model))
    if not backbone.text_truncatable:
        return _export(tower, example, (TEXT_INPUT, TEXT_OUTPUT), Path(folder))
    context = backbone.context_length
    # An example length of neither 1 nor the context, so that the exporter keeps the axis symbolic.
    length = min(max(int(backbone.text_lengths(example).max()), 2), context - 1)
    dynamic = {
        0: torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH),
        1: torch.export.Dim("length", min=1, max=context),
    }
    return _export(tower, example[:, :length], (TEXT_INPUT, TEXT_OUTPUT), Path(folder), dynamic)


def export_global_onnx(model: nn.Module, folder: str | os.PathLike, dtype: torch.dtype) -> Path:
    """Export CLIP's pooled image embedding at its native size: ``pixels`` -> ``images`` ``[B, E]`` unit rows."""
    require_onnx()
    model = cast_copy(model, dtype)
    size = model.backbone.image_size
    example = torch.zeros(2, 3, size, size, dtype=dtype, device=model_device(model))
    return _export(GlobalTower(model).eval(), example, (IMAGE_INPUT, GLOBAL_OUTPUT), Path(folder))


def onnx_problem(folder: Path) -> str | None:
    """Why the exported graph in ``folder`` cannot be used, or None if it looks whole.

    Reads the graph without its weights, then checks that every external weight file it names is
    a plain file name inside ``folder`` and long enough for the bytes the graph reads from it.
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = folder / ONNX_FILE
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises its own DecodeError; any failure means a broken file
        return f"{path.name} is not a readable ONNX file ({type(error).__name__})"
    sizes: dict[str, int] = {}
    for tensor in graph.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location or Path(location).name != location:
            return f"{path.name} names an external data file outside its folder ({location!r})"
        data = folder / location
        if location not in sizes:
            if not data.is_file():
                return f"its weights file {location} is missing"
            sizes[location] = data.stat().st_size
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > sizes[location]:
            return f"its weights file {location} is truncated ({sizes[location]} bytes, {end} needed)"
    return None


class OnnxCache:
    """Where one model's ONNX graphs live, exporting each on first use.

    Args:
        model: the model (not modified).
        dtype: precision of the exported graphs.
        cache_dir: root folder (default :func:`default_cache_dir`).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, cache_dir: str | os.PathLike | None = None):
        require_onnx()
        self.model = model
        self.dtype = dtype
        self.weights_sha256 = weights_digest(model)
        self.key = export_key(model, dtype, self.weights_sha256)
        self.root = Path(cache_dir or default_cache_dir()) / "onnx" / self.key

    def _artifact(self, name: str, what: str, export: Callable[[Path], Path], *, rebuild: bool = False) -> Path:
        """``root/name/model.onnx``: reused when whole, else (or with ``rebuild``) exported again."""
        folder = self.root / name
        problem = "it failed to load" if rebuild else (onnx_problem(folder) if folder.exists() else None)
        if problem is not None:
            logger.warning("ONNX cache entry %s is broken (%s); exporting it again", folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
        if not (folder / ONNX_FILE).is_file():
            logger.info("exporting %s to ONNX (once; cached in %s)", what, self.root)
            export(folder)
        return folder / ONNX_FILE

    def image(self, image_size: tuple[int, int], *, rebuild: bool = False) -> Path:
        """Path of the image graph for this input size, exported now if missing or broken."""
        what = f"the image tower for {image_size[0]}x{image_size[1]} inputs"
        return self._artifact(
            image_artifact(image_size),
            what,
            lambda folder: export_image_onnx(self.model, image_size, folder, self.dtype),
            rebuild=rebuild,
        )

    def text(self, *, rebuild: bool = False) -> Path:
        """Path of the text graph, exported now if missing or broken."""
        return self._artifact(
            TEXT_ARTIFACT,
            "the text tower",
            lambda folder: export_text_onnx(self.model, folder, self.dtype),
            rebuild=rebuild,
        )

    def global_image(self, *, rebuild: bool = False) -> Path:
        """Path of the global image-embedding graph, exported now if missing or broken."""
        return self._artifact(
            GLOBAL_ARTIFACT,
            "CLIP's global image embedding",
            lambda folder: export_global_onnx(self.model, folder, self.dtype),
            rebuild=rebuild,
        )


def export_artifacts(
    model: nn.Module,
    fmt: str,
    out: str | os.PathLike,
    dtype: torch.dtype,
    image_sizes: list[tuple[int, int]],
    *,
    max_batch: int = 32,
    progress: bool = True,
) -> dict:
    """Export ``model``'s towers to ``out`` (an encoder cache folder) as ``fmt`` (``onnx`` or ``tensorrt``)
    and write ``out/manifest.json`` describing every artifact; returns the manifest.

    Raises :class:`EncoderUnavailableError` when the format's library (or, for TensorRT, a GPU) is missing.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    onnx = OnnxCache(model, dtype, out)
    trt_encoder = None
    if fmt == "tensorrt":
        from pacl_fast.encoders.tensorrt_encoder import TensorRTEncoder

        trt_encoder = TensorRTEncoder(model, dtype, max_batch=max_batch, cache_dir=out)
    elif fmt != "onnx":
        raise ValueError(f"format must be onnx or tensorrt, got {fmt!r}")
    name = dtype_name(dtype)
    patch, embed_dim = model.backbone.patch_size, model.backbone.embed_dim
    manifest = {"format": fmt, "method": model.method, "dtype": name, "key": onnx.key, "artifacts": []}
    steps = [("image", size) for size in image_sizes] + ([("text", None)] if fmt == "onnx" else [])
    context = model.backbone.context_length
    truncatable = model.backbone.text_truncatable
    for tower, size in tqdm(steps, desc=f"export {fmt}", unit="graph", disable=not progress):
        if tower == "text":
            path = onnx.text()
            entry = {
                "input": {"name": TEXT_INPUT, "shape": ["T", "L" if truncatable else context], "dtype": "int64"},
                "output": {"name": TEXT_OUTPUT, "shape": ["T", embed_dim], "dtype": name},
            }
            if truncatable:  # prompts run at their own length: up to their end-of-text token
                entry["length_range"] = [1, context]
        else:
            if trt_encoder is not None:
                path = trt_encoder.engine_path(size)
                if not path.is_file():
                    trt_encoder.build(size)
            else:
                path = onnx.image(size)
            entry = {
                "input": {"name": IMAGE_INPUT, "shape": ["B", 3, *size], "dtype": name},
                "output": {
                    "name": IMAGE_OUTPUT,
                    "shape": ["B", size[0] // patch, size[1] // patch, embed_dim],
                    "dtype": name,
                },
            }
            if trt_encoder is not None:
                entry["batch_range"] = [1, max_batch]
        manifest["artifacts"].append({"tower": tower, "path": path.relative_to(out).as_posix(), **entry})
        tqdm.write(f"{tower}{' ' + 'x'.join(map(str, size)) if size else ''}: {path}")
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
