"""Writing files safely: atomically, and only inside the folder they belong to.

Every file pacl-fast writes that a later run reads back (weights, checkpoints, caches, run state,
label maps) goes through :func:`atomic_write`: a temporary file in the same folder, then
``os.replace``, so a killed process leaves the old file or the new one, never half of one; folders
of several files (exported graphs, compiled models) through :func:`atomic_folder`.
Names that come from data (shard keys, file names) go through :func:`output_path`, which refuses
anything that would land outside the output folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

#: Longest output key (characters) and path segment (bytes) accepted; most file systems stop at 255 bytes.
MAX_KEY_LENGTH = 200
MAX_SEGMENT_BYTES = 200


def default_cache_dir() -> Path:
    """Where pacl-fast keeps what it can rebuild (exported graphs, engines, text embeddings):
    ``$PACL_FAST_CACHE``, else ``~/.cache/pacl-fast``."""
    return Path(os.environ.get("PACL_FAST_CACHE") or Path.home() / ".cache" / "pacl-fast")


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, is_whole: Callable[[Path], bool]) -> Iterator[Path]:
    """``with atomic_folder(folder, is_whole) as tmp:`` write the files into ``tmp`` (a sibling of ``folder``);
    on leaving, ``tmp`` becomes ``folder`` in one rename. If another process published ``folder`` first,
    theirs is kept when ``is_whole(folder)``, else the rename's error is raised. The temporary folder
    never outlives the block."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_whole(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class NotARegularFileError(OSError):
    """A path that should be a regular file is something else (a FIFO, a device, a folder, a socket)."""


@contextlib.contextmanager
def open_regular(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """``open(path, "rb")`` that never blocks on what is not a regular file.

    A FIFO opened for reading blocks until a writer appears (forever, for a cache entry or a
    checkpoint someone replaced with one); a device may never end. The path is opened with
    ``O_NONBLOCK`` (which makes opening a FIFO return at once) and checked with ``fstat`` on the
    descriptor itself, so a swap between the check and the read cannot slip through.
    Raises :class:`NotARegularFileError` (an ``OSError``) naming the path and what it is.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    descriptor = os.open(path, flags)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise NotARegularFileError(f"{path}: expected a regular file, found {kind}")
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(descriptor, True)
        f = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with f:
        yield f


def read_regular_bytes(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`); ``ValueError`` past ``max_bytes``."""
    with open_regular(path) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{path}: over {max_bytes} bytes")
    return data


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, text, or a function writing to a binary file) to ``path`` atomically.

    The folder is created if needed. The temporary file has a unique name, so processes writing
    the same path concurrently each publish a whole file (the last one wins).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode("utf-8"))
            elif isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def safe_key(key: str) -> str:
    """``key`` if it is a safe relative output name (``a/b/c``), else ValueError saying why.

    Refused: empty keys or segments, absolute paths, ``.`` and ``..`` segments, backslashes,
    NUL and other control characters, keys over :data:`MAX_KEY_LENGTH` characters and segments
    over :data:`MAX_SEGMENT_BYTES` bytes (the file system's name limit, with room for suffixes).
    """
    if not isinstance(key, str) or not key:
        raise ValueError("empty output name")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"output name is {len(key)} characters long, over the limit of {MAX_KEY_LENGTH}")
    if any(ord(c) < 32 or c == "\x7f" for c in key):
        raise ValueError(f"output name {key!r} has control characters")
    if "\\" in key:
        raise ValueError(f"output name {key!r} has a backslash")
    if key.startswith("/"):
        raise ValueError(f"output name {key!r} is an absolute path")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"output name {key!r} has an empty, '.' or '..' segment")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise ValueError(f"output name {key!r} has a segment over {MAX_SEGMENT_BYTES} bytes")
    return key


def output_path(directory: str | os.PathLike, key: str, suffix: str = "") -> Path:
    """``directory/<key><suffix>``, proven to resolve inside ``directory`` (links included), else ValueError."""
    root = Path(directory).resolve()
    path = root / f"{safe_key(key)}{suffix}"
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"output name {key!r} resolves outside {root} (through a link)")
    return path
