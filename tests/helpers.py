"""Plain helpers shared by the test files (fixtures and pytest hooks live in ``conftest.py``).

``conftest.py`` sets the environment (offline hub, throwaway cache, ``TRITON_INTERPRET``) before anything
here imports ``pacl_fast``: pytest loads it before any test module, so import this module from tests only.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pacl_fast.backbone import RandomWeightsWarning, load_clip
from pacl_fast.model import PACL

ROOT = Path(__file__).resolve().parents[1]  # the repository: children import its pacl_fast

# ---- models ---------------------------------------------------------------------------------------------

#: The smallest CLIP the engine runs: one block a tower. For tests of caches, files and errors, where what is
#: proved does not depend on the model's depth and each ONNX export of it costs about half the tiny CLIP's.
MICRO_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def quiet_load_clip(*args, **kwargs):
    """load_clip without the random-weights warning (tests use random CLIPs on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return load_clip(*args, **kwargs)


def random_pacl(arch, seed: int = 0) -> PACL:
    """PACL on a random CLIP of ``arch`` (a name or a config), in eval mode, its MLP branch made to count
    (it starts at zero by design, which would hide it from the tests)."""
    torch.manual_seed(seed)
    model = PACL(quiet_load_clip(arch)).eval()
    torch.nn.init.normal_(model.embedder.fc2.weight, std=0.05)
    return model


def make_segmenter(config, pacl_weights=None, **kwargs):
    from pacl_fast.segmenter import Segmenter

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        kwargs.setdefault("method", "pacl")  # most tests exercise PACL; training-free methods ask for theirs
        # Eager fp32 unless a test asks: tolerances here are fp32's, and the auto choice (bf16 or OpenVINO on
        # some machines) would make them depend on the machine. The auto choice has tests of its own.
        kwargs.setdefault("dtype", None)
        kwargs.setdefault("encoder", "torch")
        return Segmenter(config, pacl_weights=pacl_weights, device="cpu", **kwargs)


# ---- files --------------------------------------------------------------------------------------------


def png_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A random RGB picture ``size`` (rows, columns) encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> None:
    """A tar shard holding ``members`` (name, bytes) in order, as webdataset writes them (``mode``: tarfile's,
    e.g. ``"w:gz"``)."""
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


#: A child that sits inside ``atomic_write`` with its temporary file half written until told to go on.
_WRITER = """
import sys
from pacl_fast.files import atomic_write

def write(f):
    f.write(b"half")
    f.flush()
    print("writing", flush=True)
    sys.stdin.readline()  # holds its temporary file until told to go on
    f.write(b" and the rest")

atomic_write(sys.argv[1], write)
"""


@contextlib.contextmanager
def writer_in_progress(path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Another process inside ``atomic_write(path)``, holding its half-written temporary file:
    yields ``(process, temporary)``; writing a line to its stdin lets it finish."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert process.stdout.readline().strip() == b"writing"
        (temporary,) = [p for p in path.parent.iterdir() if f"-{process.pid}-" in p.name]
        yield process, temporary
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stdin.close()
        process.stdout.close()


def killed_write(path: Path) -> Path:
    """The temporary file an ``atomic_write(path)`` killed with SIGKILL in the middle leaves behind
    (``path`` itself is left as it was)."""
    before = path.read_bytes() if path.exists() else None
    with writer_in_progress(path) as (process, temporary):
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert temporary.is_file() and (path.read_bytes() if path.exists() else None) == before
    return temporary


def opencv():  # noqa: ANN201 - the cv2 module
    """OpenCV, which the protocols resize with (a dependency of pacl-fast; CI fails on this skip)."""
    return pytest.importorskip("cv2", reason="needs OpenCV (opencv-python-headless, a dependency of pacl-fast)")


# ---- the service --------------------------------------------------------------------------------------


def wait_ready(client, timeout: float = 120.0) -> None:  # noqa: ANN001 - a fastapi TestClient
    """Wait until the service's ``/readyz`` answers 200 (the model is loaded and warm)."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the service never became ready"
        time.sleep(0.05)


# ---- CI: backends the test extra installs must run, and every skip must be a known hardware one ----------

#: ``CI=true`` (``.ci/run`` exports it): a backend whose packages the ``test`` extra installs must run on CPU
#: instead of skipping, and the run fails if any test skips for a reason that :func:`allowed_skips` does not list.
ON_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

#: Encoder backends -> the distributions they need (beyond torch) and the skip reason they give without them.
BACKEND_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "onnxruntime": (("onnx", "onnxruntime", "onnxscript"), r"needs onnxruntime|ONNX export needs"),
    "openvino": (("onnx", "onnxscript", "openvino"), r"needs OpenVINO"),
}

#: Skip reasons that hardware explains: no GPU, no TensorRT (a GPU library), no GPU build of onnxruntime (a
#: package of its own, onnxruntime-gpu), a CPU without bf16 units; and with CUDA, the interpreter cases
#: (Triton compiles for the GPU there).
HARDWARE_SKIPS = (
    r"needs a CUDA device",
    r"needs TensorRT",
    r"needs onnxruntime's CUDA execution provider",
    r"TensorRT (and CUDA )?(is|are) (installed|present)",
    r"AVX512-BF16 or AMX",
    *((r"Triton interpreter not active",) if torch.cuda.is_available() else ()),
)


def packages_of_test_extra() -> set[str]:
    """Distributions that ``pip install -e ".[test]"`` installs, from the installed package's metadata."""
    requirements = importlib.metadata.requires("pacl-fast") or []
    extra = re.compile(r"""extra\s*==\s*["']test["']""")
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements if extra.search(r)}


def required_on_ci(backend: str) -> bool:
    """Whether ``backend`` must run (not skip) on a CPU CI machine: the test extra installs all it needs."""
    packages = BACKEND_PACKAGES.get(backend, ((), ""))[0]
    return ON_CI and bool(packages) and set(packages) <= packages_of_test_extra()


def skip_unavailable(backend: str, error: Exception, device: str = "cpu") -> None:
    """Skip a test whose encoder backend cannot run here (``EncoderUnavailableError``), saying why; but on CI
    fail instead when the test extra installs that backend's packages and the test runs on the CPU: a broken
    install must not turn every case of a backend into a skip."""
    if device == "cpu" and required_on_ci(backend):
        pytest.fail(f"CI: encoder {backend!r} is installed by the test extra but unavailable: {error}", pytrace=False)
    pytest.skip(str(error))


def allowed_skips() -> list[re.Pattern]:
    """Skip reasons CI accepts: hardware, and backends that the test extra does not install."""
    patterns = list(HARDWARE_SKIPS)
    patterns += [reason for name, (_, reason) in BACKEND_PACKAGES.items() if not required_on_ci(name)]
    return [re.compile(pattern) for pattern in patterns]
