"""Built artifacts on disk (ONNX graphs, TensorRT engines, OpenVINO models): what keys them, what records
them, the export manifest, and the one way a cache entry is found, checked, rebuilt once when broken, or
built in a temporary folder when the cache cannot be written.

Layout, under the cache folder (``cache_dir``, default :func:`~pacl_fast.files.default_cache_dir`)::

    onnx/<export key>/image-224x224/{model.onnx, model.onnx.data, entry.json}
    openvino/<export key>-<openvino, cpu hash>/image-224x224-fp32/{model.xml, model.bin, entry.json}
    tensorrt/<export key>-trt<version>-<gpu>/image-224x224-b32.engine

Keys: :func:`export_key` names everything that changes an exported graph (the weights themselves, the
CLIP config, the method, the precision, the exporter's versions). TensorRT engines and OpenVINO models
are built from those graphs, so their keys extend it with what changes them on top (the TensorRT version
and GPU; the OpenVINO version and CPU): each format's own key, derived in one direction.

Records: a folder entry holds ``entry.json`` (:func:`write_record`) naming what it is and the size of
each of its files; :func:`record_problem` checks it before anything is loaded. An entry that is broken
in any way (a file where a folder should be or the reverse, an unreadable, truncated or forged record,
a missing or truncated file, or one its runtime cannot load) is named in a warning, removed and built
again, once (:meth:`ArtifactStore.get`).

A cache that cannot be written (a read-only folder, a file in its place) is still read; what must be
built is built in a temporary folder instead, removed at exit, with one warning saying what that costs.

Export manifests: ``pacl-fast export`` writes ``OUT/manifest.json`` listing every artifact with its
tensors' names, shapes and precisions (:func:`write_manifest`, :func:`read_manifest`), for every format.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from pacl_fast.encoders.base import dtype_name
from pacl_fast.encoders.graph import IMAGE_INPUT, IMAGE_OUTPUT
from pacl_fast.files import atomic_write, default_cache_dir, read_regular_bytes

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXPORT_FORMAT = 1  # bump when the exported graph changes for the same model
ENTRY_JSON = "entry.json"
MANIFEST_JSON = "manifest.json"
FORMATS = ("onnx", "tensorrt", "openvino")
MAX_RECORD_BYTES = 1 << 20  # an entry record or a manifest is a few kB; anything this large is not ours


# --- keys ----------------------------------------------------------------------------------------------


def short_digest(description: object) -> str:
    """12 hex digits of the sha256 of a JSON-able description (cache folder names)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
    """Key of a model's exported graphs in ``dtype``: ``<method>-<dtype>-<hash>`` (see the module docstring)."""
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
    """The name of an image graph's entry for inputs ``(H, W)``."""
    return f"image-{size[0]}x{size[1]}"


# --- entry records --------------------------------------------------------------------------------------


def write_record(folder: Path, record: Mapping[str, object]) -> None:
    """``folder/entry.json``: ``record`` plus the size of every other file in ``folder`` (call it last)."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.name != ENTRY_JSON and p.is_file()}
    atomic_write(folder / ENTRY_JSON, json.dumps({**record, "files": files}, indent=2))


def read_json(path: Path) -> dict:
    """A JSON object from a regular file of at most :data:`MAX_RECORD_BYTES`; ValueError saying what is wrong."""
    try:
        data = read_regular_bytes(path, MAX_RECORD_BYTES)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ValueError(f"{path.name} cannot be read ({error.strerror or error})") from error
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path.name} is not valid JSON") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return value


def read_record(folder: Path) -> dict:
    """The record of a whole entry (:func:`record_problem` is None); ValueError naming the problem otherwise."""
    problem = record_problem(folder)
    if problem is not None:
        raise ValueError(f"cache entry {folder} is broken: {problem}")
    return read_json(folder / ENTRY_JSON)


def record_problem(folder: Path, required: Iterable[str] = ()) -> str | None:
    """Why the entry folder cannot be used, or None when its record is whole and every file it lists is a
    regular file of the recorded size (``required``: file names the record must list)."""
    if not folder.is_dir():
        return "it is not a folder"
    try:
        files = read_json(folder / ENTRY_JSON).get("files")
    except FileNotFoundError:
        return f"{ENTRY_JSON} is missing"
    except ValueError as error:
        return str(error)
    if not isinstance(files, dict) or not files:
        return f"{ENTRY_JSON} lists no files"
    missing = sorted(set(required) - set(files))
    if missing:
        return f"{ENTRY_JSON} does not list {', '.join(missing)}"
    for name, size in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..", ENTRY_JSON):
            return f"{ENTRY_JSON} names a file outside its folder ({name!r})"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"{ENTRY_JSON} records no size for {name}"
        try:
            found = os.lstat(folder / name)
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as error:
            return f"{name} cannot be read ({error.strerror})"
        if not stat.S_ISREG(found.st_mode):
            return f"{name} is not a regular file"
        if found.st_size != size:
            return f"{name} has {found.st_size} bytes, {ENTRY_JSON} recorded {size}"
    return None


def file_problem(path: Path) -> str | None:
    """Why a one-file entry (a TensorRT engine) cannot be used, or None if it is a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as error:
        return f"it cannot be read ({error.strerror})"
    return None if stat.S_ISREG(mode) else "it is not a regular file"


def remove_entry(path: Path) -> None:
    """Remove an entry whatever it is (folder, file, link, FIFO); a link is removed, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# --- export manifests ------------------------------------------------------------------------------------


def image_entry(path: str, size: tuple[int, int], patch: int, embed_dim: int, dtype: str, **extra: object) -> dict:
    """The manifest's description of an image artifact: ``pixels [B, 3, H, W]`` -> ``patches [B, H/p, W/p, E]``."""
    return {
        "tower": "image",
        "path": path,
        **extra,
        "input": {"name": IMAGE_INPUT, "shape": ["B", 3, *size], "dtype": dtype},
        "output": {"name": IMAGE_OUTPUT, "shape": ["B", size[0] // patch, size[1] // patch, embed_dim], "dtype": dtype},
    }


def _manifest_problem(out: Path, manifest: Mapping[str, object]) -> str | None:
    if manifest.get("format") not in FORMATS:
        return f"format must be one of {FORMATS}, got {manifest.get('format')!r}"
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, list):
        return "artifacts is not a list"
    for artifact in artifacts:
        path = artifact.get("path") if isinstance(artifact, dict) else None
        if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
            return f"artifact path {path!r} is not a path inside {out}"
        if file_problem(out / path) is not None:
            return f"artifact {path} is missing or not a regular file"
    return None


def write_manifest(out: Path, header: Mapping[str, object], artifacts: Sequence[dict]) -> dict:
    """Write ``out/manifest.json`` (``header`` + ``artifacts``, each path relative to ``out``); returns it."""
    manifest = {**header, "artifacts": list(artifacts)}
    problem = _manifest_problem(out, manifest)
    if problem is not None:
        raise ValueError(f"manifest for {out}: {problem}")
    atomic_write(out / MANIFEST_JSON, json.dumps(manifest, indent=2))
    return manifest


def read_manifest(out: str | os.PathLike) -> dict:
    """``out/manifest.json`` checked: a known format, and every artifact a regular file inside ``out``.

    Raises FileNotFoundError when there is none, ValueError naming the file and what is wrong otherwise.
    """
    out = Path(out)
    try:
        manifest = read_json(out / MANIFEST_JSON)
    except ValueError as error:
        raise ValueError(f"{out / MANIFEST_JSON}: {error}") from error
    problem = _manifest_problem(out, manifest)
    if problem is not None:
        raise ValueError(f"{out / MANIFEST_JSON}: {problem}")
    return manifest


def export_all(out: Path, header: Mapping[str, object], jobs: Sequence[tuple[str, Callable[[], dict]]],
               *, progress: bool = True) -> dict:  # fmt: skip
    """Run each ``(label, job)`` (a job builds one artifact and returns its manifest entry), say where each
    landed, then write ``out/manifest.json``: the one export loop of every format."""
    from tqdm.auto import tqdm

    check_writable(out, f"the export folder {out}")
    artifacts = []
    for label, job in tqdm(jobs, desc=f"export {header['format']}", unit="artifact", disable=not progress):
        artifacts.append(job())
        tqdm.write(f"{label}: {out / artifacts[-1]['path']}")
    return write_manifest(out, header, artifacts)


# --- writing where we can ----------------------------------------------------------------------------------


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and prove a file can be made in it; PermissionError naming ``what`` if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        refused = PermissionError(f"cannot write {what} ({error.strerror or error})")
        refused.errno = error.errno
        raise refused from error


_FALLBACKS: dict[Path, Path] = {}
_FALLBACK_LOCK = threading.Lock()


def temporary_cache(cache_dir: Path, error: OSError) -> Path:
    """The temporary stand-in for an unwritable ``cache_dir`` (one per folder and process, removed at exit);
    the first call for a folder warns once, saying why and what it costs."""
    with _FALLBACK_LOCK:
        if cache_dir not in _FALLBACKS:
            folder = Path(tempfile.mkdtemp(prefix="pacl-fast-cache-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            _FALLBACKS[cache_dir] = folder
            logger.warning(
                "the encoder cache %s cannot be written (%s): building in the temporary folder %s instead, "
                "removed at exit, so every run pays the export again; point encoder_options['cache_dir'] "
                "(--encoder-cache) or $PACL_FAST_CACHE at a writable folder to keep it",
                cache_dir,
                error.strerror or error,
                folder,
            )
        return _FALLBACKS[cache_dir]


class ArtifactStore:
    """The entries of one kind and key (``<cache_dir>/<relative>/<name>``): read where they are, built where
    they can be, each checked before use and rebuilt once when broken (see the module docstring).

    Args:
        cache_dir: the cache folder (default :func:`~pacl_fast.files.default_cache_dir`).
        relative: this store's folder inside it (``onnx/<key>``).
        kind: what the entries are, for messages (``"ONNX"``, ``"OpenVINO"``, ``"TensorRT"``).
        temporary: build in a temporary folder when ``cache_dir`` cannot be written (False: raise, for exports).
    """

    def __init__(self, cache_dir: str | os.PathLike | None, relative: str, kind: str, *, temporary: bool = True):
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.relative = relative
        self.kind = kind
        self.temporary = temporary
        self.root = self.cache_dir / relative  # where entries are looked for first
        self.build_root = self.root  # where entries are built: the temporary stand-in once root proves unwritable

    def roots(self) -> list[Path]:
        """Where entries may be, in order: the cache, then its temporary stand-in if one is in use."""
        return [self.root] if self.build_root == self.root else [self.root, self.build_root]

    def get(
        self,
        name: str,
        what: str,
        build: Callable[[Path], object],
        load: Callable[[Path], T],
        problem: Callable[[Path], str | None] = record_problem,
    ) -> T:
        """``load`` of the entry ``name``: a whole one where found, else built now by ``build(path)`` (which
        must publish ``path`` atomically). A broken entry, or one ``load`` fails on, is built again once; a
        failure to load what was just built is raised as a RuntimeError naming the entry."""
        for attempt in range(2):
            path, built = self._ready(name, what, build, problem)
            try:
                return load(path)
            except Exception as error:  # noqa: BLE001 - each runtime raises its own types
                reason = (str(error).splitlines() or [type(error).__name__])[0]
                if built or attempt:
                    raise RuntimeError(f"{self.kind} cannot load {what} it built in {path}: {reason}") from error
                self._discard(path, f"it failed to load: {reason}")
        raise AssertionError("unreachable")

    def _ready(self, name: str, what: str, build: Callable[[Path], object],
               problem: Callable[[Path], str | None]) -> tuple[Path, bool]:  # fmt: skip
        """A whole entry's path and False, or the path of one built now and True."""
        for root in self.roots():
            path = root / name
            if not os.path.lexists(path):
                continue
            reason = problem(path)
            if reason is None:
                return path, False
            self._discard(path, reason)
        path = self._writable_path(name)
        logger.info("%s: building %s, once (cached in %s)", self.kind, what, path.parent)
        build(path)
        return path, True

    def _discard(self, path: Path, reason: str) -> None:
        logger.warning("%s cache entry %s is broken (%s); building it again", self.kind, path, reason)
        try:
            remove_entry(path)
        except OSError as error:  # a read-only cache: the entry is rebuilt in the temporary folder
            self._use_temporary(error)

    def _writable_path(self, name: str) -> Path:
        """Where to build ``name``: under ``build_root``, with anything that is not a folder on the way removed."""
        path = self.build_root / name
        try:
            self._clear_parents(path)
            check_writable(path.parent, f"the {self.kind} cache {path.parent}")
        except OSError as error:
            if self.build_root != self.root:
                raise
            self._use_temporary(error)
            return self._writable_path(name)
        return path

    def _clear_parents(self, path: Path) -> None:
        """Remove files (or links to non-folders) where the folders between the cache and ``path`` belong."""
        base = self.build_root.parents[len(Path(self.relative).parts) - 1]  # the cache folder (or stand-in)
        for parent in reversed(path.relative_to(base).parents):
            folder = base / parent
            if folder != base and os.path.lexists(folder) and not folder.is_dir():
                logger.warning("%s cache: %s should be a folder; removing it", self.kind, folder)
                remove_entry(folder)

    def _use_temporary(self, error: OSError) -> None:
        if not self.temporary:
            raise error
        self.build_root = temporary_cache(self.cache_dir, error) / self.relative
