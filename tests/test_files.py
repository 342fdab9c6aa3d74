"""files.atomic_folder: a folder appears whole or not at all, and a finished competitor is kept."""

from __future__ import annotations

import pytest

from pacl_fast.files import atomic_folder


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
