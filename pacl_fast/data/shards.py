"""The one WebDataset shard reader: samples of a tar shard, with every member's size bounded.

Members are grouped into samples by the ``webdataset`` library's own rule (``group_by_keys``:
consecutive members sharing the part of the name before the first dot of the base name), so
keys are exactly those of webdataset, img2dataset and open_clip's training loaders. What this
module adds is the reading: the library reads each member whole, whatever its size (a 2.7 MB
``.tar.gz`` of zeros can hold gigabytes); here a member larger than ``max_member_bytes`` is not
read at all, and its sample carries a :class:`MemberTooLarge` marker in that field, so the caller
fails that one sample and the rest of the shard goes on; and a shard that stops anywhere but at
tar's end-of-archive marker (cut between members or inside a header, a garbage header: tarfile
itself ends quietly on these) raises after the samples before the damage.

Member names are read as ``tar`` writes them from a folder: ``tar -cf s.tar -C folder .`` stores
``./0001.jpg``, whose key is ``0001`` as in the folder (a leading ``./`` is not a traversal; ``../``,
absolute names and inner ``..`` are left for the caller to refuse). Nothing in a shard vanishes
without a word: a hard or symbolic link is read as the regular member it points at when that member
is in the archive (bounded as members are); otherwise, and for FIFOs and devices, its sample carries
a :class:`MemberUnusable` marker saying why. Only folders are passed over.

Used by bulk segmentation (``pacl_fast.bulk``) and by training (``pacl_fast.data.pairs``).
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

#: Default cap of one tar member: far above any photo, far below what would hurt a worker.
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: Links followed one after the other before giving up (a loop, or a chain no shard needs).
MAX_LINK_HOPS = 16
#: Links of one shard read at most this many times the shard's (uncompressed) size, plus one member:
#: a 512-byte link header can name a 64 MiB member, so without a bound a small shard could make the
#: reader read without end. Repeated links to one member read it once.
LINK_READ_FACTOR = 4


class MemberNotRead:
    """Stands in a sample, in the field of a member that was not read; ``str()`` says why. The caller
    fails that sample alone."""


@dataclass(frozen=True)
class MemberTooLarge(MemberNotRead):
    """Stands in a sample for a member that was not read because it is over the size cap."""

    name: str
    size: int
    limit: int

    def __str__(self) -> str:
        return f"tar member {self.name} is {self.size} bytes, over the limit of {self.limit} (--max-member-bytes)"


@dataclass(frozen=True)
class MemberUnusable(MemberNotRead):
    """Stands in a sample for a member that holds no file: a link that leads nowhere usable, a FIFO, a device."""

    name: str
    why: str

    def __str__(self) -> str:
        return f"tar member {self.name} {self.why}"


class ShardError(Exception):
    """The shard itself cannot be read (not a tar, truncated, unreadable); the samples before it stand."""


def is_shard(path: str | os.PathLike) -> bool:
    return any(str(path).endswith(suffix) for suffix in SHARD_SUFFIXES)


def member_name(name: str) -> str:
    """A member's name without the leading ``./`` that ``tar -C folder .`` gives every member."""
    while name.startswith("./"):
        name = name[2:]
    return name


def _members(fileobj: IO[bytes], url: str, max_member_bytes: int, path: Path | None) -> Iterator[dict]:
    """``{"fname", "data", "__url__"}`` per member that is not a folder, as webdataset's expander yields them,
    then ``{}``. ``path``: the shard's file, for following links (None: a stream, links are not followed)."""
    try:
        yield from _read_members(fileobj, url, max_member_bytes, path)
    except (OSError, EOFError, tarfile.TarError):
        yield {}  # end the sample being grouped, so the last whole one before the damage is kept
        raise
    yield {}  # webdataset's end-of-shard marker: never group across shards


class _HeaderBlocks(tarfile.TarInfo):
    """TarInfo that remembers the last header block tarfile read (``last``, on a per-archive subclass).

    Why: tarfile ends its member loop without an error on an empty read (a shard cut exactly at a
    member boundary), a partial header block (cut inside a header) and a header that is not a tar
    header (damage in the middle), as it does on the all-zero block that ends a whole archive; so a
    damaged shard would silently lose its tail. The last block read tells them apart."""

    last: bytes = b""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        cls.last = bytes(buf)
        return super().frombuf(buf, encoding, errors)


def _end_problem(last: bytes, after: str | None) -> str | None:
    """Why the member loop stopped, if not at tar's end-of-archive marker (an all-zero block)."""
    where = f"after member {after}" if after else "before its first member"
    if not last:
        return f"the shard ends {where} without tar's end-of-archive marker: it was cut short"
    if len(last) < tarfile.BLOCKSIZE:
        return f"the shard breaks off inside the header {where}"
    if last.count(0) != tarfile.BLOCKSIZE:
        return f"unreadable tar header {where}: the rest of the shard is lost"
    return None


def _kind(member: tarfile.TarInfo) -> str:
    if member.isfifo():
        return "a FIFO"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isdir():
        return "a folder"
    return f"of tar type {member.type!r}, not a file"


class _Links:
    """Reads the regular member a hard or symbolic link names, through a second handle on the shard file.

    Why a second handle: the main pass streams the shard (a ``.tar.gz`` cannot seek), and a symbolic
    link may name a member further on. The first link met makes an index of every member's name, kind
    and place (one pass over the headers; a compressed shard is decompressed once more, and only shards
    with links pay it). Names are resolved inside the archive only, as ``tar`` names them: a link that
    leaves it (absolute, or ``..`` above its top) is never followed, nothing on disk is read but the shard.
    """

    def __init__(self, path: Path | None, max_member_bytes: int):
        self.path = path
        self.max_member_bytes = max_member_bytes
        self.archive: tarfile.TarFile | None = None
        self.entries: dict[str, tuple] = {}  # name -> ("reg", offset, size) | ("link", kind, target) | ("other", kind)
        self.problem: str | None = None
        self.budget = 0
        self.last: tuple[int, bytes] | None = None  # (offset, data) of the member read last

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()

    def _index(self) -> None:
        try:
            self.archive = tarfile.open(self.path, "r:*")  # noqa: SIM115 - closed by close()
            while (member := self.archive.next()) is not None:
                name = member_name(member.name).rstrip("/")
                if member.isreg():
                    self.entries[name] = ("reg", member.offset_data, member.size)
                elif member.islnk() or member.issym():
                    kind = "hard link" if member.islnk() else "symbolic link"
                    self.entries[name] = ("link", kind, _link_target(name, member))
                else:
                    self.entries[name] = ("other", _kind(member))
                self.archive.members = []  # keep only the index
            self.budget = LINK_READ_FACTOR * self.archive.offset + self.max_member_bytes
        except (OSError, EOFError, tarfile.TarError) as error:
            self.problem = f"the shard cannot be read again to follow it ({type(error).__name__}: {error})"

    def read(self, name: str, member: tarfile.TarInfo) -> bytes | MemberNotRead:
        """The bytes of the regular member that link ``member`` (named ``name``) leads to, or why not."""
        kind = "hard link" if member.islnk() else "symbolic link"
        described = f"is a {kind} to {member.linkname}"
        if self.path is None:
            return MemberUnusable(name, f"{described}: links are followed only in shard files, not streams")
        if self.archive is None and self.problem is None:
            self._index()
        if self.problem is not None:
            return MemberUnusable(name, f"{described}: {self.problem}")
        target = _link_target(name, member)
        for _ in range(MAX_LINK_HOPS):
            if target is None:
                return MemberUnusable(name, f"{described}, outside the archive")
            entry = self.entries.get(target)
            if entry is None:
                return MemberUnusable(name, f"{described}, which is not in the archive")
            if entry[0] == "other":
                return MemberUnusable(name, f"{described}, which is {entry[1]}")
            if entry[0] == "reg":
                return self._data(name, target, offset=entry[1], size=entry[2])
            target = entry[2]
        return MemberUnusable(name, f"{described}: more than {MAX_LINK_HOPS} links in a row (a loop?)")

    def _data(self, name: str, target: str, offset: int, size: int) -> bytes | MemberNotRead:
        if size > self.max_member_bytes:
            return MemberTooLarge(f"{name} (a link to {target})", size, self.max_member_bytes)
        if self.last is not None and self.last[0] == offset:
            return self.last[1]
        fileobj = self.archive.fileobj
        compressed = not isinstance(fileobj, io.BufferedReader)  # a .tar.gz seeks back by decompressing again
        position = fileobj.tell()
        cost = size + ((offset - position if offset >= position else offset) if compressed else 0)
        if cost > self.budget:
            return MemberUnusable(
                name,
                f"is a link to {target}: the shard's links have read {LINK_READ_FACTOR} times the shard already "
                "(make it with tar --hard-dereference / -h to store copies)",
            )
        self.budget -= cost
        fileobj.seek(offset)
        data = fileobj.read(size)
        if len(data) != size:
            return MemberUnusable(name, f"is a link to {target}, which is cut short ({len(data)} of {size} bytes)")
        self.last = (offset, data)
        return data


def _link_target(name: str, member: tarfile.TarInfo) -> str | None:
    """The archive name a link member leads to, or None when it leaves the archive.

    A hard link names a member of the archive; a symbolic link is relative to its own folder. Either
    is resolved on names alone (``normpath``), never on the disk."""
    link = member.linkname
    if link.startswith("/"):
        return None
    if member.islnk():
        target = posixpath.normpath(member_name(link))
    else:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
    return None if target == ".." or target.startswith("../") else target


def _read_members(fileobj: IO[bytes], url: str, max_member_bytes: int, path: Path | None) -> Iterator[dict]:
    headers = type("HeaderBlocks", (_HeaderBlocks,), {})  # one record per archive
    links = _Links(path, max_member_bytes)
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=headers) as archive:
            last = None
            for member in archive:
                last = member.name
                name = member_name(member.name)
                if member.isdir():
                    continue
                if member.isreg():
                    data: object = _read_member(archive, member, max_member_bytes)
                elif member.islnk() or member.issym():
                    data = links.read(name, member)
                else:
                    data = MemberUnusable(name, f"is {_kind(member)}")
                yield {"fname": name, "data": data, "__url__": url}
                archive.members = []  # streaming: keep no list of every member seen
            problem = _end_problem(headers.last, last)
            if problem is not None:
                raise tarfile.ReadError(problem)
    finally:
        links.close()


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, max_member_bytes: int) -> object:
    """A regular member's bytes, or a :class:`MemberTooLarge` marker (its data is then never read)."""
    if member.size > max_member_bytes:
        return MemberTooLarge(member.name, member.size, max_member_bytes)
    data = archive.extractfile(member).read(max_member_bytes + 1)
    if len(data) != member.size:  # the shard breaks off inside this member
        raise tarfile.ReadError(f"member {member.name} is cut short ({len(data)} of {member.size} bytes)")
    return data


def iterate_samples(
    shard: str | os.PathLike | IO[bytes],
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    url: str | None = None,
) -> Iterator[dict]:
    """WebDataset samples of one shard: dicts with ``__key__``, ``__url__`` and one entry per
    field (lower-case extension -> bytes, or a :class:`MemberNotRead` marker saying why not).

    A sample whose fields repeat (two ``x.jpg``) raises nothing: the repeat is dropped and
    the sample gets a ``__error__`` entry saying so. A shard that is not a tar, or breaks off,
    raises :class:`ShardError` after the samples read before the damage.
    """
    from webdataset.tariterators import group_by_keys

    if max_member_bytes < 1:
        raise ValueError(f"max_member_bytes must be >= 1, got {max_member_bytes}")
    name = url or str(shard)
    problems: list[str] = []

    def note(error: Exception) -> bool:
        problems.append(str(error.args[0]) if error.args else type(error).__name__)  # webdataset appends its context
        return True  # keep going

    owned = not hasattr(shard, "read")
    fileobj = open(Path(shard), "rb") if owned else shard  # noqa: SIM115 - closed below
    try:
        members = _members(fileobj, name, max_member_bytes, Path(shard) if owned else None)
        for sample in group_by_keys(members, handler=note):
            if problems:
                sample["__error__"] = "; ".join(problems)
                problems.clear()
            yield sample
    except (OSError, EOFError, tarfile.TarError) as error:
        raise ShardError(f"cannot read shard {name}: {type(error).__name__}: {error}") from error
    finally:
        if owned:
            fileobj.close()
