"""files: atomic folders and writes (whole or not at all, the umask, stale temporaries), regular-file reads, names."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator

import pytest
from helpers import killed_write, writer_in_progress

from pacl_fast.files import (
    STALE_TEMPORARY_SECONDS,
    atomic_folder,
    atomic_write,
    output_key,
    remove_stale_temporaries,
    safe_key,
)


def whole(folder):
    return (folder / "model.bin").is_file()


def test_the_folder_appears_in_one_rename_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "cache" / "model"
    with atomic_folder(target, whole) as tmp:
        (tmp / "model.bin").write_bytes(b"weights")
        assert not target.exists()  # nothing visible while it is written
    assert (target / "model.bin").read_bytes() == b"weights"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_a_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="conversion failed"), atomic_folder(target, whole) as tmp:
        (tmp / "model.bin").write_bytes(b"half")
        raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []


def test_a_competitor_that_finished_first_is_kept_only_when_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.bin").write_bytes(b"theirs")
    with atomic_folder(target, whole) as tmp:
        (tmp / "model.bin").write_bytes(b"ours")
    assert (target / "model.bin").read_bytes() == b"theirs" and list(tmp_path.iterdir()) == [target]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "junk").write_bytes(b"x")  # not whole: the rename's error is raised, not hidden
    with pytest.raises(OSError), atomic_folder(broken, whole) as tmp:
        (tmp / "model.bin").write_bytes(b"ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "model"]


def test_open_regular_refuses_fifos_and_folders_without_blocking(tmp_path):
    import os

    from pacl_fast.files import NotARegularFileError, open_regular, read_regular_bytes

    regular = tmp_path / "ok.bin"
    regular.write_bytes(b"abc")
    assert read_regular_bytes(regular) == b"abc"
    with open_regular(regular) as f:
        assert f.read(2) == b"ab"
    with pytest.raises(ValueError, match="over 2 bytes"):
        read_regular_bytes(regular, max_bytes=2)
    fifo = tmp_path / "entry.safetensors"
    os.mkfifo(fifo)  # opening it with a plain open() blocks until a writer comes
    with pytest.raises(NotARegularFileError, match="FIFO"):
        read_regular_bytes(fifo)
    with pytest.raises(NotARegularFileError, match="folder"):
        read_regular_bytes(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_regular_bytes(tmp_path / "missing")


# ---- atomic_write: the umask, and the temporary files of killed writers -----------------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask,file_mode,folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_and_folders_honour_the_umask(tmp_path, mask, file_mode, folder_mode):
    """Issue 24 item 5: outputs were 0600 under umask 022 (atomic_write kept mkstemp's mode)."""
    with umask(mask):
        for data in (b"bytes", "text", lambda f: f.write(b"written by a function")):
            path = atomic_write(tmp_path / "sub" / f"out-{type(data).__name__}.bin", data)
            assert stat.S_IMODE(path.stat().st_mode) == file_mode, oct(path.stat().st_mode)
        with atomic_folder(tmp_path / "model", whole) as tmp:
            (tmp / "model.bin").write_bytes(b"w")
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == folder_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "sub"]  # no temporary left


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    """Issue 23 item 10: killed writes left .<name>.*.tmp files that no rerun removed. A live writer's
    (another process, or this one) is kept, and so is every file that is not atomic_write's."""
    folder = tmp_path / "out"
    folder.mkdir()
    dead = killed_write(folder / "a_labels.png")
    nested = killed_write(folder / "sub" / "b_labels.png")
    prefix, writer_id, _, end = dead.name.rsplit("-", 3)
    own = folder / f"{prefix}-{writer_id}-{os.getpid()}-{end}"  # as if this process were writing it
    own.write_bytes(b"mine")
    other_machine = folder / ".c_labels.png.pacl-00000000-1-0123abcd.tmp"  # another host's pid 1
    legacy = folder / ".d_labels.png.k3j_x9a2.tmp"  # tempfile.mkstemp's name, before
    keep = [folder / "notes.tmp", folder / ".e.tmp", folder / "f_labels.png"]
    for path in [other_machine, legacy, *keep]:
        path.write_bytes(b"x")
    odd_folder = folder / ".g_labels.png.pacl-00000000-1-0123abcd.tmp"
    odd_folder.mkdir()
    with writer_in_progress(folder / "h_labels.png") as (writer, live):
        assert remove_stale_temporaries(folder) == 1  # not recursive: sub/ is left
        assert not dead.exists() and nested.exists() and live.exists() and own.exists()
        assert other_machine.exists() and legacy.exists()  # recent: their writers may be alive elsewhere
        hour_ago = time.time() - STALE_TEMPORARY_SECONDS - 60
        for path in (other_machine, legacy, *keep):
            os.utime(path, (hour_ago, hour_ago))
        os.utime(odd_folder, (hour_ago, hour_ago))
        assert remove_stale_temporaries(folder, recursive=True) == 3
        assert not nested.exists() and not other_machine.exists() and not legacy.exists()
        assert live.exists() and own.exists() and odd_folder.is_dir() and all(p.exists() for p in keep)
        writer.communicate(b"go on\n", timeout=30)  # the live writer publishes its whole file
    assert (folder / "h_labels.png").read_bytes() == b"half and the rest" and not live.exists()
    assert remove_stale_temporaries(tmp_path / "missing") == 0


def test_output_key_makes_any_name_safe():
    """Issue 23 item 9: a file name that is not UTF-8 failed with a codec error."""
    name = os.fsdecode(b"sub/caf\xe9 cr\xe8me")  # as Python reads such a name on Linux
    assert output_key(name) == "sub/caf%E9 cr%E8me"
    assert output_key("sub/café") == "sub/café" and output_key("100%") == "100%"  # UTF-8 names are kept
    assert output_key("x\udb80y") == "x%ED%AE%80y"  # a lone surrogate from elsewhere: its bytes
    with pytest.raises(ValueError, match=r"'caf\\udce9' is not UTF-8 text"):
        safe_key(name.split("/")[1][:4])
    for bad in ("../x", "sub/../x", "./x", "a//b", "/abs", "a\\b", "x\ny"):
        with pytest.raises(ValueError, match="output name"):
            output_key(bad)
