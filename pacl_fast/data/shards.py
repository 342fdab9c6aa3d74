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

Used by bulk segmentation (``pacl_fast.bulk``) and by training (``pacl_fast.data.pairs``).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

#: Default cap of one tar member: far above any photo, far below what would hurt a worker.
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class MemberTooLarge:
    """Stands in a sample for a member that was not read because it is over the size cap."""

    name: str
    size: int
    limit: int

    def __str__(self) -> str:
        return f"tar member {self.name} is {self.size} bytes, over the limit of {self.limit} (--max-member-bytes)"


class ShardError(Exception):
    """The shard itself cannot be read (not a tar, truncated, unreadable); the samples before it stand."""


def is_shard(path: str | os.PathLike) -> bool:
    return any(str(path).endswith(suffix) for suffix in SHARD_SUFFIXES)


def _members(fileobj: IO[bytes], url: str, max_member_bytes: int) -> Iterator[dict]:
    """``{"fname", "data", "__url__"}`` per regular member, as webdataset's expander yields them, then ``{}``."""
    try:
        yield from _read_members(fileobj, url, max_member_bytes)
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


def _read_members(fileobj: IO[bytes], url: str, max_member_bytes: int) -> Iterator[dict]:
    headers = type("HeaderBlocks", (_HeaderBlocks,), {})  # one record per archive
    with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=headers) as archive:
        name = None
        for member in archive:
            name = member.name
            if not member.isreg():
                continue
            if member.size > max_member_bytes:
                data: object = MemberTooLarge(member.name, member.size, max_member_bytes)
            else:
                data = archive.extractfile(member).read(max_member_bytes + 1)
                if len(data) != member.size:  # the shard breaks off inside this member
                    raise tarfile.ReadError(f"member {member.name} is cut short ({len(data)} of {member.size} bytes)")
            yield {"fname": member.name, "data": data, "__url__": url}
            archive.members = []  # streaming: keep no list of every member seen
        problem = _end_problem(headers.last, name)
        if problem is not None:
            raise tarfile.ReadError(problem)


def iterate_samples(
    shard: str | os.PathLike | IO[bytes],
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    url: str | None = None,
) -> Iterator[dict]:
    """WebDataset samples of one shard: dicts with ``__key__``, ``__url__`` and one entry per
    field (lower-case extension -> bytes, or :class:`MemberTooLarge`).

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
        for sample in group_by_keys(_members(fileobj, name, max_member_bytes), handler=note):
            if problems:
                sample["__error__"] = "; ".join(problems)
                problems.clear()
            yield sample
    except (OSError, EOFError, tarfile.TarError) as error:
        raise ShardError(f"cannot read shard {name}: {type(error).__name__}: {error}") from error
    finally:
        if owned:
            fileobj.close()
