"""Shared fixtures. Everything a test needs is made here, nothing is downloaded."""

from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Exported graphs and cached text embeddings of the tests' random models go to a throwaway folder,
# never to the user's ~/.cache/pacl-fast.
os.environ.setdefault("PACL_FAST_CACHE", tempfile.mkdtemp(prefix="pacl-fast-test-cache-"))
# Without CUDA the Triton kernels are tested in the interpreter. Triton reads TRITON_INTERPRET when
# it is first imported (open_clip imports it), so this must come before any other import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pacl_fast.backbone import RandomWeightsWarning, load_clip  # noqa: E402
from pacl_fast.demo import TINY_CLIP_CONFIG  # noqa: E402
from pacl_fast.model import PACL  # noqa: E402


def quiet_load_clip(*args, **kwargs):
    """load_clip without the random-weights warning (tests use random CLIPs on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return load_clip(*args, **kwargs)


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return TINY_CLIP_CONFIG


@pytest.fixture(scope="session")
def tiny_backbone(tiny_config):
    torch.manual_seed(0)
    return quiet_load_clip(tiny_config)


@pytest.fixture()
def tiny_pacl(tiny_backbone) -> PACL:
    torch.manual_seed(1)
    model = PACL(tiny_backbone)
    # Make the MLP branch non-trivial so that tests see it (it starts at zero by design).
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


_SKIPS: list[tuple[str, str]] = []  # (test id, reason) of every skip in this session


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def unexplained_skips() -> list[tuple[str, str]]:
    allowed = allowed_skips()
    return [(nodeid, reason) for nodeid, reason in _SKIPS if not any(p.search(reason) for p in allowed)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """On CI, a skip that no hardware explains fails the run (exit status 1), listed in the summary."""
    if ON_CI and exitstatus == pytest.ExitCode.OK and unexplained_skips():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    if not ON_CI:
        return
    unexplained = unexplained_skips()
    if unexplained:
        title = f"CI skip check FAILED: {len(unexplained)} skips that no missing hardware explains"
        terminalreporter.write_sep("=", title, red=True)
    else:
        terminalreporter.write_sep("=", f"CI skip check: all {len(_SKIPS)} skips are hardware ones", green=True)
    for nodeid, reason in unexplained:
        terminalreporter.write_line(f"UNEXPLAINED SKIP {nodeid}: {reason}", red=True)
    if unexplained:
        terminalreporter.write_line(
            "On CI every backend the test extra installs must run: only the reasons of HARDWARE_SKIPS in "
            "tests/conftest.py (no CUDA, no TensorRT, CPU features) may skip. Fix the install or the test.",
            red=True,
        )
