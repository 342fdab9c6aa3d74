"""ONNX export of a model's towers, and the cache of exported graphs that every compiled encoder builds on.

The image tower's positional embeddings are interpolated for one patch grid, so an image graph
serves one input size ``(H, W)``; its batch axis is dynamic. The text graph serves any number of
prompts; the global graph is CLIP's own pooled image embedding at its native size (zero-shot
classification). Exports land in a cache folder keyed by everything that changes the graph
(:func:`~pacl_fast.encoders.artifacts.export_key`)::

    <cache>/onnx/<key>/image-224x224/model.onnx (+ model.onnx.data, entry.json)
    <cache>/onnx/<key>/text-v2/model.onnx       (+ model.onnx.data, entry.json)
    <cache>/onnx/<key>/global/model.onnx        (+ model.onnx.data, entry.json)

Each artifact is written to a temporary folder and renamed into place, so an interrupted export
leaves nothing half-written and the next run redoes only what is missing. An entry that is there
but broken (not a folder, a missing or broken ``entry.json``, truncated or garbage ``model.onnx``,
truncated or missing ``model.onnx.data``, a graph the runtime cannot load) is named in a warning
and exported again, once (:class:`~pacl_fast.encoders.artifacts.ArtifactStore`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from pacl_fast.encoders.artifacts import (
    ArtifactStore,
    export_all,
    export_key,
    image_artifact,
    image_entry,
    record_problem,
    weights_digest,
    write_record,
)
from pacl_fast.encoders.base import EncoderUnavailableError, as_size, cast_copy, dtype_name
from pacl_fast.encoders.graph import (
    GLOBAL_OUTPUT,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    TEXT_INPUT,
    TEXT_OUTPUT,
    GlobalTower,
    ImageTower,
    TextTower,
    model_device,
)
from pacl_fast.files import atomic_folder

T = TypeVar("T")

ONNX_FILE = "model.onnx"
MAX_EXPORT_BATCH = 4096  # upper bound of the dynamic batch axis in exported graphs
TEXT_ARTIFACT = "text-v2"  # v2: any token length (graphs named "text" took the full context only)
GLOBAL_ARTIFACT = "global"


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


def _export(
    module: torch.nn.Module,
    example: torch.Tensor,
    names: tuple[str, str],
    folder: Path,
    dynamic: dict[int, object] | None = None,
) -> Path:
    """``torch.onnx.export`` into ``folder/model.onnx`` with its record, atomically (temp folder, then rename).

    ``dynamic``: the input's dynamic axes (``torch.export.Dim`` by axis); default the batch axis.
    """
    dynamic = dynamic or {0: torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)}
    input_name, output_name = names
    # Another process that finished the same export first wins: its graph is the same.
    whole = lambda done: entry_problem(done) is None  # noqa: E731
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
        write_record(tmp, {"format": "onnx", "artifact": folder.name, "torch": torch.__version__})
    return folder / ONNX_FILE


def export_image_onnx(
    model: nn.Module, image_size: tuple[int, int], folder: str | os.PathLike, dtype: torch.dtype
) -> Path:
    """Export the image tower for inputs ``[B, 3, H, W]`` (B dynamic) to ``folder/model.onnx``.

    Graph: ``pixels`` ``[B, 3, H, W]`` (``dtype``) -> ``patches`` ``[B, H/q, W/q, E]`` (``dtype``), unit rows
    (``q``: the model's ``grid_patch``; ProxyCLIP's VFM, with its re-normalisation, is inside the graph).
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


def entry_problem(folder: Path) -> str | None:
    """Why an ONNX cache entry cannot be used (its record, then its graph), or None if it looks whole."""
    return record_problem(folder, (ONNX_FILE,)) or onnx_problem(folder)


class OnnxCache:
    """Where one model's ONNX graphs live, exporting each on first use.

    Args:
        model: the model (not modified).
        dtype: precision of the exported graphs.
        cache_dir: root folder (default :func:`~pacl_fast.files.default_cache_dir`).
        temporary: export into a temporary folder when ``cache_dir`` cannot be written (False: raise).
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype,
        cache_dir: str | os.PathLike | None = None,
        *,
        temporary: bool = True,
    ):
        require_onnx()
        self.model = model
        self.dtype = dtype
        self.weights_sha256 = weights_digest(model)
        self.key = export_key(model, dtype, self.weights_sha256)
        self.store = ArtifactStore(cache_dir, f"onnx/{self.key}", "ONNX", temporary=temporary)
        self.root = self.store.root

    def _artifact(
        self, name: str, what: str, export: Callable[[Path], Path], load: Callable[[Path], T] | None
    ) -> T | Path:
        """``load(path of model.onnx)`` (default: the path) of a whole entry, exported first when missing or
        broken; a graph ``load`` fails on is exported again, once."""
        return self.store.get(
            name, what, export, lambda folder: (load or _same)(folder / ONNX_FILE), problem=entry_problem
        )

    def image(self, image_size: tuple[int, int], load: Callable[[Path], T] | None = None) -> T | Path:
        """The image graph for this input size (its path, or what ``load`` makes of it), exported if needed."""
        size = as_size(image_size)
        return self._artifact(
            image_artifact(size),
            f"the image tower for {size[0]}x{size[1]} inputs",
            lambda folder: export_image_onnx(self.model, size, folder, self.dtype),
            load,
        )

    def text(self, load: Callable[[Path], T] | None = None) -> T | Path:
        """The text graph (its path, or what ``load`` makes of it), exported if needed."""
        return self._artifact(
            TEXT_ARTIFACT, "the text tower", lambda folder: export_text_onnx(self.model, folder, self.dtype), load
        )

    def global_image(self, load: Callable[[Path], T] | None = None) -> T | Path:
        """The global image-embedding graph (its path, or what ``load`` makes of it), exported if needed."""
        return self._artifact(
            GLOBAL_ARTIFACT,
            "CLIP's global image embedding",
            lambda folder: export_global_onnx(self.model, folder, self.dtype),
            load,
        )


def _same(path: Path) -> Path:
    return path


def export_onnx(
    model: nn.Module, out: str | os.PathLike, dtype: torch.dtype, image_sizes: list[tuple[int, int]], *,
    progress: bool = True,
) -> dict:  # fmt: skip
    """Export ``model``'s image graphs for ``image_sizes`` and its text graph into ``out`` (an encoder cache
    folder: point an encoder at it) and write ``out/manifest.json``; returns the manifest."""
    out = Path(out)
    cache = OnnxCache(model, dtype, out, temporary=False)
    name, backbone = dtype_name(dtype), model.backbone
    context, truncatable = backbone.context_length, backbone.text_truncatable

    def image(size: tuple[int, int]) -> Callable[[], dict]:
        path = lambda: cache.image(size).relative_to(out).as_posix()  # noqa: E731
        return lambda: image_entry(path(), size, model.grid_patch, backbone.embed_dim, name)

    def text() -> dict:
        entry = {
            "tower": "text",
            "path": cache.text().relative_to(out).as_posix(),
            "input": {"name": TEXT_INPUT, "shape": ["T", "L" if truncatable else context], "dtype": "int64"},
            "output": {"name": TEXT_OUTPUT, "shape": ["T", backbone.embed_dim], "dtype": name},
        }
        if truncatable:  # prompts run at their own length: up to their end-of-text token
            entry["length_range"] = [1, context]
        return entry

    sizes = [as_size(size) for size in image_sizes]
    jobs = [(f"image {h}x{w}", image((h, w))) for h, w in sizes] + [("text", text)]
    header = {"format": "onnx", "method": model.method, "dtype": name, "key": cache.key}
    return export_all(out, header, jobs, progress=progress)
