"""What the commands share: the help formatter, number and list types, the model options, the
segmenter they build, and the wrapper that turns a command's errors into one line.

Light on purpose: nothing here imports torch until a command runs, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pacl_fast.choices import (
    AUTO,
    DEFAULT_MAX_PIXELS,
    DEFAULT_VFM,
    DTYPE_CHOICES,
    ENCODER_CHOICES,
    HEAD_BACKENDS,
    METHODS,
    TEMPLATE_PRESETS,
    TEXT_DTYPES,
    VFM_METHODS,
    VFMS,
)

if TYPE_CHECKING:
    from pacl_fast.distributed import DistInfo
    from pacl_fast.images import SlidingWindow
    from pacl_fast.segmenter import Segmenter


class Options(Protocol):
    """Where options are added: a parser or one of its groups."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action: ...


class Subcommands(Protocol):
    """What ``ArgumentParser.add_subparsers()`` returns: each command's ``add_parser(sub)`` registers on it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


class HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


WEIGHTS_HELP = (
    "PACL weights (.safetensors): train them with train/train.py (see the README's Training section), or use "
    "--clip demo for the synthetic-world demo weights; without them a training-free method runs on the CLIP"
)


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose``, which every command has (see :func:`command_logging`)."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show other libraries' INFO log lines (open_clip, ONNX export, uvicorn); tracebacks: "
        "PACL_FAST_DEBUG=1",
    )


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------------------- option types


def checked_number(name: str, convert: Callable[[str], float], ok: Callable[[float], bool], expected: str):
    """An argparse ``type``: ``convert(text)`` that passes ``ok``, else "NAME must be EXPECTED, got 'TEXT'"."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{name} must be {expected}, got {text!r}")
        return value

    return parse


def positive_int(name: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= 1, else an error naming the option ``name``."""
    return checked_number(name, int, lambda value: value >= 1, "a positive integer")


probability = checked_number("--background-threshold", float, lambda value: 0.0 <= value <= 1.0,
                             "a probability in [0, 1]")  # fmt: skip


def non_negative_int(name: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= 0, else an error naming the option ``name``."""
    return checked_number(name, int, lambda value: value >= 0, "an integer >= 0")


def labels_list(text: str) -> list[str]:
    """``--labels a,b,c`` -> ``["a", "b", "c"]``; an empty name, or one class named twice (also in another
    case or spacing: whatever CLIP's tokenizer reads as the same text, the library's rule,
    :func:`pacl_fast.prompts.same_to_tokenizer`), is an error before any model loads."""
    from pacl_fast.prompts import same_to_tokenizer

    labels = [label.strip() for label in text.split(",")]
    if not all(labels):
        raise argparse.ArgumentTypeError(f"--labels has an empty name in {text!r}; give 'a,b,c'")
    same = same_to_tokenizer(labels)
    if same:
        first, label = same[0]
        twice = f"{label!r} twice" if first == label else f"{first!r} and {label!r}, one name to CLIP's tokenizer"
        raise argparse.ArgumentTypeError(f"--labels has {twice}: give each class once")
    return labels


def sliding_window(text: str) -> SlidingWindow | bool:
    """``CROP,STRIDE[,SHORT]`` -> :class:`~pacl_fast.images.SlidingWindow`; ``off`` -> False (no window, whatever
    the model's default)."""
    from pacl_fast.images import SlidingWindow

    if text.strip().lower() == "off":
        return False
    try:
        parts = [int(v) for v in text.split(",")]
        return SlidingWindow(*parts)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(
            f"--sliding-window expects CROP,STRIDE[,SHORT_SIDE] or off, got {text!r}"
        ) from error


# ------------------------------------------------------------------- the model's defaults (pacl_fast.defaults)

#: Help of the options whose default is the model's (``Segmenter.defaults``), the same in every command.
TEMPLATES_HELP = (
    f"prompt templates: {', '.join(TEMPLATE_PRESETS)} (imagenet: CLIP's 80), or one like 'a photo of a {{}}.' "
    "(default: the model's: synthetic for --clip demo and PACL weights trained on the synthetic world, else imagenet)"
)
THRESHOLD_HELP = (
    "winner probability under which a pixel is background (label 255 in PNGs); default: the model's (none for "
    "most, 0.95 for --clip demo); 0: none"
)
WINDOW_HELP = "sliding-window inference, e.g. 448,224,448; default: the model's (none for most); off: none"


# --------------------------------------------------------------------------------------- model options


def add_weights_arguments(group: Options) -> None:
    """Options that choose the CLIP, the method, the PACL weights and the device."""
    group.add_argument(
        "--clip",
        default="ViT-B-16",
        help="open_clip model name, local-dir:PATH, or 'demo' (the shipped synthetic-world CLIP + PACL weights)",
    )
    group.add_argument("--clip-weights", default=None, help="open_clip pretrained tag (hub) or local checkpoint file")
    group.add_argument("--pacl-weights", default=None, type=Path, help=WEIGHTS_HELP)
    group.add_argument(
        "--method",
        default=None,
        choices=METHODS,
        help="pacl (needs --pacl-weights), a training-free method on the CLIP alone, or proxyclip (the CLIP with a "
        "vision foundation model: --vfm); default: pacl with --pacl-weights, else naclip",
    )
    group.add_argument(
        "--vfm",
        default=None,
        choices=VFMS,
        help=f"--method proxyclip: the vision foundation model whose attention it borrows (default {DEFAULT_VFM}, "
        "the authors'); its grid, finer than the CLIP's, is the output's",
    )
    group.add_argument(
        "--vfm-weights",
        default=None,
        help="--method proxyclip: the VFM's weights, a local file (the authors' hub checkpoint, e.g. "
        "dino_vitbase8_pretrain.pth, or timm's state dict) or 'timm' (timm downloads them); default: random init",
    )
    group.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    group.add_argument(
        "--no-strict-clip",
        dest="strict_clip",
        action="store_false",
        help="use --pacl-weights recorded for another CLIP (the library's strict_clip=False): only when you know "
        "the two CLIPs hold the same weights (default: refused)",
    )


#: ``--batch-size`` as most commands have it (``serve`` makes it follow ``--max-batch``).
BATCH_SIZE = {"default": 8, "help": "images per encoder call"}
#: ``--no-text-cache`` as most commands have it (``serve`` keeps client label sets off disk by default).
NO_TEXT_CACHE = {
    "action": "store_true",
    "help": "do not keep class-name embeddings on disk ($PACL_FAST_CACHE/text; also PACL_FAST_NO_TEXT_CACHE=1)",
}


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    batch_size: dict[str, Any] = BATCH_SIZE,
    no_text_cache: dict[str, Any] = NO_TEXT_CACHE,
) -> Options:
    """Options that choose the CLIP, the method and the runtime (shared by subcommands), in a "model" group.

    ``batch_size`` and ``no_text_cache``: the ``add_argument`` keywords of those two options, for a command
    whose defaults differ.
    """
    group = parser.add_argument_group("model")
    add_weights_arguments(group)
    group.add_argument(
        "--dtype",
        default=AUTO,
        choices=DTYPE_CHOICES,
        help="encoder precision; auto: the fastest this device runs natively (bf16 on CPUs with AVX512-BF16 or "
        "AMX and GPUs from Ampere, else fp32; the first stderr line says which and why); int8: OpenVINO only "
        "(NNCF-quantised; calibrated by `pacl-fast export --format openvino`, else on synthetic scenes)",
    )
    group.add_argument(
        "--image-size",
        type=positive_int("--image-size"),
        default=None,
        help="short side the model sees (default: the model's: what its weights record, else the CLIP's own)",
    )
    group.add_argument(
        "--backend",
        default="fast",
        choices=HEAD_BACKENDS,
        help="head backend: fast (Triton on CUDA, tiled on CPU), reference, tiled, triton",
    )
    group.add_argument("--batch-size", type=positive_int("--batch-size"), **batch_size)
    group.add_argument(
        "--encoder",
        default=AUTO,
        choices=ENCODER_CHOICES,
        help="image/text encoder backend; auto: eager torch, or OpenVINO where installed and its model is cached "
        "or the run is long enough to pay its build (the first stderr line says which and why)",
    )
    group.add_argument(
        "--encoder-cache", type=Path, default=None, help="exported graphs / engines (default ~/.cache/pacl-fast)"
    )
    group.add_argument(
        "--text-dtype",
        default=None,
        choices=TEXT_DTYPES,
        help="precision of the text tower (torch/compile encoders; default float32: it runs once per vocabulary)",
    )
    group.add_argument("--no-text-cache", **no_text_cache)
    return group


def check_weights_files(args: argparse.Namespace) -> None:
    """Fail fast on weight files that do not exist, before minutes of model loading."""
    if args.pacl_weights is not None and not args.pacl_weights.is_file():
        raise UsageError(f"--pacl-weights {args.pacl_weights}: no such file. {WEIGHTS_HELP}")
    if args.clip_weights is not None and (os.sep in args.clip_weights or args.clip_weights.endswith(
        (".safetensors", ".bin", ".pt", ".pth"))) and not Path(args.clip_weights).is_file():  # fmt: skip
        raise UsageError(f"--clip-weights {args.clip_weights}: no such file (give a local checkpoint or a tag)")
    if args.pacl_weights is not None and args.method not in (None, "pacl"):
        raise UsageError(f"--pacl-weights is used only by --method pacl, not {args.method}: drop one of them")
    vfm_options = [option for option, value in (("--vfm", args.vfm), ("--vfm-weights", args.vfm_weights)) if value]
    if vfm_options and args.method not in VFM_METHODS:
        method = f"--method {args.method}" if args.method else "the default method"
        raise UsageError(
            f"{' and '.join(vfm_options)} given with {method}: a vision foundation model is used only by "
            f"--method {' or '.join(VFM_METHODS)}"
        )
    if args.vfm_weights not in (None, "timm") and not Path(args.vfm_weights).is_file():
        raise UsageError(f"--vfm-weights {args.vfm_weights}: no such file (give the VFM's checkpoint, or 'timm')")


def check_text(labels: Sequence[str] | None, templates: str | None) -> None:
    """Class names and templates checked as the text side checks them, before any model loads."""
    from pacl_fast.prompts import template_set, validate_labels

    try:
        if labels is not None:
            validate_labels(labels)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--labels: {error}") from None
    try:
        if templates is not None:
            template_set(templates)
    except ValueError as error:
        raise UsageError(f"--templates {templates!r}: {error}") from None


def encoder_choice(args: argparse.Namespace) -> tuple[str, str | None, dict]:
    """``--encoder``, ``--dtype`` and ``--encoder-cache`` as the encoder, its dtype and options (int8 is an
    OpenVINO precision, so with ``--encoder auto`` it is OpenVINO; ``--text-dtype`` makes auto choose torch)."""
    options = {"cache_dir": args.encoder_cache} if args.encoder_cache is not None else {}
    if args.text_dtype is not None:
        if args.encoder not in ("torch", "compile", AUTO):
            raise UsageError(f"--text-dtype applies to the torch and compile encoders, not {args.encoder}")
        options["text_dtype"] = args.text_dtype
    if args.dtype != "int8":
        return args.encoder, args.dtype, options
    if args.encoder not in ("openvino", AUTO):
        raise UsageError(f"--dtype int8 runs on --encoder openvino only, not {args.encoder}")
    if "text_dtype" in options:
        raise UsageError("--dtype int8 runs on OpenVINO, which takes no --text-dtype: drop one of them")
    return "openvino", None, {**options, "precision": "int8"}


def distributed(args: argparse.Namespace) -> tuple[DistInfo, str]:
    """Join ``torchrun``'s process group when there is one; pick this rank's device."""
    import torch

    from pacl_fast.distributed import init_distributed

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist = init_distributed("cuda" if device.startswith("cuda") else "cpu")
    if device == "cuda" and dist.enabled:
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    return dist, device


def make_segmenter(
    args: argparse.Namespace,
    device: str | None,
    *,
    expected_images: float | None,
    logit_scale: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    announce: bool = True,
) -> Segmenter:
    """The :class:`~pacl_fast.segmenter.Segmenter` the model options ask for; ``expected_images``: how many
    images the command will segment (``math.inf``: a service), for ``--encoder auto``; ``announce``: say on
    stderr which method runs on what, the encoder and precision chosen and why, and the model's defaults (the
    first line a user reads, see :func:`say`)."""
    from pacl_fast.segmenter import Segmenter

    encoder, dtype, options = encoder_choice(args)
    segmenter = Segmenter(
        args.clip,
        args.clip_weights,
        args.pacl_weights,
        method=args.method,
        device=device,
        dtype=dtype,
        image_size=args.image_size,
        backend=args.backend,
        batch_size=args.batch_size,
        encoder=encoder,
        encoder_options=options or None,
        logit_scale=logit_scale,
        max_pixels=max_pixels,
        text_cache=False if args.no_text_cache else None,
        strict_clip=args.strict_clip,
        vfm=args.vfm,
        vfm_weights=args.vfm_weights,
        expected_images=expected_images,
    )
    if announce:
        say(repr(segmenter))  # which method runs, on what
    return segmenter


# --------------------------------------------------------------------------- long runs (eval, classify)


def add_run_arguments(parser: argparse.ArgumentParser, default_save_every: int) -> None:
    """Options of long, resumable, shardable runs (eval, classify --image-folder)."""
    group = parser.add_argument_group("run")
    group.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    group.add_argument("--limit", type=int, default=None, help="only the first N images (a quick look, not comparable)")
    group.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="partial results for resuming (default: JSON.partial next to --json, else ./pacl-<task>.partial); "
        "removed when the run completes",
    )
    group.add_argument("--restart", action="store_true", help="discard saved partial results and start over")
    group.add_argument(
        "--save-every",
        type=positive_int("--save-every"),
        default=default_save_every,
        help="images between state saves",
    )
    group.add_argument(
        "--workers", type=non_negative_int("--workers"), default=2, help="image-decoding processes per rank"
    )


def state_dir(args: argparse.Namespace, task: str) -> Path:
    """Where a resumable run keeps its partial results (``--state-dir``, else next to ``--json``, else here)."""
    if args.state_dir is not None:
        return args.state_dir
    if args.json is not None:
        return args.json.with_name(args.json.name + ".partial")
    return Path(f"pacl-{task}.partial")


def run_options(args: argparse.Namespace, dist: DistInfo, partial: Path) -> dict[str, Any]:
    """The run options as the keyword arguments of ``evaluate_segmentation`` / ``evaluate_classification``."""
    return {"limit": args.limit, "dist": dist, "state_dir": partial, "save_every": args.save_every,
            "workers": args.workers}  # fmt: skip


@contextmanager
def resumable(partial: Path, save_every: int) -> Iterator[None]:
    """Ctrl-C during a resumable run: say where its partial results are and that the same command resumes."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(
            f"the results saved so far (every {save_every} images, and every minute) are in {partial}: run the "
            "same command again to resume from them"
        ) from None


def path_text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def write_json(path: Path | None, payload: dict) -> None:
    """The results as JSON at ``path`` (atomically) and a line saying so; nothing without ``--json``."""
    import json

    from pacl_fast.files import atomic_write

    if path is not None:
        atomic_write(path, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


# ------------------------------------------------------------------------------------- where time goes

#: ``PACL_FAST_TIMINGS=1``: a command ends with one stderr line saying where its seconds went (:class:`Timings`).
TIMINGS_ENV = "PACL_FAST_TIMINGS"


class Timings:
    """Where a command's seconds go, measured inside the real command: one stderr line at its end,
    ``timings: imports 3.1 s, model 1.2 s, text 0.3 s, images 0.9 s, writing 0.1 s, other 0.2 s, total 5.8 s``.

    Each second is charged to exactly one phase: the innermost one running (:meth:`phase`), so phases exclude
    the phases and imports inside them and the parts add up to the total. ``imports`` counts from the
    process's start (the interpreter's own start-up and the modules imported before the command runs), then
    every ``import`` statement wherever it runs (an import hook on this thread; ``importlib.import_module``
    called outside an import statement is charged to the phase that calls it). ``other``: what no phase
    claims (options, inputs, checks, the summary). ``total``: the process's age at the line; what a caller
    measures beyond it is the interpreter's exit.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"imports": process_age() or 0.0}  # the start-up, before this clock
        self.stack = ["other"]
        self.thread = threading.get_ident()
        self.last = time.perf_counter()
        self.saved_import = None

    def charge(self) -> None:
        """The seconds since the last change, to the innermost phase running."""
        now = time.perf_counter()
        top = self.stack[-1]
        self.seconds[top] = self.seconds.get(top, 0.0) + now - self.last
        self.last = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """The block's seconds are ``name``'s (those of phases and imports inside it are theirs)."""
        self.charge()
        self.stack.append(name)
        try:
            yield
        finally:
            self.charge()
            self.stack.pop()

    def timed(self, name: str, function: Callable) -> Callable:
        """``function`` with its calls charged to phase ``name``."""

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return function(*args, **kwargs)

        return timed_call

    def install(self) -> None:
        """Charge ``import`` statements (this thread's, outermost only) to ``imports`` until :meth:`uninstall`."""
        import builtins

        original = self.saved_import = builtins.__import__

        def timed_import(*args: Any, **kwargs: Any) -> Any:
            if self.stack[-1] == "imports" or threading.get_ident() != self.thread:
                return original(*args, **kwargs)
            with self.phase("imports"):
                return original(*args, **kwargs)

        builtins.__import__ = timed_import

    def uninstall(self) -> None:
        import builtins

        if self.saved_import is not None:
            builtins.__import__ = self.saved_import
            self.saved_import = None

    def line(self) -> str:
        """``timings: imports 3.1 s, ..., total 5.8 s``: the phases in the order a command meets them."""
        self.charge()
        order = ("imports", "model", "text", "images", "writing")
        names = [name for name in order if name in self.seconds]
        names += [name for name in self.seconds if name not in order and name != "other"] + ["other"]
        total = sum(self.seconds.values())
        parts = [f"{name} {self.seconds.get(name, 0.0):.2f} s" for name in names]
        return "timings: " + ", ".join([*parts, f"total {total:.2f} s"])


def process_age() -> float | None:
    """Seconds since this process started (Linux: ``/proc/self/stat``'s start time against the boot clock, in
    clock ticks of 10 ms); None where the system does not say."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, ticks after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


#: The running command's :class:`Timings` (None: not asked for), set by :func:`run_command`.
_timings: Timings | None = None


@contextmanager
def phase(name: str) -> Iterator[None]:
    """A phase of the running command for ``PACL_FAST_TIMINGS`` (nothing when it is not set)."""
    if _timings is None:
        yield
    else:
        with _timings.phase(name):
            yield


def timings_on() -> bool:
    """Whether the running command reports its timings (``PACL_FAST_TIMINGS``)."""
    return _timings is not None


def timed(name: str, function: Callable) -> Callable:
    """``function``, its calls a phase ``name`` of the running command when ``PACL_FAST_TIMINGS`` is set."""
    return function if _timings is None else _timings.timed(name, function)


@contextmanager
def timings_report() -> Iterator[None]:
    """While a command runs, its :class:`Timings` when ``PACL_FAST_TIMINGS`` is set, and the line at its end."""
    global _timings
    if not os.environ.get(TIMINGS_ENV) or _timings is not None:
        yield
        return
    _timings = Timings()
    _timings.install()
    try:
        yield
    finally:
        _timings.uninstall()
        line, _timings = _timings.line(), None
        say(line)


# --------------------------------------------------------------------------------------- running one


def say(message: str) -> None:
    """A status line on stderr, ``pacl-fast: MESSAGE`` (results go to stdout)."""
    print(f"pacl-fast: {message}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """Ctrl-C, with what was done and how to resume, in the command's words (exit code 130)."""


#: Loggers whose INFO lines are shown without ``--verbose``: ours, and what a command asks for (``serve``:
#: the access log).
OWN_LOGGERS = ("pacl_fast",)


class _Shown(logging.Filter):
    """Our INFO lines and everyone's warnings; other libraries' INFO only with ``--verbose``."""

    def __init__(self, verbose: bool, also: tuple[str, ...]):
        super().__init__()
        self.verbose = verbose
        self.ours = (*OWN_LOGGERS, *also)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.levelno >= logging.WARNING:
            return True
        return any(record.name == name or record.name.startswith(name + ".") for name in self.ours)


class _AboveProgressBars(logging.StreamHandler):
    """Writes each line above any tqdm progress bar on the stream, instead of into the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as StreamHandler.emit: logging must not raise
            self.handleError(record)


def _warning_line(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    """A Python warning while a command runs, as one log line (``pacl-fast: warning: MESSAGE``): Python's own
    form names a source file and line of ours and quotes that line, which tells a user nothing."""
    logging.getLogger("pacl_fast.cli").warning("warning: %s", message)


@contextmanager
def command_logging(verbose: bool = False, also: tuple[str, ...] = ()) -> Iterator[None]:
    """While a command runs: log lines on stderr as ``pacl-fast: MESSAGE``, ours from INFO up, other
    libraries' (open_clip, onnx, uvicorn...) from WARNING up unless ``verbose``; ``also``: more loggers
    shown from INFO up; Python warnings as one line each (with ``verbose``, Python's own form). Restored
    afterwards, so commands run in one process (tests) do not stack handlers."""
    root = logging.getLogger()
    handler = _AboveProgressBars(sys.stderr)
    handler.setFormatter(logging.Formatter("pacl-fast: %(message)s"))
    handler.addFilter(_Shown(verbose, also))
    saved, saved_warning = root.level, warnings.showwarning
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if not verbose:
        warnings.showwarning = _warning_line
    try:
        yield
    finally:
        warnings.showwarning = saved_warning
        root.removeHandler(handler)
        root.setLevel(saved)


def run_command(name: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)`` as a command: logging to stderr (:func:`command_logging`), and errors as one line that
    says what to do (``PACL_FAST_DEBUG=1``: the traceback instead). Ctrl-C ends it on a fresh line (a
    progress bar may hold the current one) with what was done, if the command said (:class:`Interrupted`)."""
    with command_logging(getattr(args, "verbose", False), getattr(args, "show_loggers", ())), timings_report():
        if os.environ.get("PACL_FAST_DEBUG"):
            return run(args)
        from pacl_fast.encoders.base import EncoderUnavailableError

        try:
            return run(args)
        except (KeyboardInterrupt, Interrupted) as interrupt:
            done = f": {interrupt}" if isinstance(interrupt, Interrupted) else ""
            let_progress_bars_close(interrupt)
            print(f"\npacl-fast {name}: interrupted{done}", file=sys.stderr)
            return 130
        except (UsageError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError, TypeError,
                EncoderUnavailableError) as error:  # fmt: skip
            print(f"pacl-fast {name}: error: {cli_words(str(error))}", file=sys.stderr)
            print("  (set PACL_FAST_DEBUG=1 for the traceback)", file=sys.stderr)
            return 2
        except ImportError as error:  # an optional package the chosen options need (OpenCV, timm, OpenVINO...)
            print(f"pacl-fast {name}: error: {missing_package(error)}", file=sys.stderr)
            print("  (set PACL_FAST_DEBUG=1 for the traceback)", file=sys.stderr)
            return 2


#: Modules whose pip package has another name, or that an extra of ours installs.
PIP_PACKAGES = {
    "cv2": "opencv-python-headless",
    "PIL": "pillow",
    "timm": 'timm (or pip install -e ".[vfm]")',
    "onnx": 'onnx onnxscript (or pip install -e ".[onnx]")',
    "onnxruntime": 'onnxruntime (or pip install -e ".[onnx]")',
    "openvino": 'openvino (or pip install -e ".[openvino]")',
    "nncf": 'nncf (or pip install -e ".[openvino]")',
    "fastapi": 'fastapi uvicorn (or pip install -e ".[serve]")',
    "webdataset": 'webdataset (or pip install -e ".[train]")',
}


def missing_package(error: ImportError) -> str:
    """One line for an import that failed: which module, and the pip command that installs it."""
    module = (error.name or "").split(".")[0]
    if isinstance(error, ModuleNotFoundError) and module:
        install = PIP_PACKAGES.get(module, module)
        return f"these options need the Python package {module!r}, which is not installed: pip install {install}"
    return f"an installed package failed to import ({error}); reinstall it"


def let_progress_bars_close(error: BaseException) -> None:
    """Drop the interrupted work's frames (held by the exception's traceback and context), so that its
    progress bars close now, ending their line, rather than after the command's last words."""
    import gc

    error.__context__ = error.__cause__ = None
    error.__traceback__ = None
    gc.collect()


#: Library arguments that errors name -> the options that set them.
LIBRARY_ARGUMENTS = {"strict_clip=False": "--no-strict-clip"}


def cli_words(message: str) -> str:
    """An error of the library with the options of the command line in place of the arguments it names."""
    for argument, option in LIBRARY_ARGUMENTS.items():
        message = message.replace(argument, option)
    return message
