"""Writing files safely: atomically, and only inside the folder they belong to.

Every file pacl-fast writes that a later run reads back (weights, checkpoints, caches, run state,
label maps) goes through :func:`atomic_write`: a temporary file in the same folder, then
``os.replace``, so a killed process leaves the old file or the new one, never half of one; folders
of several files (exported graphs, compiled models) through :func:`atomic_folder`.
Names that come from data (shard keys, file names) become output names through :func:`output_key`
(any name, UTF-8 or not, gives a name every file system and JSON can hold) and paths through
:func:`output_path`, which refuses anything that would land outside the output folder.

Files are created with mode ``0o666`` and folders ``0o777`` less the umask, as ``open()`` and ``mkdir``
make them (``0o644`` / ``0o755`` under umask 022), not ``tempfile``'s private ``0o600`` / ``0o700``.
A killed writer leaves its temporary file behind; :func:`remove_stale_temporaries` removes those
of dead writers (and only those) when a run comes back to its output folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

#: Longest output key (characters) and path segment (bytes) accepted; most file systems stop at 255 bytes.
MAX_KEY_LENGTH = 200
MAX_SEGMENT_BYTES = 200
#: A temporary file of another machine (or pid namespace) is removed only once it has not changed for this long.
STALE_TEMPORARY_SECONDS = 3600
#: Longest part of the target's name (bytes) kept in a temporary file's name, so the name stays under 255 bytes.
_TEMPORARY_NAME_BYTES = 100
#: ``.<name>.pacl-<writer>-<pid>-<random>.tmp``: what :func:`atomic_write` creates.
_TEMPORARY = re.compile(r"\.(?:.+)\.pacl-(?P<writer>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[0-9a-f]{8}\.tmp", re.S)
#: ``.<name>.XXXXXXXX.tmp``: what atomic_write created before (``tempfile.mkstemp``); removed by age only.
_LEGACY_TEMPORARY = re.compile(r"\.(?:.+)\.[a-z0-9_]{8}\.tmp", re.S)
#: Highest process id Linux hands out (``pid_max`` cannot exceed it); anything above is not a pid.
_PID_LIMIT = 1 << 22


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
    tmp = _create_unique(folder, lambda path: os.mkdir(path, 0o777))  # the umask applies, as to any mkdir
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


class FileTooLargeError(ValueError):
    """A file over the size its reader accepts; ``size``: what it holds (as far as known)."""

    def __init__(self, path: str | os.PathLike, size: int, max_bytes: int):
        super().__init__(f"{path}: over {max_bytes} bytes ({size} bytes)")
        self.size = size


def read_regular_bytes(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`), from one descriptor.
    :class:`FileTooLargeError` past ``max_bytes``: refused by its size before anything is read, and
    also if it grew past the cap while being read."""
    with open_regular(path) as f:
        if max_bytes is None:
            return f.read()
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FileTooLargeError(path, size, max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLargeError(path, len(data), max_bytes)
    return data


@functools.lru_cache(maxsize=1)
def _writer_id() -> str:
    """8 hex digits naming this machine and pid namespace: whose process ids a temporary file's pid is.

    Two containers may share a host name but not their process ids, so the pid namespace is part of
    it; the boot id tells a pid of this boot from the same number before a reboot."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    return hashlib.blake2b("|".join(parts).encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()


def _temporary_name(target: Path) -> str:
    """``.<name>.pacl-<writer>-<pid>-<random>.tmp`` beside ``target`` (the name cut to fit 255 bytes)."""
    name = os.fsdecode(os.fsencode(target.name)[:_TEMPORARY_NAME_BYTES])
    return f".{name}.pacl-{_writer_id()}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _create_unique(target: Path, create: Callable[[Path], object]) -> Path:
    """``create(path)`` on a fresh temporary name beside ``target`` (it must fail if the path exists)."""
    for _ in range(100):
        path = target.parent / _temporary_name(target)
        try:
            create(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, text, or a function writing to a binary file) to ``path`` atomically.

    The folder is created if needed. The temporary file has a unique name holding this process's
    id (see :func:`remove_stale_temporaries`), so processes writing the same path concurrently each
    publish a whole file (the last one wins). The file's mode honours the umask, as ``open()``'s does.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    descriptors: list[int] = []
    temporary = _create_unique(path, lambda name: descriptors.append(os.open(name, flags, 0o666)))
    try:
        with os.fdopen(descriptors[0], "wb") as f:
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


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this pid namespace exists (a zombie counts; when unsure, yes)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: checks only
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, *, recursive: bool = False) -> int:
    """Remove the temporary files that killed :func:`atomic_write` calls left in ``folder``; return how many.

    Only names of atomic_write's own pattern are touched, and only when their writer is surely gone:

    * written on this machine and pid namespace (the name holds its :func:`_writer_id`): removed when
      its process id no longer exists. A live writer, this process included, is never disturbed,
      however long it takes; two ``torchrun`` ranks writing into one folder each keep their files.
      A pid reused by an unrelated process only delays the removal to the age bound below.
    * written elsewhere (another node of a multi-node job on a shared file system, another container),
      and the nameless ones of earlier versions: its pid means nothing here, so it is removed only
      after :data:`STALE_TEMPORARY_SECONDS` without a change (a writer in progress keeps changing it).

    ``recursive``: the folders below too (symbolic links are not followed). Errors are logged, never raised.
    """
    root = Path(folder)
    if not root.is_dir():
        return 0
    folders = (Path(top) for top, _, _ in os.walk(root)) if recursive else iter([root])
    removed, now, writer = 0, time.time(), _writer_id()
    for current in folders:
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            match = _TEMPORARY.fullmatch(entry.name)
            if match is None and _LEGACY_TEMPORARY.fullmatch(entry.name) is None:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode):
                    continue
                pid = int(match["pid"]) if match is not None else 0
                if match is not None and match["writer"] == writer and 0 < pid < _PID_LIMIT:
                    stale = not _process_alive(pid)
                else:
                    stale = now - info.st_mtime > STALE_TEMPORARY_SECONDS
                if stale:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # its writer published or removed it meanwhile
                continue
            except OSError as error:
                logger.warning("cannot remove the stale temporary file %s (%s)", entry.path, error)
    return removed


def output_key(name: str) -> str:
    """The output name for an input's ``name`` (a file's relative path or a shard key), checked by :func:`safe_key`.

    A name that is not UTF-8 (Linux allows any bytes; Python reads them as surrogate escapes) cannot
    be written to JSON, a terminal or most other file systems: each byte that is not UTF-8 is written
    ``%XX``. Two names may then give one output name (``caf\\xe9`` and a real ``caf%E9``); callers
    detect such duplicates on output names, as they do for any two inputs with one name.
    """
    if isinstance(name, str) and any("\ud800" <= c <= "\udfff" for c in name):
        raw = name.encode("utf-8", "surrogateescape") if _escapes_only(name) else name.encode("utf-8", "surrogatepass")
        name = "".join(
            f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c
            for c in raw.decode("utf-8", "surrogateescape")
        )
    return safe_key(name)


def _escapes_only(text: str) -> bool:
    """Whether every surrogate in ``text`` is a surrogate escape (U+DC80..U+DCFF, one undecodable byte)."""
    return all(not "\ud800" <= c <= "\udfff" or "\udc80" <= c <= "\udcff" for c in text)


def safe_key(key: str) -> str:
    """``key`` if it is a safe relative output name (``a/b/c``), else ValueError saying why.

    Refused: empty keys or segments, absolute paths, ``.`` and ``..`` segments (inner ones too:
    ``sub/../x`` would make ``sub`` and escape duplicate detection), backslashes, NUL and other
    control characters, text that is not UTF-8 (:func:`output_key` makes such names safe), keys
    over :data:`MAX_KEY_LENGTH` characters and segments over :data:`MAX_SEGMENT_BYTES` bytes (the
    file system's name limit, with room for suffixes).
    """
    if not isinstance(key, str) or not key:
        raise ValueError("empty output name")
    if any("\ud800" <= c <= "\udfff" for c in key):
        raise ValueError(f"output name {key!r} is not UTF-8 text (make names with output_key)")
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


# --- the persistent digest cache: a large file's sha256 remembered across processes, as git's index does ---------

#: Folder (under :func:`default_cache_dir`) of the digest cache's entries, one small JSON file per hashed file.
DIGEST_FOLDER = "digests"
#: An entry is trusted only for a file whose mtime and ctime are this much older than the moment its hashing began
#: (git's "racy" rule: a change in the same timestamp tick as the hashing leaves the times as they were).
RACY_NANOSECONDS = 2_000_000_000
#: Largest entry read (real ones are ~300 bytes).
MAX_DIGEST_ENTRY_BYTES = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")
_STAT_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


def _digest_entry_path(real: str) -> Path:
    return default_cache_dir() / DIGEST_FOLDER / f"{hashlib.sha256(os.fsencode(real)).hexdigest()[:32]}.json"


def _private_descriptor(info: os.stat_result, kind: str) -> bool:
    """Whether ``info`` is a regular file (``kind`` "file") or folder of this user, writable by no one else."""
    is_kind = stat.S_ISREG(info.st_mode) if kind == "file" else stat.S_ISDIR(info.st_mode)
    owner = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return is_kind and owner and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def known_sha256(path: str | os.PathLike, info: os.stat_result) -> str | None:
    """The sha256 (hex) of the file ``path`` whose descriptor's ``fstat`` is ``info``, as the digest cache holds it;
    None unless an entry for exactly that file (real path, device, inode, size, mtime and ctime in nanoseconds)
    exists, is this user's and writable by no one else, and was hashed more than :data:`RACY_NANOSECONDS` after the
    file last changed. Anything else (no entry, a malformed or foreign one, a changed file) is a miss, never an
    error: the caller hashes the file again and :func:`remember_sha256` rewrites the entry."""
    real = os.path.realpath(path)
    entry = _digest_entry_path(real)
    try:
        if not _private_descriptor(os.stat(entry.parent, follow_symlinks=False), "folder"):
            return None
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        descriptor = os.open(entry, flags)
        with os.fdopen(descriptor, "rb") as f:
            if not _private_descriptor(os.fstat(f.fileno()), "file"):
                return None
            data = f.read(MAX_DIGEST_ENTRY_BYTES + 1)
        record = json.loads(data) if len(data) <= MAX_DIGEST_ENTRY_BYTES else None
        if not isinstance(record, dict) or record.get("path") != real:
            return None
        digest, hashed_from = record.get("sha256"), record.get("hashed_from_ns")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest) or type(hashed_from) is not int:
            return None
        if any(type(record.get(field)) is not int or record[field] != getattr(info, field) for field in _STAT_FIELDS):
            return None
        if max(info.st_mtime_ns, info.st_ctime_ns) + RACY_NANOSECONDS > hashed_from:
            return None  # changed too close to its hashing for the times to tell a change apart
    except (OSError, ValueError, UnicodeDecodeError):  # missing, unreadable, a link, not JSON
        return None
    return digest


def remember_sha256(path: str | os.PathLike, info: os.stat_result, digest: str, hashed_from_ns: int) -> None:
    """Record in the digest cache that the file ``path`` (``fstat`` ``info``, taken before hashing began at
    ``time.time_ns()`` ``hashed_from_ns``) has sha256 ``digest``. Best effort: a cache folder that cannot be made
    private or written is logged at debug level and skipped."""
    real = os.path.realpath(path)
    entry = _digest_entry_path(real)
    record = {"path": real, **{field: getattr(info, field) for field in _STAT_FIELDS}}
    record.update(sha256=digest, hashed_from_ns=hashed_from_ns)
    try:
        entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private_descriptor(os.stat(entry.parent, follow_symlinks=False), "folder"):
            logger.debug("digest cache %s is not this user's private folder: not written", entry.parent)
            return
        atomic_write(entry, json.dumps(record))
        os.chmod(entry, 0o600)  # its own mode; atomic_write's follows the umask
    except OSError as error:
        logger.debug("digest cache entry %s not written (%s)", entry, error)
