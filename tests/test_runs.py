"""Resumable, sharded runs: state read back as hostile input, exact resume, ranks, settings checks, clearing."""

import hashlib
import json
import logging
import os

import pytest
import torch
from helpers import killed_write

from pacl_fast.distributed import DistInfo
from pacl_fast.runs import (
    RunState,
    StateError,
    check_same_settings,
    clear_state,
    fingerprint,
    rank_share,
    run_sharded,
    sample_ids_digest,
)

SETTINGS = {"task": "toy", "templates": ["a {}"], "window": (32, 16)}
BAD_ITEM = 5


ONE = DistInfo()


def _run(state_dir, *, dist=ONE, num_items=7, die_after=None, check=None, settings=SETTINGS):
    """A run without a model: item i adds one hit to class i % 3; item 5 cannot be loaded.

    Returns (totals, failures, the indices loaded). ``die_after``: killed (KeyboardInterrupt) after that many loads.
    """
    loaded = []

    def load(index):
        if die_after is not None and len(loaded) >= die_after:
            raise KeyboardInterrupt
        loaded.append(index)
        if index == BAD_ITEM:
            raise ValueError("cannot decode item 5")
        return index

    def process(batch, sums):
        for _, item in batch:
            sums["hits"][item % 3] += 1
        return []

    state = RunState(state_dir, settings, dist)
    totals, failures = run_sharded(
        num_items,
        load,
        process,
        {"hits": torch.zeros(3, dtype=torch.int64)},
        dist=dist,
        state=state,
        describe=lambda i: f"id{i}",
        check=check,
        save_every=1,
        progress=False,
    )
    return totals, failures, loaded


def _killed(tmp_path, die_after=6):
    """A state folder left by a run killed after ``die_after`` items (item 5 failed among them)."""
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        _run(state, die_after=die_after)
    return state, state / "rank00000-of-00001.json"


def test_resume_loads_only_what_is_left_and_equals_one_run(tmp_path):
    state, path = _killed(tmp_path, die_after=4)
    assert json.loads(path.read_text())["done"] == 4
    totals, failures, loaded = _run(state)
    assert loaded == [4, 5, 6]
    # items 0,1,2,3,4,6 (5 failed): class 0 <- 0,3,6; class 1 <- 1,4; class 2 <- 2
    assert totals["hits"].tolist() == [3, 2, 1]
    assert failures == [{"index": 5, "id": "id5", "error": "ValueError: cannot decode item 5"}]
    fresh, _, _ = _run(None)
    assert torch.equal(fresh["hits"], totals["hits"])
    assert not list(state.glob("*.tmp")) and not list(state.glob(".*"))


def _checksum(data: dict) -> str:
    """The documented checksum, computed here independently: sha256 of the sorted, compact JSON of the rest."""
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def mutate(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return mutate


def _drop(key):
    return lambda data: data.pop(key)


# (case, mutation of the saved JSON, what the refusal says). The checksum is recomputed after each
# mutation, as a deliberate forger would: every field must be validated on its own.
FORGERIES = [
    ("done far too large", _set("done", 10**6), r"done=1000000 is not an item count in 0\.\.7"),
    ("done negative", _set("done", -1), r"done=-1 is not an item count"),
    ("done a float", _set("done", 5.0), r"done=5\.0 is not an item count"),
    ("done a bool", _set("done", True), r"done=True is not an item count"),
    ("version old", _set("version", 1), r"format version 1, expected 2"),
    ("version text", _set("version", "2"), r"format version '2'"),
    ("field missing", _drop("failures"), r"not a state file"),
    ("field added", _set("extra", 1), r"not a state file"),
    ("settings", _set("fingerprint", "templates", ["b {}"]), r"other settings \(differs in: templates\)"),
    ("sum missing", _set("sums", {}), r"sums are \[\], expected \['hits'\]"),
    ("sum added", _set("sums", "more", {"shape": [3], "values": [0, 0, 0]}), r"sums are \['hits', 'more'\]"),
    ("sum not a record", _set("sums", "hits", [1, 2, 3]), r"sum 'hits' is not \{shape, values\}"),
    ("shape", _set("sums", "hits", "shape", [1, 3]), r"sum 'hits' has shape \[1, 3\], expected \[3\]"),
    ("values short", _set("sums", "hits", "values", [1, 1]), r"sum 'hits' does not hold 3 values"),
    ("value negative", _set("sums", "hits", "values", [2, -1, 1]), r"not non-negative 64-bit integers"),
    ("value float", _set("sums", "hits", "values", [2, 1.5, 1]), r"not non-negative 64-bit integers"),
    ("value bool", _set("sums", "hits", "values", [2, True, 1]), r"not non-negative 64-bit integers"),
    ("value overflow", _set("sums", "hits", "values", [2, 2**63, 1]), r"not non-negative 64-bit integers"),
    ("failures not a list", _set("failures", {"index": 5}), r"failures must be a list"),
    ("more failures than done", _set("failures", [{"index": i, "id": "x", "error": "y"} for i in range(7)]),
     r"failures must be a list of at most done=6"),
    ("failure fields", _set("failures", [{"index": 5, "id": "id5"}]), r"a failure record is not"),
    ("failure not done", _set("failures", [{"index": 6, "id": "id6", "error": "e"}]), r"failure index 6 is not a done"),
    ("failure repeated", _set("failures", [{"index": 5, "id": "a", "error": "e"}] * 2), r"failure index 5 .*repeated"),
    ("failure index text", _set("failures", [{"index": "5", "id": "a", "error": "e"}]), r"failure index '5'"),
    ("failure id", _set("failures", [{"index": 5, "id": 5, "error": "e"}]), r"id and error must be text"),
]  # fmt: skip


@pytest.mark.parametrize("case,mutate,message", FORGERIES, ids=[f[0] for f in FORGERIES])
def test_every_forged_field_is_refused_with_one_message(tmp_path, case, mutate, message):
    state, path = _killed(tmp_path)
    data = json.loads(path.read_text())
    mutate(data)
    data["checksum"] = _checksum(data)
    path.write_text(json.dumps(data))
    with pytest.raises(StateError, match=message) as refused:
        _run(state)
    text = str(refused.value)
    assert text.startswith(f"cannot resume from {path}: ") and "--restart" in text and str(state) in text


def test_edited_counts_unreadable_files_and_odd_folders_are_refused(tmp_path):
    state, path = _killed(tmp_path)
    data = json.loads(path.read_text())
    assert data["checksum"] == _checksum(data)  # the documented checksum is the one written
    data["sums"]["hits"]["values"][0] += 1  # a plausible forged count, checksum left as it was
    path.write_text(json.dumps(data))
    with pytest.raises(StateError, match="checksum does not match its content.*--restart"):
        _run(state)
    for garbage in (b"{not json", b"\xff\xfe\x00", b"[1, 2]", b""):
        path.write_bytes(garbage)
        with pytest.raises(StateError, match=r"(unreadable|not a state file).*--restart"):
            _run(state)
    path.unlink()
    path.mkdir()  # the state file is a folder
    with pytest.raises(StateError, match="unreadable"):
        _run(state)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(StateError, match="is not a folder"):
        _run(not_a_folder)


def test_task_invariants_are_checked(tmp_path):
    """A caller's invariant (here: every done item counted once or failed) refuses a consistent-looking forgery."""

    def every_item_once(sums, done, failures):
        counted = int(sums["hits"].sum())
        return None if counted + len(failures) == done else f"{counted} counted + {len(failures)} failed != {done}"

    state, path = _killed(tmp_path)
    assert _run(state, check=every_item_once)[0]["hits"].tolist() == [3, 2, 1]  # an honest state passes
    state, path = _killed(tmp_path / "again")
    data = json.loads(path.read_text())
    data["sums"]["hits"]["values"] = [9, 9, 9]
    data["checksum"] = _checksum(data)
    path.write_text(json.dumps(data))
    assert _run(state)[0]["hits"].tolist() == [10, 9, 9]  # without the invariant nothing can tell
    path.write_text(json.dumps(data))
    with pytest.raises(StateError, match=r"27 counted \+ 1 failed != 6"):
        _run(state, check=every_item_once)


def test_ranks_share_items_and_another_process_count_is_refused(tmp_path):
    assert list(rank_share(range(7), DistInfo(0, 2))) == [0, 2, 4, 6]
    assert list(rank_share(range(7), DistInfo(1, 2))) == [1, 3, 5]
    state = tmp_path / "state"
    # Two ranks run one after the other (no process group: each returns its own share's sums).
    rank0, failures0, loaded0 = _run(state, dist=DistInfo(0, 2))
    rank1, failures1, loaded1 = _run(state, dist=DistInfo(1, 2))
    assert (loaded0, loaded1) == ([0, 2, 4, 6], [1, 3, 5])
    assert (rank0["hits"] + rank1["hits"]).tolist() == [3, 2, 1] and failures0 == [] and len(failures1) == 1
    assert sorted(p.name for p in state.iterdir()) == ["rank00000-of-00002.json", "rank00001-of-00002.json"]
    with pytest.raises(StateError, match=r"another number of processes \(rank00000-of-00002\.json\).*--restart"):
        _run(state)
    # A rank whose share is done only reloads: nothing is loaded again.
    assert _run(state, dist=DistInfo(1, 2))[2] == []


def test_settings_checks_name_what_differs():
    saved = fingerprint(SETTINGS)
    assert saved["window"] == [32, 16]  # as a JSON reload gives it back
    check_same_settings(saved, fingerprint(SETTINGS), subject="x was", remedy="y")
    with pytest.raises(
        ValueError, match=r"^the maps were made with other settings \(differs in: task, window\); redo$"
    ):
        check_same_settings(saved, {**saved, "task": "other", "window": [1]}, subject="the maps were", remedy="redo")
    with pytest.raises(ValueError, match=r"differs in: task, templates, window"):
        check_same_settings(["not", "a", "dict"], saved, subject="s", remedy="r")


def test_sample_ids_digest_pins_order_and_content():
    expected = hashlib.sha256(b'"a"\n"b"\n').hexdigest()  # one JSON string per line
    assert sample_ids_digest(["a", "b"]) == expected
    assert len({sample_ids_digest(ids) for ids in (["a", "b"], ["b", "a"], ["a"], ["a", "b", "c"], ["a\nb"])}) == 5


def test_clear_state_removes_only_run_files(tmp_path, caplog):
    state, path = _killed(tmp_path)
    keep = state / "notes.txt"
    keep.write_text("mine")
    with caplog.at_level(logging.WARNING, logger="pacl_fast.runs"):
        clear_state(state, DistInfo())
    assert not path.exists() and keep.read_text() == "mine" and "kept" in caplog.text
    keep.unlink()
    clear_state(state, DistInfo())
    assert not state.exists()
    clear_state(tmp_path / "never-made", DistInfo())  # nothing to do
    clear_state(None, DistInfo())
    state, path = _killed(tmp_path / "ranks")
    clear_state(state, DistInfo(1, 2))  # only rank 0 clears
    assert path.exists()


@pytest.mark.timeout(60)
def test_a_state_file_that_is_a_fifo_or_nested_without_end_is_refused_in_one_line(tmp_path):
    """Issue 23 items 3 and 5: a FIFO where the state file should be hung the run forever; 100,000 nested
    brackets ended in a RecursionError traceback. Both are a StateError naming the file and --restart."""
    state, path = _killed(tmp_path)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(StateError, match=r"unreadable \(NotARegularFileError: .*expected a regular file, found a FIFO"):
        _run(state)
    path.unlink()
    for depth in (100_000, 990):  # past the parser's limit; just under it, deeper in the checks
        path.write_text("[" * depth + "]" * depth)
        with pytest.raises(StateError) as refused:
            _run(state)
        assert str(refused.value).startswith(f"cannot resume from {path}: ") and "--restart" in str(refused.value)
    saved = {"version": 2, "fingerprint": {"task": [[[[]]]]}, "done": 1, "sums": {}, "failures": []}
    deep = json.dumps(saved).replace("[[[[]]]]", "[" * 990 + "]" * 990)
    path.write_text(deep)
    with pytest.raises(StateError, match=r"cannot resume from .*(other settings|nested too deeply).*--restart"):
        _run(state)


def test_resume_removes_the_temporary_files_of_killed_state_writes(tmp_path):
    """Issue 23 item 10, for run state: a save killed mid-write left its temporary file for good."""
    state, path = _killed(tmp_path, die_after=4)
    dead = killed_write(path)
    totals, _, loaded = _run(state)
    assert loaded == [4, 5, 6] and totals["hits"].tolist() == [3, 2, 1] and not dead.exists()
