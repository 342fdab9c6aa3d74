"""Shared fixtures. Everything a test needs is made here, nothing is downloaded."""

from __future__ import annotations

import os
import signal
import tempfile

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

# pytest-xdist's workers ignore SIGINT, and a child process inherits an ignored signal: the Ctrl-C tests'
# subprocesses would then never see theirs. Each test process takes Ctrl-C as an interactive one does.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import helpers  # noqa: E402 - after the environment above
from helpers import make_segmenter, quiet_load_clip, random_pacl  # noqa: E402, F401 - also for older imports

from pacl_fast.demo import TINY_CLIP_CONFIG  # noqa: E402
from pacl_fast.model import PACL  # noqa: E402


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


@pytest.fixture(scope="module")
def tiny_model(tiny_config) -> PACL:
    """PACL on the tiny random CLIP (seed 0), MLP branch made to count; one per test module (tests that
    change it work on a copy)."""
    return random_pacl(tiny_config)


@pytest.fixture(scope="module")
def segmenter(tiny_config):
    """The tiny random PACL segmenter, eager fp32 on the CPU (``helpers.make_segmenter``'s defaults); one per
    test module."""
    return make_segmenter(tiny_config)


# ---- CI: a skip that no missing hardware explains fails the run (the rules are in helpers.py) ---------------

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
    allowed = helpers.allowed_skips()
    return [(nodeid, reason) for nodeid, reason in _SKIPS if not any(p.search(reason) for p in allowed)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """On CI, a skip that no hardware explains fails the run (exit status 1), listed in the summary."""
    if helpers.ON_CI and exitstatus == pytest.ExitCode.OK and unexplained_skips():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    if not helpers.ON_CI:
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
            "tests/helpers.py (no CUDA, no TensorRT, CPU features) may skip. Fix the install or the test.",
            red=True,
        )
