"""The CPU head's native kernel: labels and winner scores in one fused loop, compiled where a C compiler is.

Why. Eager torch spends one pass over ``[pixels, classes]`` per step (interpolate, max and argmax,
exp, sum). Measured on the 2-core box, per (pixel, class): lerp 0.23-0.32 ns, ``max(dim=-1)`` with
indices 0.95, ``amax`` 0.37, ``exp_`` 0.18-0.23, sum 0.07-0.19: no rewrite of those steps brings
the score under about 0.7 ns (C=150, 512x512: 39 M evaluations, 28 ms and more, plus the labels).
``torch.compile`` (Inductor, dynamic shapes) of the fused per-chunk function took 164 ms there,
slower than the eager head, after a 22 s cold compile (2 s with Inductor's cache warm, plus 1.5-2.4 s
to import it). ``_native_source.SOURCE`` does every step in registers: about 0.4 ns per (pixel,
class) for all of them together as blocks (16 ms for those 39 M), about 0.2 as strips (each class's
exps a geometric progression down a cell's rows: 7 ms), 0.15 without the exps (labels only).

When. ``$PACL_FAST_NATIVE``: ``auto`` (default), ``on`` or ``off``. The kernel is compiled once per
machine and CPU (``cc -O3 -march=native``, 0.2-0.8 s measured) into ``$PACL_FAST_CACHE/native``
(else ``~/.cache/pacl-fast/native``), and later processes load it from there (a few ms, self-test
included). :func:`prepare` (``pacl_fast.head.Head`` calls it when made) starts that in a thread, so
a first build overlaps the model's loading; the first CPU head call waits for it. A process never
changes path once it has one: the same call gives the same bits from its first image to its last.
Without a compiler, or if the build or its self-test fails, the head stays on eager torch (one log
line says why: info under ``auto``, a warning under ``on``): never a failure.

Cache. One file per source, flags, CPU and compiler (its resolved path, size and modification time,
so an upgraded compiler builds afresh): ``pacl-native-<key>.so``. A build is compiled to a temporary
name in the same folder and renamed over the final one (atomic: concurrent builders each produce a
whole file, the last rename wins, a reader never sees half a file). The build ends with a trailer
(``TRAILER_MAGIC``, the key, the SHA-256 of the library before it): a cached file is opened only if
its trailer names this key and its digest matches, so a truncated, corrupt or foreign file (another
key's build, any other ``.so``) is rebuilt, never handed to the dynamic loader. Nothing is compiled
or loaded on import: :func:`prepare` or the first CPU head call does it.

Safety. The library is machine code run in this process, so it is only loaded from a file this
user owns, in a folder this user owns, neither writable by others (else it is built afresh in a
private temporary folder), after its trailer, its ABI version and a self-test against a float64
computation. Every call's arguments are checked here (dtypes, sizes, index ranges): the C code trusts them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

import torch

from kernels import fine_grid
from kernels._native_source import SOURCE

logger = logging.getLogger(__name__)

ENV = "PACL_FAST_NATIVE"
MODES = ("auto", "on", "off")
#: A temporary build file left by a killed process is removed once it is this old.
STALE_SECONDS = 3600
#: Version of the exported signatures the Python side calls (``pacl_native_abi`` in the source).
ABI = 4
#: Seconds a compile may take before it counts as failed.
COMPILE_TIMEOUT = 120
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-strict-aliasing")
#: Tried when ``-march=native`` is refused (a compiler or CPU without it).
PORTABLE_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-strict-aliasing")
#: Starts the trailer appended to a build: magic, the cache key (24 ASCII hex digits), SHA-256 of what precedes.
TRAILER_MAGIC = b"\0pacl-native-build\0"
TRAILER_BYTES = len(TRAILER_MAGIC) + 24 + 32


class NativeUnavailable(RuntimeError):
    """The native kernel cannot be built or loaded here (the message says why); the eager path runs."""


def mode() -> str:
    """``$PACL_FAST_NATIVE`` (``auto`` when unset), checked."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    aliases = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
    value = aliases.get(value, value)
    if value not in MODES:
        raise ValueError(f"${ENV} must be one of {MODES} (or 1/0), got {os.environ.get(ENV)!r}")
    return value


class NativeKernel:
    """The loaded library: :meth:`segment_blocks` evaluates blocks of pixels of one image."""

    def __init__(self, path: Path, library: ctypes.CDLL):
        self.path = path
        self._library = library  # kept alive with the functions
        if library.pacl_native_abi() != ABI:
            raise NativeUnavailable(f"{path}: ABI {library.pacl_native_abi()}, expected {ABI}")
        self.work_floats = int(library.pacl_native_work_floats())
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._segment = library.pacl_segment_blocks
        self._segment.restype = size
        self._segment.argtypes = [pointer, size, size, size, pointer, pointer, pointer, size, size, size]
        self._segment.argtypes += [pointer, pointer, pointer, size, size, size, ctypes.c_float, ctypes.c_float]
        self._segment.argtypes += [size, size, pointer, pointer, pointer, pointer]
        self._strips = library.pacl_segment_strips
        self._strips.restype = size
        self._strips.argtypes = [pointer, size, size, size, pointer, pointer, pointer, size, size, size, pointer]
        self._strips.argtypes += [pointer, size, size, ctypes.c_float, ctypes.c_float, size]
        self._strips.argtypes += [pointer, pointer, pointer, pointer, pointer]
        self._strip_floats = library.pacl_native_strip_floats
        self._strip_floats.restype = size
        self._strip_floats.argtypes = [size, size]
        self._relative = library.pacl_relative_logits
        self._relative.restype = None
        self._relative.argtypes = [pointer, size, size, size, size, size, size, ctypes.c_double, pointer, pointer]
        self._exp = library.pacl_native_exp
        self._exp.restype = None
        self._exp.argtypes = [pointer, pointer, size]
        self._local = threading.local()

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(max(x, -87))`` as the kernel computes it (float32, any size): for tests."""
        flat = x.detach().float().reshape(-1)
        padded = torch.zeros(-(-flat.numel() // 16) * 16)
        padded[: flat.numel()] = flat
        out = torch.empty_like(padded)
        self._exp(padded.data_ptr(), out.data_ptr(), padded.numel())
        return out[: flat.numel()].view(x.shape)

    _BUFFERS = ("work", "classes", "table", "relative", "line")

    def buffer_bytes(self) -> int:
        """Bytes this thread's buffers hold (kept between calls, grown to the largest call's needs)."""
        buffers = (getattr(self._local, name, None) for name in self._BUFFERS)
        return sum(b.numel() * b.element_size() for b in buffers if b is not None)

    def release_buffers(self) -> None:
        """Drop this thread's buffers (the next call makes them again, at the sizes it needs)."""
        for name in self._BUFFERS:
            self._local.__dict__.pop(name, None)

    def _work(self, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This thread's work buffer (64-byte aligned) and room for ``num_classes`` class indices."""
        work = _aligned(self._local, "work", self.work_floats)
        classes = getattr(self._local, "classes", None)
        if classes is None or classes.numel() < num_classes:
            classes = self._local.classes = torch.empty(num_classes, dtype=torch.int32)
        return work, classes

    def relative_logits(self, values: torch.Tensor, rows: range, logit_scale: float, factor: int) -> torch.Tensor:
        """``fine_grid.relative_logits(values[None], rows, logit_scale, factor)[0]``, the same bits in one pass
        (the torch code makes six passes over float64 copies: 2.8 ms of a 512x512 C=150 image's 11 with scores).

        Args:
            values: one image's logits ``[h, w, C]`` float32, contiguous.
            rows: refined rows (a ``range`` with step 1, inside the refined grid).
            factor: the refinement (a power of two, ``fine_grid.REFINE`` or 1).
        Returns:
            ``[len(rows), (w - 1) * factor + 1, C]`` float32: a view of this thread's buffer, valid until the next call.
        """
        grid_h, grid_w, num_classes = _checked(values, "values", torch.float32, 3).shape
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two, got {factor!r}")
        fine_h, fine_w = (grid_h - 1) * factor + 1, (grid_w - 1) * factor + 1
        if rows.step != 1 or not 0 <= rows.start < rows.stop <= fine_h:
            raise ValueError(f"rows {rows} must be a step-1 range inside the refined grid's {fine_h} rows")
        out = _aligned(self._local, "relative", len(rows) * fine_w * num_classes)
        line = _aligned(self._local, "line", 4 * grid_w * num_classes)  # 2 * w * C doubles
        self._relative(
            values.data_ptr(), grid_h, grid_w, num_classes, rows.start, len(rows), factor, float(logit_scale),
            out.data_ptr(), line.data_ptr(),
        )
        return out.view(len(rows), fine_w, num_classes)

    def segment_strips(
        self,
        grid: torch.Tensor,
        rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
        columns: tuple[torch.Tensor, torch.Tensor, int],
        bound: float | None,
        dense: float,
        labels: torch.Tensor,
        scores: torch.Tensor,
        geometric: bool = True,
    ) -> int:
        """Write the labels and scores of every pixel of the row segments ``rows``, 16 output columns at a
        time, each class's terms a geometric progression down a cell's rows where that is exact to float32
        (``_native_source.py``, "Strips"); returns the (pixel, class) evaluations, spare lanes included.

        Args:
            grid, bound, dense, labels: as :meth:`segment_blocks`; ``scores`` ``[H, W]`` float32 (required).
            rows: ``(cell [S], index [S, depth], weight [S, depth], upper)`` as :meth:`segment_blocks`.
            columns: ``(cell [W], weight [W], upper)``: output column ``x`` samples grid columns ``cell[x]``
                and ``cell[x] + upper`` at ``weight[x]``; ascending, 16 consecutive columns spanning at most
                :data:`STRIP_GROUP_CELLS` cells (:func:`strips_fit`).
            geometric: False: an exact exp for every term (tests).
        """
        points, grid_w, num_classes = _checked(grid, "grid", torch.float32, 3).shape
        height, width = _checked(labels, "labels", torch.int16, 2).shape
        if _checked(scores, "scores", torch.float32, 2).shape != labels.shape:
            raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
        if not 1 <= num_classes <= 32767:
            raise ValueError(f"grid has {num_classes} classes: int16 labels hold 1 to 32767")
        row_cell, row_index, row_weight, row_upper = _axis(rows, "rows", points, height)
        col_cell = _checked(columns[0], "columns cell", torch.int64, 1)
        col_weight = _checked(columns[1], "columns weight", torch.float32, 1)
        col_upper = columns[2]
        if col_cell.numel() != width or col_weight.numel() != width or col_upper not in (0, 1):
            raise ValueError(f"columns: {col_cell.numel()} cells and {col_weight.numel()} weights for {width} columns")
        if not (int(col_cell.min()) >= 0 and int(col_cell.max()) + col_upper < grid_w) or not strips_fit(col_cell):
            raise ValueError("columns: a cell outside the grid, or 16 columns spanning too many cells")
        if bound is not None and not bound <= 0.0:  # NaN too
            raise ValueError(f"bound must be a number at most 0 (or None), got {bound!r}")
        work, classes = self._work(num_classes)
        table = _aligned(self._local, "table", int(self._strip_floats(num_classes, grid_w)))
        return self._strips(
            *_grid_and_rows(grid, (row_cell, row_index, row_weight, row_upper)),
            width,
            col_cell.data_ptr(),
            col_weight.data_ptr(),
            col_upper,
            int(bound is not None),
            0.0 if bound is None else bound,
            min(float(dense), 2.0),
            int(geometric),
            labels.data_ptr(),
            scores.data_ptr(),
            work.data_ptr(),
            table.data_ptr(),
            classes.data_ptr(),
        )

    def segment_blocks(
        self,
        grid: torch.Tensor,
        rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
        cols: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
        bound: float | None,
        dense: float,
        labels: torch.Tensor,
        scores: torch.Tensor | None,
    ) -> int:
        """Write the labels (and scores) of every pixel of the row segments ``rows`` (all columns);
        returns the (pixel, class) evaluations, spare lanes of a block's last vector included.

        Args:
            grid: ``[points, grid_w, C]`` float32, contiguous (``fine_grid.relative_logits``: with scores
                every exponent must be at most 0, the largest of each point exactly 0).
            rows, cols: ``(cell [S], index [S, depth], weight [S, depth], upper)`` of each axis (cells
                index ``grid``'s rows / columns; see ``kernels.scores._AxisCells``).
            bound: each block evaluates the classes whose largest corner is at least its floor (the
                largest of the classes' smallest corners) plus ``bound``: ``log(tolerance / C)`` with
                scores, 0 for labels only (``kernels/scores.py``); None: every class.
            dense: evaluate every class of a block whose kept classes are at least this share of them.
            labels: ``[H, W]`` int16 of one image; scores ``[H, W]`` float32 or None (labels only).
        """
        points, grid_w, num_classes = _checked(grid, "grid", torch.float32, 3).shape
        height, width = _checked(labels, "labels", torch.int16, 2).shape
        if scores is not None and _checked(scores, "scores", torch.float32, 2).shape != labels.shape:
            raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
        if not 1 <= num_classes <= 32767:
            raise ValueError(f"grid has {num_classes} classes: int16 labels hold 1 to 32767")
        row_cell, row_index, row_weight, row_upper = _axis(rows, "rows", points, height)
        col_cell, col_index, col_weight, col_upper = _axis(cols, "cols", grid_w, width)
        if bound is not None and not bound <= 0.0:  # NaN too
            raise ValueError(f"bound must be a number at most 0 (or None), got {bound!r}")
        work, classes = self._work(num_classes)
        return self._segment(
            *_grid_and_rows(grid, (row_cell, row_index, row_weight, row_upper)),
            col_cell.numel(),
            col_cell.data_ptr(),
            col_index.data_ptr(),
            col_weight.data_ptr(),
            col_index.shape[1],
            col_upper,
            int(bound is not None),
            0.0 if bound is None else bound,
            min(float(dense), 2.0),
            int(scores is not None),
            width,
            labels.data_ptr(),
            None if scores is None else scores.data_ptr(),
            work.data_ptr(),
            classes.data_ptr(),
        )


#: Cells 16 consecutive output columns may span for :meth:`NativeKernel.segment_strips` (``GROUP_CELLS`` in C).
STRIP_GROUP_CELLS = 4


def strips_fit(column_cell: torch.Tensor) -> bool:
    """Whether output columns sampling grid columns ``column_cell`` ``[W]`` (int64) can run as strips: ascending,
    each 16 consecutive columns (from column 0) within :data:`STRIP_GROUP_CELLS` cells (upsampling by about 5
    or more on the grid the kernel reads)."""
    if column_cell.numel() == 0 or bool((column_cell[1:] < column_cell[:-1]).any()):
        return False
    firsts = column_cell[::16]
    lasts = column_cell[15::16]
    if lasts.numel() < firsts.numel():
        lasts = torch.cat([lasts, column_cell[-1:]])
    return bool((lasts - firsts < STRIP_GROUP_CELLS).all())


def _aligned(local: threading.local, name: str, floats: int) -> torch.Tensor:
    """This thread's buffer ``name`` of at least ``floats`` float32, 64-byte aligned (kept and grown)."""
    buffer = getattr(local, name, None)
    if buffer is None or buffer.numel() < floats + 16:
        buffer = torch.empty(floats + 16)
        setattr(local, name, buffer)
    offset = (-buffer.data_ptr() % 64) // 4
    return buffer[offset : offset + floats]


def _grid_and_rows(grid: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]) -> tuple:
    """The leading arguments both C entry points take: the grid, its width and classes, the row segments
    (checked already)."""
    cell, index, weight, upper = rows
    return (grid.data_ptr(), grid.shape[1], grid.shape[2], cell.numel(), cell.data_ptr(), index.data_ptr(),
            weight.data_ptr(), index.shape[1], upper)  # fmt: skip


def _checked(tensor: torch.Tensor, name: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.ndim != ndim:
        got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a {ndim}-d {dtype} tensor, got {got}")
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU tensor")
    return tensor


def _axis(axis: tuple, name: str, points: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One axis's segments, checked: every cell and its second point inside the grid, every index inside
    the output."""
    cell, index, weight, upper = axis
    cell = _checked(cell, f"{name} cell", torch.int64, 1)
    index = _checked(index, f"{name} index", torch.int64, 2)
    weight = _checked(weight, f"{name} weight", torch.float32, 2)
    if index.shape != weight.shape or index.shape[0] != cell.numel() or upper not in (0, 1):
        raise ValueError(
            f"{name}: cell {tuple(cell.shape)}, index {tuple(index.shape)}, weight "
            f"{tuple(weight.shape)} and upper {upper!r} do not fit together"
        )
    if cell.numel() and not (int(cell.min()) >= 0 and int(cell.max()) + upper < points):
        raise ValueError(f"{name}: a cell outside the grid's {points} points")
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < size:
        raise ValueError(f"{name}: an index outside the output's {size}")
    return cell, index, weight, int(upper)


# ---- building and loading ----


class _State:
    """What this process knows: the loaded kernel, or why there is none, and a build under way."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kernel: NativeKernel | None = None
        self.failure: str | None = None
        self.builder: threading.Thread | None = None


_state = _State()


def _forget_in_child() -> None:
    """A forked child starts with no kernel state: a build thread of the parent does not exist there (its
    lock would stay taken), and the child loads the cached build itself."""
    global _state
    _state = _State()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def prepare() -> None:
    """Start loading (or building) the kernel in a thread, unless ``$PACL_FAST_NATIVE`` is ``off`` or it
    is done or under way: a compile then overlaps what the caller does next (loading a model)."""
    if mode() == "off":
        return
    state = _state
    if not state.lock.acquire(blocking=False):  # held: a load or build is under way (_settle holds it throughout)
        return
    try:
        if state.kernel is not None or state.failure is not None or state.builder is not None:
            return
        state.builder = threading.Thread(target=_settle, args=(state,), name="pacl-native-build", daemon=True)
        state.builder.start()
    finally:
        state.lock.release()


def kernel() -> NativeKernel | None:
    """The kernel the CPU head uses, or None (eager torch), as ``$PACL_FAST_NATIVE`` says: the first call
    loads or builds it (or waits for :func:`prepare`'s thread); a failure is logged once and kept."""
    if mode() == "off":
        return None
    state = _state
    if state.kernel is None and state.failure is None:
        builder = state.builder
        if builder is not None:
            builder.join()
        else:
            _settle(state)
    return state.kernel


def _settle(state: _State) -> None:
    """Load or build the kernel into ``state`` (once: later callers find it there)."""
    with state.lock:
        if state.kernel is not None or state.failure is not None:
            return
        try:
            state.kernel = load_or_build()
        except NativeUnavailable as error:
            state.failure = str(error)
            log = logger.warning if mode() == "on" else logger.info
            log("CPU head: native kernel unavailable (%s); eager torch instead", error)
        except Exception as error:  # a fault of ours: eager torch still answers, the log says what happened
            state.failure = f"{type(error).__name__}: {error}"
            logger.exception("CPU head: building the native kernel failed; eager torch instead")


def loaded() -> NativeKernel | None:
    """The kernel if this process has loaded it, else None (never loads or builds)."""
    return _state.kernel


def status() -> str:
    """One line: which path the CPU head runs and why."""
    state = _state
    if mode() == "off":
        return f"eager torch (${ENV}=off)"
    if state.kernel is not None:
        return f"native kernel ({state.kernel.path})"
    if state.failure is not None:
        return f"eager torch (native kernel unavailable: {state.failure})"
    return "native kernel not loaded yet (the first CPU head call loads or builds it)"


def reset() -> None:
    """Forget this process's kernel or failure (tests; after installing a compiler). A build under way
    finishes into the forgotten state."""
    global _state
    _state = _State()


def cache_dir() -> Path:
    """``$PACL_FAST_CACHE/native``, else ``~/.cache/pacl-fast/native`` (``pacl_fast.files.default_cache_dir``'s
    rule: ``kernels/`` imports nothing from ``pacl_fast``)."""
    return Path(os.environ.get("PACL_FAST_CACHE") or Path.home() / ".cache" / "pacl-fast") / "native"


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (split like a shell word list), else ``cc``, ``gcc`` or ``clang``."""
    if os.environ.get("CC", "").strip():
        command = shlex.split(os.environ["CC"])
        return command if shutil.which(command[0]) else None
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _compiler_identity(command: list[str]) -> str:
    """What tells one compiler from another without running it: its resolved path, size and modification
    time (a package upgrade changes them), and the command's other words (``$CC="ccache gcc"``)."""
    program = os.path.realpath(shutil.which(command[0]) or command[0])
    try:
        info = os.stat(program)
        version = f"{info.st_size}:{info.st_mtime_ns}"
    except OSError:
        version = "?"
    return "\0".join([program, version, *command[1:]])


@lru_cache(maxsize=1)
def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the machine, and on Linux the CPU's model and flags."""
    parts = [platform.system(), platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info = f.read(1 << 16)
        parts += [line for line in info.splitlines() if line.split(":")[0].strip() in ("model name", "flags")][:2]
    except OSError:
        pass
    return "|".join(parts)


def cache_key(command: list[str]) -> str:
    """24 hex digits of SHA-256 over the source, the flags, the CPU and the compiler's identity."""
    parts = [SOURCE, *FLAGS, _cpu_signature(), _compiler_identity(command)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def library_path(command: list[str] | None = None) -> Path:
    """Where the build of this source with ``command`` (default :func:`compiler`), these flags and for
    this CPU is cached.

    Raises:
        NativeUnavailable: no compiler (and so no key).
    """
    command = command or compiler()
    if command is None:
        raise NativeUnavailable("no C compiler (set $CC, or install cc, gcc or clang)")
    return cache_dir() / f"pacl-native-{cache_key(command)}.so"


def _key_of(path: Path) -> str:
    return path.name.removeprefix("pacl-native-").removesuffix(".so")


def _append_trailer(path: Path, key: str) -> None:
    """Seal a fresh build: ``TRAILER_MAGIC``, ``key`` and the SHA-256 of the library (the loader ignores
    bytes after an ELF file's last section)."""
    digest = hashlib.sha256(path.read_bytes()).digest()
    with open(path, "ab") as f:
        f.write(TRAILER_MAGIC + key.encode("ascii") + digest)


def _sealed(path: Path, key: str) -> bool:
    """Whether ``path`` ends with the trailer of a build of ``key`` whose digest matches its content."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 26)  # a build is ~50 KB; a file this large is no build of ours
            if f.read(1):
                return False
    except OSError:
        return False
    if len(data) <= TRAILER_BYTES:
        return False
    body, trailer = data[:-TRAILER_BYTES], data[-TRAILER_BYTES:]
    expected = TRAILER_MAGIC + key.encode("ascii") + hashlib.sha256(body).digest()
    return secrets.compare_digest(trailer, expected)


def _private(path: Path, kind: str) -> bool:
    """Whether ``path`` is a ``kind`` ("file" or "folder", not a link) of this user, writable by no one else."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    is_kind = stat.S_ISREG(info.st_mode) if kind == "file" else stat.S_ISDIR(info.st_mode)
    owner = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return is_kind and owner and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def load_or_build() -> NativeKernel:
    """Load the cached build (checked: :func:`_private`, its trailer, ABI, self-test), else compile it now.

    Raises:
        NativeUnavailable: no compiler, a failed compile, or a library that fails its checks.
    """
    command = compiler()
    path = library_path(command)
    folder = path.parent
    if path.exists() and not (_private(folder, "folder") and _private(path, "file")):
        logger.info("CPU head: cached native kernel %s is writable by others or not ours; building one", path)
    elif path.exists():
        if not _sealed(path, _key_of(path)):
            logger.info("CPU head: cached native kernel %s is not a sealed build of this key; building it again", path)
        else:
            try:
                return _load(path)
            except NativeUnavailable as error:
                logger.info("CPU head: cached native kernel %s unusable (%s); building it again", path, error)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        cacheable = _private(folder, "folder")
    except OSError:
        cacheable = False
    if cacheable:
        _remove_stale_temporaries(folder)
        target = folder / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            _compile(command, target)
            os.chmod(target, 0o700)  # the compiler honours the umask: 002 would leave a file the cache refuses
            _append_trailer(target, _key_of(path))
            # Checked before it is published, and loaded under a name no earlier load in this process had
            # (the dynamic loader would hand back a library it loaded from ``path`` before).
            kernel = _load(target)
            os.replace(target, path)  # atomic: a concurrent builder's rename leaves a whole build too
        finally:
            target.unlink(missing_ok=True)
        kernel.path = path
        return kernel
    # A cache folder others can write to (or none at all): build and load from a private folder, uncached.
    logger.info("CPU head: %s is not a private folder of this user; building the native kernel uncached", folder)
    with tempfile.TemporaryDirectory(prefix="pacl-native-") as private:
        target = Path(private) / path.name
        _compile(command, target)
        return _load(target)


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete build files that killed processes left (``.pacl-native-*.tmp`` older than ``STALE_SECONDS``)."""
    now = time.time()
    for leftover in folder.glob(".pacl-native-*.tmp"):
        try:
            if now - leftover.lstat().st_mtime > STALE_SECONDS:
                leftover.unlink()
        except OSError:
            pass


def _compile(command: list[str], target: Path) -> None:
    """Compile ``SOURCE`` into the shared library ``target`` (``-march=native``, else portable flags)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pacl-native-src-") as folder:
        source = Path(folder) / "pacl_native.c"
        source.write_text(SOURCE)
        errors = ""
        for flags in (FLAGS, PORTABLE_FLAGS):
            try:
                done = subprocess.run(
                    [*command, *flags, "-o", str(target), str(source)],
                    capture_output=True,
                    text=True,
                    timeout=COMPILE_TIMEOUT,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as error:
                raise NativeUnavailable(f"compiler {command[0]} failed to run: {error}") from error
            if done.returncode == 0:
                seconds = time.perf_counter() - started
                logger.info("CPU head: native kernel compiled in %.2f s (%s)", seconds, command[0])
                return
            errors = (done.stderr or done.stdout).strip().splitlines()
            errors = " / ".join(errors[:3])
    raise NativeUnavailable(f"{command[0]} could not compile the kernel: {errors}")


def _load(path: Path) -> NativeKernel:
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        raise NativeUnavailable(f"{path} does not load: {error}") from error
    try:
        native = NativeKernel(path, library)
    except AttributeError as error:
        raise NativeUnavailable(f"{path} lacks the kernel's functions: {error}") from error
    _self_test(native)
    return native


def _self_test(native: NativeKernel) -> None:
    """A small case against float64: labels and scores, every class and each block's list, and an exp sweep.
    A miscompiled or foreign library fails here, before any image reaches it."""
    generator = torch.Generator().manual_seed(0)
    grid = (torch.rand(3, 4, 21, generator=generator, dtype=torch.float64) * -12.0).float()
    grid[..., 5] = 0.0  # the largest of every point is 0 (fine_grid.relative_logits)
    row_cell, col_cell = torch.tensor([0, 1]), torch.tensor([0, 1, 2])
    row_weight = torch.tensor([[0.0, 0.25, 0.5], [0.75, 1.0, 1.0]])
    col_weight = torch.tensor([[0.125, 0.625], [0.0, 0.5], [0.375, 1.0]])
    row_index, col_index = torch.tensor([[0, 1, 2], [3, 4, 4]]), torch.tensor([[0, 1], [2, 3], [4, 5]])
    exact = grid.double()
    # Each output row's and column's grid point and weight, then the bilinear values in float64: [5, 6, C].
    ys, wy = row_cell.repeat_interleave(3)[[0, 1, 2, 3, 4]], row_weight.reshape(-1)[[0, 1, 2, 3, 4]].double()
    xs, wx = col_cell.repeat_interleave(2), col_weight.reshape(-1).double()
    upper = torch.lerp(exact[ys], exact[ys + 1], wy[:, None, None])  # [5, 4, C]
    want = torch.lerp(upper[:, xs], upper[:, xs + 1], wx[None, :, None])  # [5, 6, C]
    want_labels = want.argmax(-1)
    # With a bound of -6, each block evaluates the classes whose largest corner is within 6 of its floor.
    # Strips (one group of 16 lanes holds the 6 columns) evaluate the classes some cell of the row keeps.
    listed, grouped = torch.empty_like(want), torch.empty_like(want)
    for s in range(2):
        row_dropped = torch.ones(want.shape[-1], dtype=torch.bool)
        for c in range(3):
            corners = exact[row_cell[s] : row_cell[s] + 2, col_cell[c] : col_cell[c] + 2].reshape(4, -1)  # [4, C]
            dropped = corners.amax(0) - corners.amin(0).amax() < -6.0
            row_dropped &= dropped
            block = want[row_index[s][:, None], col_index[c][None, :]]
            listed[row_index[s][:, None], col_index[c][None, :]] = block.masked_fill(dropped, -torch.inf)
        grouped[row_index[s]] = want[row_index[s]].masked_fill(row_dropped, -torch.inf)
    x = torch.linspace(-87.0, 0.0, 4096)
    relative = (native.exp(x).double() / torch.exp(x.double()) - 1).abs().max()
    problems = [f"exp off by {float(relative):.2e} relative"] if not relative < 2e-7 else []
    rows = (row_cell, row_index, row_weight, 1)
    columns = (col_cell.repeat_interleave(2), col_weight.reshape(-1), 1)  # the same columns, one by one
    for bound, dense, by_block, by_group in ((None, 0.0, want, want), (-6.0, 2.0, listed, grouped)):
        for run in ("blocks", "strips", "exact strips"):
            values = by_block if run == "blocks" else by_group
            labels, scores = torch.full((5, 6), -7, dtype=torch.int16), torch.full((5, 6), float("nan"))
            if run == "blocks":
                native.segment_blocks(grid, rows, (col_cell, col_index, col_weight, 1), bound, dense, labels, scores)
            else:
                native.segment_strips(grid, rows, columns, bound, dense, labels, scores, run == "strips")
            if not torch.equal(labels.long(), want_labels):
                problems.append(f"{run}: labels differ (bound {bound})")
            error = float((scores.double() - torch.softmax(values, -1).amax(-1)).abs().max())
            if not error < 1e-6:
                problems.append(f"{run}: scores off by {error:.2e} (bound {bound})")
    logits = torch.randn(3, 4, 21, generator=generator)
    logits[1, 2, 3] = float("nan")
    relative = native.relative_logits(logits, range(1, 4), 100.0, 2).nan_to_num(1.0)
    if not torch.equal(relative, fine_grid.relative_logits(logits[None], range(1, 4), 100.0)[0].nan_to_num(1.0)):
        problems.append("relative logits differ from fine_grid's")
    if problems:
        raise NativeUnavailable(f"{native.path} fails its self-test: {', '.join(problems)}")
