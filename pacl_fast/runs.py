"""Long runs that can be killed, resumed and shared across ``torchrun`` ranks: evaluation and bulk segmentation.

What both loops stand on:

* settings: :func:`fingerprint` (what a saved run is compared with) and :func:`check_same_settings`,
  the one "made with other settings (differs in: ...)" refusal;
* sharing by rank: :func:`rank_share` (``items[rank::world_size]``, decided before any work);
* resumable integer sums: :class:`RunState` (one file per rank, rewritten atomically through
  :func:`pacl_fast.files.atomic_write`, every field validated when read back) and
  :func:`run_sharded` (load in DataLoader workers, process, save every few items, all-reduce);
* :func:`progress_bar` (on rank 0 only, saying which share it counts) and :func:`as_list`, the
  collate function that keeps a batch a plain list.

A state file is the run's own output, but it is read back as hostile input (:func:`read_json`: a
regular file only, bounded, any nesting): a field out of range, of the wrong type or shape, or a
checksum that does not match (a hand-edited file) ends the run with one :class:`StateError` that
names the file and says how to start over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pacl_fast.distributed import DistInfo, all_reduce_sum, barrier, gather_objects
from pacl_fast.files import atomic_write, read_regular_bytes, remove_stale_temporaries

logger = logging.getLogger(__name__)

#: Format of the per-rank state files (2: checksummed, validated field by field).
STATE_VERSION = 2
STATE_KEYS = frozenset({"version", "fingerprint", "done", "sums", "failures", "checksum"})
FAILURE_KEYS = frozenset({"index", "id", "error"})
#: What ``--restart`` does, said in every refusal to resume.
RESTART_HINT = "start over with --restart (or delete {directory})"
_INT64_LIMIT = 1 << 63
#: Largest run state or settings file read back (a confusion matrix of 1,000 classes is about 8 MB).
MAX_STATE_BYTES = 1 << 30

T = TypeVar("T")


class StateError(ValueError):
    """A saved run cannot be resumed: unreadable, forged, or made with other settings."""


# --------------------------------------------------------------------------------------------
# Settings


def fingerprint(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as a reload of its JSON gives it back (tuples become lists): what saved runs are compared with."""
    return json.loads(json.dumps(settings))


def read_json(path: str | os.PathLike, max_bytes: int = MAX_STATE_BYTES) -> Any:
    """The JSON in the regular file ``path``, read as hostile input.

    Raises OSError (missing, unreadable, a FIFO or a folder: never blocks) or ValueError (over
    ``max_bytes``, not UTF-8 JSON, or nested too deeply to parse: a RecursionError is not a reason to
    show a traceback)."""
    data = read_regular_bytes(path, max_bytes=max_bytes)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None


def settings_differ(saved: object, current: dict[str, Any]) -> str | None:
    """``"made with other settings (differs in: a, b)"`` when ``saved`` is not ``current``, else None."""
    if saved == current:
        return None
    old = saved if isinstance(saved, dict) else {}
    changed = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
    return f"made with other settings (differs in: {', '.join(changed) or 'format'})"


def check_same_settings(saved: object, current: dict[str, Any], *, subject: str, remedy: str) -> None:
    """Refuse to add to work made with other settings: ``ValueError("{subject} made with other settings
    (differs in: ...); {remedy}")``, e.g. subject ``"the label maps in OUT were"``."""
    difference = settings_differ(saved, current)
    if difference is not None:
        raise ValueError(f"{subject} {difference}; {remedy}")


def sample_ids_digest(ids: Iterable[str]) -> str:
    """sha256 of a run's sample ids in order: a changed split list must not resume into the old one."""
    digest = hashlib.sha256()
    for sample_id in ids:
        digest.update(json.dumps(str(sample_id)).encode("utf-8") + b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Ranks and progress


def rank_share(items: Sequence[T], dist: DistInfo) -> Sequence[T]:
    """This rank's strided share of ``items`` (``items[rank::world_size]``); the shares are disjoint and cover all."""
    return items[dist.rank :: dist.world_size]


def as_list(batch: list) -> list:
    """DataLoader ``collate_fn`` that keeps a batch a list (items are images of different sizes, or failures)."""
    return batch


def progress_bar(
    desc: str, dist: DistInfo, *, total: int | None = None, initial: int = 0, enabled: bool = True
) -> tqdm:
    """A tqdm bar on rank 0 only; under torchrun its description says it counts rank 0's share."""
    return tqdm(
        total=total,
        initial=initial,
        disable=not (enabled and dist.is_main),
        desc=desc + (f" (rank 0 of {dist.world_size})" if dist.enabled else ""),
        unit="img",
        dynamic_ncols=True,
    )


# --------------------------------------------------------------------------------------------
# Resumable integer sums


def state_checksum(payload: dict[str, Any]) -> str:
    """sha256 of the JSON of every field but ``checksum``, keys sorted, no spaces."""
    body = {k: v for k, v in payload.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, not float


class RunState:
    """One rank's partial sums on disk, so that a killed run resumes where it stopped.

    ``DIR/rank{r}-of-{w}.json`` holds the format version, the run's fingerprint (everything the
    numbers depend on), how many items of this rank's share are done (in order), the integer sums,
    the failures and a checksum of all of them. ``directory=None`` keeps nothing.

    The checksum catches edits and damage; it is not a signature: someone who recomputes it can
    still make counts that are in range, of the right shape and consistent with the task's
    invariants. Only running the evaluation again would tell those apart.
    """

    def __init__(self, directory: str | os.PathLike | None, settings: dict[str, Any], dist: DistInfo):
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint(settings)
        self.dist = dist
        name = f"rank{dist.rank:05d}-of-{dist.world_size:05d}.json"
        self.path = self.directory / name if self.directory is not None else None

    def _refuse(self, why: str, also: str = "") -> StateError:
        hint = RESTART_HINT.format(directory=self.directory)
        return StateError(f"cannot resume from {self.path}: {why}; {also}{hint}")

    def load(
        self,
        sums: dict[str, torch.Tensor],
        share: Sequence[int],
        check: Callable[[dict[str, torch.Tensor], int, list[dict]], str | None] | None = None,
    ) -> tuple[int, dict[str, torch.Tensor], list[dict]]:
        """``(done, sums, failures)`` saved by an earlier run of these settings, or a fresh start.

        Args:
            sums: zero int64 tensors, the shapes the saved sums must have.
            share: this rank's item indices; ``done`` counts a prefix of it, failures name its items.
            check: task invariants (e.g. every done item counted once); returns why they fail, or None.
        Raises:
            StateError: the saved state cannot be trusted or belongs to other settings.
        """
        if self.directory is None or not self.directory.exists():
            return 0, sums, []
        if not self.directory.is_dir():
            raise self._refuse(f"{self.directory} is not a folder")
        removed = remove_stale_temporaries(self.directory)
        if removed:
            logger.info("removed %d temporary files of killed state writes from %s", removed, self.directory)
        try:
            return self._load(sums, share, check)
        except RecursionError:  # a structure nested just under the parser's limit, deeper in a comparison
            raise self._refuse("its content is nested too deeply to be a state file") from None

    def _load(
        self,
        sums: dict[str, torch.Tensor],
        share: Sequence[int],
        check: Callable[[dict[str, torch.Tensor], int, list[dict]], str | None] | None,
    ) -> tuple[int, dict[str, torch.Tensor], list[dict]]:
        others = sorted(
            p.name
            for p in self.directory.glob("rank*-of-*.json")
            if not p.name.endswith(f"-of-{self.dist.world_size:05d}.json")
        )
        if others:
            raise StateError(
                f"state folder {self.directory} holds a run with another number of processes ({others[0]}); resume "
                f"with the same number of processes, or {RESTART_HINT.format(directory=self.directory)}"
            )
        if not self.path.exists():
            return 0, sums, []
        try:
            saved = read_json(self.path)
        except (OSError, ValueError) as error:
            raise self._refuse(f"unreadable ({type(error).__name__}: {error})") from None
        if not isinstance(saved, dict) or set(saved) != STATE_KEYS:
            found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise self._refuse(f"not a state file (fields {found}, expected {sorted(STATE_KEYS)})")
        if saved["version"] != STATE_VERSION or not _is_int(saved["version"]):
            raise self._refuse(f"format version {saved['version']!r}, expected {STATE_VERSION}")
        difference = settings_differ(saved["fingerprint"], self.fingerprint)
        if difference is not None:
            raise self._refuse(f"its run was {difference}", also="use the same settings to resume, or ")
        if saved["checksum"] != state_checksum(saved):
            raise self._refuse("its checksum does not match its content (edited or damaged)")
        why = self._invalid(saved, sums, share)
        if why is None:
            done = saved["done"]
            loaded = {
                name: torch.tensor(saved["sums"][name]["values"], dtype=torch.int64).reshape(template.shape)
                for name, template in sums.items()
            }
            failures = [dict(f) for f in saved["failures"]]
            why = check(loaded, done, failures) if check is not None else None
        if why is not None:
            raise self._refuse(why)
        return done, loaded, failures

    @staticmethod
    def _invalid(saved: dict, sums: dict[str, torch.Tensor], share: Sequence[int]) -> str | None:
        """Why a state's fields cannot be true of this run (ranges, types, shapes), or None."""
        done = saved["done"]
        if not _is_int(done) or not 0 <= done <= len(share):
            return f"done={done!r} is not an item count in 0..{len(share)} (this rank's share)"
        entries = saved["sums"]
        if not isinstance(entries, dict) or set(entries) != set(sums):
            found = sorted(entries) if isinstance(entries, dict) else type(entries).__name__
            return f"sums are {found}, expected {sorted(sums)}"
        for name, template in sums.items():
            entry = entries[name]
            if not isinstance(entry, dict) or set(entry) != {"shape", "values"}:
                return f"sum {name!r} is not {{shape, values}}"
            if entry["shape"] != list(template.shape):
                return f"sum {name!r} has shape {entry['shape']!r}, expected {list(template.shape)}"
            values = entry["values"]
            if not isinstance(values, list) or len(values) != math.prod(template.shape):
                return f"sum {name!r} does not hold {math.prod(template.shape)} values"
            if not all(_is_int(v) and 0 <= v < _INT64_LIMIT for v in values):
                return f"sum {name!r} holds values that are not non-negative 64-bit integers"
        failures = saved["failures"]
        if not isinstance(failures, list) or len(failures) > done:
            return f"failures must be a list of at most done={done} records"
        done_items, seen = set(share[:done]), set()
        for failure in failures:
            if not isinstance(failure, dict) or set(failure) != FAILURE_KEYS:
                return f"a failure record is not {{{', '.join(sorted(FAILURE_KEYS))}}}: {failure!r:.80}"
            index = failure["index"]
            if not _is_int(index) or index not in done_items or index in seen:
                return f"failure index {index!r} is not a done item of this rank's share (or is repeated)"
            if not isinstance(failure["id"], str) or not isinstance(failure["error"], str):
                return f"failure {index}: id and error must be text"
            seen.add(index)
        return None

    def save(self, done: int, sums: dict[str, torch.Tensor], failures: list[dict]) -> None:
        if self.path is None:
            return
        payload = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "done": done,
            "sums": {k: {"shape": list(v.shape), "values": v.flatten().tolist()} for k, v in sums.items()},
            "failures": failures,
        }
        payload["checksum"] = state_checksum(payload)
        atomic_write(self.path, json.dumps(payload))


def clear_state(directory: str | os.PathLike | None, dist: DistInfo) -> None:
    """Remove a run's state files (rank 0, once every rank is done with them), then the folder if empty;
    every rank returns once they are gone (``--restart``: no rank may read its old state after).

    Only files this module writes are removed, so ``--state-dir`` pointing at a folder of other
    files (or ``~``) never deletes them.
    """
    barrier()
    if directory is not None and dist.is_main:
        _remove_state_files(Path(directory))
    barrier()


def _remove_state_files(folder: Path) -> None:
    if not folder.is_dir():
        return
    for path in [*folder.glob("rank*-of-*.json"), *folder.glob(".rank*-of-*.json.*.tmp")]:
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        logger.warning("kept %s: it holds files that are not run state", folder)


class _Items(Dataset):
    """``(index, item, error)`` for the given dataset indices; a failed load is reported, not raised."""

    def __init__(self, load: Callable[[int], Any], indices: Sequence[int]):
        self.load = load
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Any, str | None]:
        index = self.indices[position]
        try:
            return index, self.load(index), None
        except Exception as error:  # any one item (a decompression bomb included) fails alone
            return index, None, f"{type(error).__name__}: {error}"


def run_sharded(
    num_items: int,
    load: Callable[[int], Any],
    process: Callable[[list[tuple[int, Any]], dict[str, torch.Tensor]], list[tuple[int, str]]],
    sums: dict[str, torch.Tensor],
    *,
    dist: DistInfo,
    state: RunState,
    describe: Callable[[int], str],
    check: Callable[[dict[str, torch.Tensor], int, list[dict]], str | None] | None = None,
    batch_size: int = 1,
    workers: int = 0,
    save_every: int = 20,
    save_seconds: float = 60.0,
    progress: bool = True,
    desc: str = "",
    postfix: Callable[[dict[str, torch.Tensor]], str] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Load and process this rank's share of ``num_items``, resumably; return global sums and failures.

    ``load(index)`` runs in DataLoader workers; ``process(batch, sums)`` adds a batch of
    ``(index, item)`` into ``sums`` (int64 tensors) and returns ``(index, error)`` for the items
    it could not score. Items are shared by rank (:func:`rank_share`). ``check`` validates a saved
    state against the task's invariants (see :meth:`RunState.load`).
    """
    share = rank_share(range(num_items), dist)
    done, sums, failures = state.load(sums, share, check)
    loader = DataLoader(_Items(load, share[done:]), batch_size=batch_size, num_workers=workers, collate_fn=as_list)
    bar = progress_bar(desc, dist, total=len(share), initial=done, enabled=progress)
    last_save, unsaved = time.monotonic(), 0
    for batch in loader:
        good = [(index, item) for index, item, error in batch if error is None]
        errors = [(index, error) for index, _, error in batch if error is not None]
        if good:
            errors += process(good, sums)
        failures.extend({"index": i, "id": describe(i), "error": e} for i, e in sorted(errors))
        done += len(batch)
        unsaved += len(batch)
        bar.update(len(batch))
        if unsaved >= save_every or time.monotonic() - last_save > save_seconds:
            state.save(done, sums, failures)
            last_save, unsaved = time.monotonic(), 0
            if postfix is not None:
                bar.set_postfix_str(postfix(sums))
    state.save(done, sums, failures)
    bar.close()
    totals = {name: all_reduce_sum(value) for name, value in sums.items()}
    all_failures = sorted((f for part in gather_objects(failures) for f in part), key=lambda f: f["index"])
    return totals, all_failures
