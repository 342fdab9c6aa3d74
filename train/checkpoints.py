"""Training checkpoints: written atomically, pruned, read back as hostile input, chosen for resuming.

A checkpoint (``OUT/checkpoints/step_00000500.pt``) holds the trained tensors (never a frozen
CLIP), the optimiser's moments, the grad-scaler state, every rank's RNG states (CPU, and CUDA's
where the run uses it) and data position, the run signature (what must not change across a resume:
stage, model identity, data, batch, ranks, seeds, schedule) and a checksum of all of them. It is
opened only if it is a regular file (a FIFO would block the reader forever), read with
``torch.load(weights_only=True)``, and every field is checked before use: the checksum (a step or
data position edited by hand), types, ranges, finite tensors. A truncated or corrupt newest
checkpoint is skipped, with a warning, for the older one kept beside it.

The checksum catches edits and damage; it is not a signature: someone who recomputes it can
forge a checkpoint, and then the field checks still stand between the file and the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import torch

from pacl_fast import files
from pacl_fast.files import NotARegularFileError, atomic_write, open_regular, read_regular_bytes
from pacl_fast.weights import nonfinite_tensors

CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2
FORMAT = "pacl-fast-train-checkpoint/2"
#: Formats this module wrote before, refused with a message saying why (1: no checksum, no CUDA RNG).
OLD_FORMATS = ("pacl-fast-train-checkpoint/1",)
_NAME = re.compile(r"step_(\d{8})\.pt")
#: Entries of a checkpoint and their types.
FIELDS: dict[str, type] = {
    "format": str,
    "step": int,
    "model": dict,
    "optimizer": dict,
    "scaler": dict,
    "rng": list,
    "cuda_rng": list,
    "data": list,
    "signature": dict,
    "checksum": str,
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


def remove_stale_temporaries(out: Path) -> int:
    """Delete the half-written checkpoints killed writers left; return how many. The rules are
    :func:`pacl_fast.files.remove_stale_temporaries`'s: a live writer's file (a second run writing
    into the same folder, another node's) is never touched, only one whose writer is gone."""
    return files.remove_stale_temporaries(out / CHECKPOINT_DIR)


def _canonical(value: object, digest: Any) -> None:
    """Feed ``value`` to ``digest`` in one unambiguous encoding: type tags, lengths, sorted dict keys,
    tensors as dtype, shape and raw bytes. Only what a checkpoint holds is accepted."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{list(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        keys = sorted(value, key=lambda key: (type(key).__name__, key))
        digest.update(f"D{len(keys)}:".encode())
        for key in keys:
            _canonical(key, digest)
            _canonical(value[key], digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for item in value:
            _canonical(item, digest)
    elif value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value) if isinstance(value, float) else json.dumps(value)
        digest.update(f"{type(value).__name__}{len(text)}:{text}".encode())
    else:
        raise CheckpointError(f"a checkpoint cannot hold a {type(value).__name__}")


def state_checksum(state: dict[str, Any]) -> str:
    """sha256 of every entry of a checkpoint but ``checksum`` (the step, tensors, RNG, data positions...)."""
    digest = hashlib.sha256()
    _canonical({key: value for key, value in state.items() if key != "checksum"}, digest)
    return digest.hexdigest()


def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically, with its checksum, as the checkpoint of ``state["step"]``, then keep
    only the newest few. The caller has checked that its tensors are finite (``Trainer.save`` does, on
    every rank at once, so a diverged run stops everywhere and never replaces a good checkpoint)."""
    full = {"format": FORMAT, **state}
    full["checksum"] = state_checksum(full)

    def write(f: io.BufferedWriter) -> None:
        torch.save(full, f)

    path = atomic_write(checkpoint_path(out, state["step"]), write)
    for old in list_checkpoints(out)[KEEP_CHECKPOINTS:]:
        if old.is_file():  # a folder of that name is the run folder check's to report, not ours to delete
            old.unlink(missing_ok=True)
    return path


def nonfinite_entries(model: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> dict[str, int]:
    """``{dotted name: count}`` of the trained tensors and optimiser moments holding NaN or Inf."""
    found = {f"model.{name}": tensor for name, tensor in model.items()}
    moments = optimizer.get("state", {})
    for index, entries in moments.items() if isinstance(moments, dict) else ():
        if isinstance(entries, dict):
            found.update({f"optimizer.state.{index}.{k}": v for k, v in entries.items() if isinstance(v, torch.Tensor)})
    return nonfinite_tensors(found)


def _describe_nonfinite(bad: dict[str, int]) -> str:
    names = sorted(bad)
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return "NaN/Inf values in " + ", ".join(f"{name} ({bad[name]})" for name in names[:3]) + more


def _is_tensor_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's entries, each of the expected type; CheckpointError (one line) otherwise."""
    try:
        with open_regular(path) as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except NotARegularFileError as error:
        raise CheckpointError(str(error)) from None
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
    if isinstance(state, dict) and state.get("format") in OLD_FORMATS:
        raise CheckpointError(
            f"{path} was written by an older train/train.py (format {state['format']}: no checksum, no CUDA RNG): "
            "use --resume none or another --out"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a train/train.py checkpoint (format {FORMAT} expected)")
    for name, kind in FIELDS.items():
        if not isinstance(state.get(name), kind) or (kind is int and isinstance(state[name], bool)):
            raise CheckpointError(f"{path}: entry {name!r} is missing or not a {kind.__name__}")
    if state_checksum(state) != state["checksum"]:
        raise CheckpointError(f"{path}: its checksum does not match its content (edited or damaged)")
    named = _NAME.fullmatch(path.name)
    if named and int(named.group(1)) != state["step"]:
        raise CheckpointError(f"{path} holds step {state['step']}, not the step its name says (renamed?)")
    if not _is_tensor_dict(state["model"]):
        raise CheckpointError(f"{path}: entry 'model' is not a dict of named tensors")
    steps, world_size = state["signature"].get("steps"), state["signature"].get("world_size")
    if not isinstance(steps, int) or not 1 <= state["step"] <= steps:
        raise CheckpointError(f"{path}: step {state['step']} is outside 1..{steps}")
    for name in ("rng", "cuda_rng", "data"):
        if len(state[name]) != world_size:
            raise CheckpointError(f"{path}: entry {name!r} has {len(state[name])} ranks, the signature {world_size}")
    if not all(_is_rng_state(t) for t in state["rng"]):
        raise CheckpointError(f"{path}: entry 'rng' does not hold RNG states")
    if not all(isinstance(states, list) and all(_is_rng_state(t) for t in states) for states in state["cuda_rng"]):
        raise CheckpointError(f"{path}: entry 'cuda_rng' does not hold lists of CUDA RNG states")
    bad = nonfinite_entries(state["model"], state["optimizer"])
    if bad:
        raise CheckpointError(
            f"{path} holds {_describe_nonfinite(bad)}: the run that wrote it had diverged; resume from an older "
            "checkpoint (--resume FILE) or start afresh (--resume none)"
        )
    return state


def _is_rng_state(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.ndim == 1


def choose_checkpoint(out: Path, resume: str, warn) -> tuple[Path, dict[str, Any]] | None:  # noqa: ANN001
    """The checkpoint to resume from (path and entries), or None to start afresh.

    ``resume`` is ``none``, ``auto`` (the newest readable checkpoint in ``out``: an unreadable one
    is reported through ``warn(message)`` and the next older one tried) or a checkpoint file.
    """
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"--resume {resume}: no checkpoint file there")
        return path, read_checkpoint(path)  # anything but a regular file is refused there, naming what it is
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


def check_run_folder(out: Path, files: list[Path]) -> None:
    """Before a run starts: CheckpointError naming anything in the way of what it will write.

    ``out``, ``out/checkpoints`` and the folders of ``files`` must be folders (or absent); no
    checkpoint name may be taken by a folder (a file cannot replace one); each of ``files`` (the
    log, exports...) must be a regular file or absent (a FIFO at the log would block the run).
    Found at the final save, such a thing cost the whole run.
    """
    for folder in (out, out / CHECKPOINT_DIR, *(path.parent for path in files)):
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder, and this run writes files in it: use another --out")
    for path in [p for p in list_checkpoints(out) if p.is_dir()] + [p for p in files if p.exists()]:
        if not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise CheckpointError(f"{path} is {kind}, where this run writes a file: move it away or use another --out")


def trim_log(path: Path, step: int) -> None:
    """Cut ``log.jsonl`` back to the records of steps ``<= step``: a resumed run logs the later ones again."""
    if not path.exists():
        return
    lines = read_regular_bytes(path).decode("utf-8", errors="replace").splitlines()
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
