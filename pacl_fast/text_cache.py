"""The persistent text-embedding cache: class-name embeddings kept on disk across processes.

Embedding ADE20K's 150 class names with CLIP's 80 templates is 12,000 prompts through the text
tower; every ``eval``, ``segment`` and torchrun rank asked for them again. This cache keeps one
small safetensors file per (model, template set, label)::

    <root>/<model>/<templates>/<label>.safetensors      (root: $PACL_FAST_CACHE/text or ~/.cache/pacl-fast/text)

Every path segment is a hex digest (of the model key, the templates, the label), so no name that
comes from a user reaches the file system, and each file repeats the strings it was made for in
its metadata, which a read checks.

* Writes are atomic (:func:`pacl_fast.files.atomic_write`): processes computing the same entry
  each publish a whole file (the last one wins; both hold the same numbers), and a reader never
  sees half of one. No locks: torchrun ranks that start cold each compute, then all share.
* Reads trust nothing: an entry that is not a regular file (a FIFO would block the reader forever),
  truncated, not safetensors, of the wrong shape or dtype, not finite, not unit length, or made for
  another key is named in a warning and computed again (then rewritten; a folder in its place is left).
* Size cap (default 1 GiB, about 400,000 ViT-B entries) with least-recently-used eviction by
  modification time, which a read refreshes. Knowing the size takes a walk of the tree (a stat per
  entry: ~2 s for 50,000 entries on this machine), which a process that computed one label used to
  pay before returning it. The walk's total is kept in ``<root>/size.json`` with what processes
  stored since (a hint: concurrent writers may lose each other's additions), and a process walks only
  when that passes the cap or the last walk is a day old.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path

import torch

from pacl_fast.encoders.base import dtype_name
from pacl_fast.files import atomic_write, default_cache_dir, open_regular, read_regular_bytes

logger = logging.getLogger(__name__)

TEXT_CACHE_FORMAT = "1"  # bump when an entry's content changes for the same key
DEFAULT_MAX_BYTES = 1 << 30
MAX_ENTRY_BYTES = 1 << 20  # a [E] float32 vector and its metadata: kilobytes; anything bigger is not ours
STALE_TEMPORARY_SECONDS = 3600  # temporary files of writers killed mid-write are removed after this
SIZE_HINT = "size.json"  # at the root: {"bytes": total at the last walk + stores since, "walked": its time}
MAX_HINT_BYTES = 256
WALK_EVERY_SECONDS = 24 * 3600  # a hint older than this is not trusted: the tree is walked again
UNIT_TOLERANCE = 1e-3
TENSOR_NAME = "embedding"


def default_text_cache_dir() -> Path:
    """``$PACL_FAST_CACHE/text`` or ``~/.cache/pacl-fast/text`` (next to the exported encoders)."""
    return default_cache_dir() / "text"


def digest(text: str) -> str:
    """sha256 hex of a string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def templates_key(templates: tuple[str, ...]) -> str:
    """Identifies a template set (order matters: it is the set the ensemble was made with)."""
    return digest(json.dumps(list(templates)))


def text_model_key(
    backbone,  # noqa: ANN001 - pacl_fast.backbone.ClipBackbone
    *,
    backend: str,
    dtype: torch.dtype,
    hash_weights: bool | None = None,
) -> str:
    """What defines a CLIP's text embeddings, as one string: the text tower's weights and the
    precision they are held in, its config, the tokenizer, the backend that runs it and its precision.

    The weights are named by the backbone's identity when it has one (a pretrained tag, or the
    sha256 of the checkpoint file, computed once when the file is opened); randomly initialised
    weights have none, so their tensors are hashed (``text_weights_digest``: ~0.3-0.7 s for
    ViT-B-16 on 2 CPU cores, kept until a tensor changes). ``hash_weights=True`` hashes them
    anyway, for weights edited in memory after loading.
    """
    weights = backbone.identity.weights
    if hash_weights or (hash_weights is None and weights == "random"):
        weights = f"tensors-sha256:{backbone.text_weights_digest()}"
    config = {key: value for key, value in backbone.model_cfg.items() if key != "vision_cfg"}
    description = {
        "format": TEXT_CACHE_FORMAT,
        "arch": backbone.identity.arch,
        "weights": weights,
        "config": config,
        "tokenizer": [type(backbone.tokenizer).__name__, backbone.context_length],
        "backend": backend,
        "dtype": dtype_name(dtype),
        # weights rounded to bf16 and run in fp32 embed otherwise than the loaded fp32 weights
        "weights_dtype": dtype_name(backbone.text_dtype),
    }
    return json.dumps(description, sort_keys=True, default=str)


class TextCache:
    """The on-disk text-embedding cache (see the module docstring).

    Args:
        root: folder of the cache (default :func:`default_text_cache_dir`).
        max_bytes: size cap; the least recently used entries go first when it is exceeded.
    """

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root) if root is not None else default_text_cache_dir()
        self.max_bytes = max_bytes
        self.writable = True
        # Bytes the cache held at the last walk plus what was stored since (this process's stores, and
        # others' as far as the size hint records them): evict() walks the tree (a stat per entry) only
        # when there is no fresh hint and when this passes max_bytes. The cap holds up to what other
        # processes added unrecorded since the last walk.
        self._known_bytes: int | None = None
        self._walked = 0.0  # when the walk the known bytes count from was made
        self._unrecorded = 0  # bytes this process stored that the size hint does not count yet

    def path(self, model_key: str, templates: str, label: str) -> Path:
        """Where the entry for (model, templates digest, label) lives."""
        return self.root / digest(model_key)[:32] / templates[:32] / f"{digest(label)[:40]}.safetensors"

    def load(self, model_key: str, templates: str, label: str, embed_dim: int | None = None) -> dict | None:
        """The entry as ``{"embedding": [E] float32, "cut": bool}``, or None when it is missing or
        broken (a broken one is named in a warning)."""
        path = self.path(model_key, templates, label)
        try:
            with open_regular(path) as f:  # a FIFO or device where an entry should be must not block the reader
                data = f.read(MAX_ENTRY_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as error:  # NotARegularFileError included: a broken entry, replaced by the next store
            logger.warning("text cache entry %s cannot be read (%s); computing it again", path, error)
            return None
        expected = {"format": TEXT_CACHE_FORMAT, "model": model_key, "templates": templates, "label": label}
        entry, problem = _parse_entry(data, expected, embed_dim)
        if problem is not None:
            logger.warning("text cache entry %s is broken (%s); computing it again", path, problem)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used = oldest modification time
        return entry

    def store(self, model_key: str, templates: str, label: str, embedding: torch.Tensor, cut: bool = False) -> None:
        """Write one entry atomically. A cache that cannot be written is reported once, then skipped."""
        if not self.writable:
            return
        from safetensors.torch import save

        metadata = {
            "format": TEXT_CACHE_FORMAT,
            "model": model_key,
            "templates": templates,
            "label": label,
            "cut": "1" if cut else "0",
        }
        data = save({TENSOR_NAME: embedding.detach().float().cpu().contiguous()}, metadata=metadata)
        path = self.path(model_key, templates, label)
        try:
            atomic_write(path, data)
        except OSError as error:
            if path.is_dir():  # this entry's name is taken by a folder (a FIFO or file is replaced): skip it alone
                logger.warning("text cache entry %s is a folder, left alone (%s); label not cached", path, error)
                return
            self.writable = False
            logger.warning("cannot write the text cache in %s (%s); continuing without it", self.root, error)
            return
        self._unrecorded += len(data)
        if self._known_bytes is not None:
            self._known_bytes += len(data)

    def size(self) -> int:
        """Bytes the cache's entries take."""
        return sum(size for _, _, size in self._entries())

    def evict(self) -> int:
        """Remove least recently used entries until the cache fits ``max_bytes``, and temporary files
        that writers left when they were killed; returns how many entries were removed. Walks the
        cache only when the bytes known to be in it (the size hint's, else a walk's) pass ``max_bytes``
        or the last walk is :data:`WALK_EVERY_SECONDS` old."""
        if self._known_bytes is None:
            hint = self._read_hint()
            if hint is not None:
                self._known_bytes, self._walked = hint[0] + self._unrecorded, hint[1]
        if self._known_bytes is not None and self._known_bytes <= self.max_bytes:
            if self._unrecorded:
                self._write_hint()
            return 0
        walked = time.time()
        entries = sorted(self._entries(), key=lambda entry: entry[1])  # oldest first
        total = sum(size for _, _, size in entries)
        removed = 0
        for path, _, size in entries:
            if total <= self.max_bytes:
                break
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:  # another process evicted it first
                pass
            except OSError as error:
                logger.warning("cannot remove text cache entry %s (%s)", path, error)
                continue
            total -= size
        self._known_bytes, self._walked = total, walked
        self._write_hint()
        if removed:
            logger.info("text cache over %d bytes: removed %d least recently used entries", self.max_bytes, removed)
        return removed

    def _read_hint(self) -> tuple[int, float] | None:
        """``(bytes, walk time)`` from the size hint, or None when it is missing, broken or a day old."""
        try:
            hint = json.loads(read_regular_bytes(self.root / SIZE_HINT, MAX_HINT_BYTES))
            size, walked = hint["bytes"], hint["walked"]
        except (OSError, ValueError, TypeError, KeyError) as error:  # missing, not a file, not ours: walk
            if not isinstance(error, FileNotFoundError):
                logger.debug("text cache size hint in %s unusable (%s); walking the cache", self.root, error)
            return None
        now = time.time()
        if (
            type(size) is not int
            or size < 0
            or type(walked) not in (int, float)
            or not now - WALK_EVERY_SECONDS < walked <= now
        ):
            return None
        return size, float(walked)

    def _write_hint(self) -> None:
        """Record the known bytes for the next process (best effort: a cache that cannot be written has none)."""
        try:
            atomic_write(self.root / SIZE_HINT, json.dumps({"bytes": self._known_bytes, "walked": self._walked}))
        except OSError as error:
            logger.debug("cannot write the text cache size hint in %s (%s)", self.root, error)
            return
        self._unrecorded = 0

    def _entries(self) -> list[tuple[Path, float, int]]:
        """``(path, mtime, size)`` of every entry; stale temporary files are removed on the way."""
        found = []
        now = time.time()
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except OSError:  # removed meanwhile
                    continue
                if name.endswith(".safetensors") and not name.startswith("."):
                    found.append((path, stat.st_mtime, stat.st_size))
                elif name.endswith(".tmp") and now - stat.st_mtime > STALE_TEMPORARY_SECONDS:
                    path.unlink(missing_ok=True)
        return found


def _parse_entry(data: bytes, expected: dict[str, str], embed_dim: int | None) -> tuple[dict | None, str | None]:
    """An entry's content from its bytes, or the reason it cannot be trusted."""
    from safetensors.torch import load

    if len(data) > MAX_ENTRY_BYTES:
        return None, f"over {MAX_ENTRY_BYTES} bytes"
    if len(data) < 8:
        return None, f"{len(data)} bytes, too short for safetensors"
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        return None, "truncated header"
    try:
        header = json.loads(data[8 : 8 + header_size])
        tensors = load(data)
    except Exception as error:  # noqa: BLE001 - json and safetensors raise their own types on garbage
        return None, f"not a safetensors file ({type(error).__name__})"
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        return None, "no metadata"
    for name, value in expected.items():
        if metadata.get(name) != value:
            return None, f"made for another {name}"
    if set(tensors) != {TENSOR_NAME}:
        return None, f"holds {sorted(tensors)}, expected [{TENSOR_NAME!r}]"
    embedding = tensors[TENSOR_NAME]
    if embedding.dtype != torch.float32 or embedding.ndim != 1 or embedding.numel() == 0:
        return None, f"a {embedding.dtype} tensor of shape {tuple(embedding.shape)}, expected [E] float32"
    if embed_dim is not None and embedding.shape[0] != embed_dim:
        return None, f"{embedding.shape[0]} values, expected {embed_dim}"
    if not torch.isfinite(embedding).all():
        return None, "not finite"
    norm = float(embedding.norm())
    if abs(norm - 1.0) > UNIT_TOLERANCE:
        return None, f"norm {norm:.4f}, expected a unit vector"
    return {"embedding": embedding, "cut": metadata.get("cut") == "1"}, None
