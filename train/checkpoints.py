"""Training checkpoints: written atomically, pruned, read back as hostile input, chosen for resuming.

A checkpoint (``OUT/checkpoints/step_00000500.pt``) holds the trained tensors (never a frozen
CLIP), the optimiser's moments, the grad-scaler state, every rank's RNG state and data position,
and the run signature: what must not change across a resume (stage, model identity, data, batch,
ranks, seeds, schedule). It is read with ``torch.load(weights_only=True)`` and every field is
checked before use; a truncated or corrupt newest checkpoint is skipped, with a warning, for the
older one kept beside it.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import torch

from pacl_fast.files import atomic_write

CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2
FORMAT = "pacl-fast-train-checkpoint/1"
_NAME = re.compile(r"step_(\d{8})\.pt")
#: Entries of a checkpoint and their types.
FIELDS: dict[str, type] = {
    "format": str,
    "step": int,
    "model": dict,
    "optimizer": dict,
    "scaler": dict,
    "rng": list,
    "data": list,
    "signature": dict,
}


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and why."""


def checkpoint_path(out: Path, step: int) -> Path:
    return out / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(out: Path) -> list[Path]:
    """The run's checkpoints, newest (highest step) first; only names this module writes."""
    folder = out / CHECKPOINT_DIR
    found = [p for p in folder.glob("step_*.pt") if _NAME.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: p.name, reverse=True)


def remove_stale_temporaries(out: Path) -> None:
    """Delete half-written checkpoints a killed process left (``atomic_write``'s ``.step_*.tmp``)."""
    folder = out / CHECKPOINT_DIR
    if folder.is_dir():
        for temporary in folder.glob(".step_*.tmp"):
            temporary.unlink(missing_ok=True)


def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically as the checkpoint of ``state["step"]``, then keep only the newest few."""

    def write(f: io.BufferedWriter) -> None:
        torch.save({"format": FORMAT, **state}, f)

    path = atomic_write(checkpoint_path(out, state["step"]), write)
    for old in list_checkpoints(out)[KEEP_CHECKPOINTS:]:
        old.unlink(missing_ok=True)
    return path


def _is_tensor_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's entries, each of the expected type; CheckpointError (one line) otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as error:  # truncated zip, garbage, or pickled objects weights_only refuses
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if _is_tensor_dict(state):
        raise CheckpointError(
            f"{path} is a plain state dict (tensors only), not a train/train.py checkpoint: "
            f"--resume takes a file of OUT/{CHECKPOINT_DIR}/"
        )
    if isinstance(state, dict) and "signature" in state and "format" not in state:
        raise CheckpointError(
            f"{path} was written by an older train/train.py, whose checkpoints cannot be resumed exactly: "
            "use --resume none or another --out"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a train/train.py checkpoint (format {FORMAT} expected)")
    for name, kind in FIELDS.items():
        if not isinstance(state.get(name), kind) or (kind is int and isinstance(state[name], bool)):
            raise CheckpointError(f"{path}: entry {name!r} is missing or not a {kind.__name__}")
    if not _is_tensor_dict(state["model"]):
        raise CheckpointError(f"{path}: entry 'model' is not a dict of named tensors")
    steps, world_size = state["signature"].get("steps"), state["signature"].get("world_size")
    if not isinstance(steps, int) or not 1 <= state["step"] <= steps:
        raise CheckpointError(f"{path}: step {state['step']} is outside 1..{steps}")
    for name in ("rng", "data"):
        if len(state[name]) != world_size:
            raise CheckpointError(f"{path}: entry {name!r} has {len(state[name])} ranks, the signature {world_size}")
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1 for t in state["rng"]):
        raise CheckpointError(f"{path}: entry 'rng' does not hold RNG states")
    return state


def choose_checkpoint(out: Path, resume: str, warn) -> tuple[Path, dict[str, Any]] | None:  # noqa: ANN001
    """The checkpoint to resume from (path and entries), or None to start afresh.

    ``resume`` is ``none``, ``auto`` (the newest readable checkpoint in ``out``: an unreadable one
    is reported through ``warn(message)`` and the next older one tried) or a checkpoint file.
    """
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {resume}: no checkpoint file there")
        return path, read_checkpoint(path)
    candidates = list_checkpoints(out)
    problems = []
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except CheckpointError as error:
            warn(f"warning: skipping checkpoint {path}: {error}")
            problems.append(str(error))
    if candidates:
        raise CheckpointError(f"no readable checkpoint in {out / CHECKPOINT_DIR}: {'; '.join(problems)}")
    return None


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        items: dict[str, object] = {}
        for key, inner in value.items():
            items.update(_flatten(inner, f"{prefix}{key}."))
        return items
    return {prefix[:-1]: value}


def signature_differences(saved: dict, current: dict) -> list[str]:
    """``name (checkpoint: A, this run: B)`` for every entry that differs, nested entries dotted."""
    old, new = _flatten(saved), _flatten(current)
    missing = object()
    return [
        f"{key} (checkpoint: {old.get(key, 'absent')}, this run: {new.get(key, 'absent')})"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    ]


def trim_log(path: Path, step: int) -> None:
    """Cut ``log.jsonl`` back to the records of steps ``<= step``: a resumed run logs the later ones again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    if kept != lines:
        atomic_write(path, "".join(line + "\n" for line in kept))
