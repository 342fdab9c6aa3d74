"""The CI checks of ``tests/conftest.py`` and ``tests/helpers.py`` (``CI=true``, exported by ``.ci/run``): a
skip that no missing hardware explains fails the run, and a backend that the test extra installs fails instead
of skipping when it is unavailable on the CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import pytest

TESTS = Path(__file__).parent

THROWAWAY = """
import pytest
from helpers import skip_unavailable


@pytest.mark.skipif(True, reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_on_a_gpu():
    pass


def test_with_tensorrt():
    pytest.skip("needs TensorRT (pip install pacl-fast[trt]); not installed")


def test_silently_skipped():
    pytest.skip("something is broken here")


def test_broken_onnxruntime():
    skip_unavailable("onnxruntime", RuntimeError("onnxruntime failed to import"))


def test_onnxruntime_on_a_gpu():
    error = RuntimeError("encoder='onnxruntime' on CUDA needs onnxruntime's CUDA execution provider")
    skip_unavailable("onnxruntime", error, device="cuda")


def test_passes():
    pass
"""


def test_on_ci_unexplained_skips_and_unavailable_installed_backends_fail(tmp_path):
    """A throwaway test folder with this conftest, run as .ci/run runs the suite."""
    folder = tmp_path / "tests"
    folder.mkdir()
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(TESTS / name, folder / name)
    (folder / "test_throwaway.py").write_text(THROWAWAY)
    env = {**os.environ, "CI": "true", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(folder)])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 1, out
    assert "1 failed, 1 passed, 4 skipped" in out  # the onnxruntime case on the CPU fails, on a GPU it skips
    assert "CI: encoder 'onnxruntime' is installed by the test extra but unavailable: onnxruntime failed" in out
    unexplained = [line for line in out.splitlines() if line.startswith("UNEXPLAINED SKIP")]
    assert unexplained == ["UNEXPLAINED SKIP tests/test_throwaway.py::test_silently_skipped: something is broken here"]
    assert "CI skip check FAILED: 1 skips that no missing hardware explains" in out


def test_off_ci_an_unavailable_backend_skips(monkeypatch):
    monkeypatch.setattr(helpers, "ON_CI", False)
    with pytest.raises(pytest.skip.Exception, match="onnxruntime failed to import"):
        helpers.skip_unavailable("onnxruntime", RuntimeError("onnxruntime failed to import"))
    assert not helpers.required_on_ci("onnxruntime")


def test_backends_the_test_extra_installs_are_required_on_ci(monkeypatch):
    """onnxruntime's packages are all in the test extra (setup.py); TensorRT's are not."""
    monkeypatch.setattr(helpers, "ON_CI", True)
    assert {"onnx", "onnxruntime", "onnxscript"} <= helpers.packages_of_test_extra()
    assert helpers.required_on_ci("onnxruntime") and not helpers.required_on_ci("tensorrt")
    with pytest.raises(pytest.fail.Exception, match="installed by the test extra"):
        helpers.skip_unavailable("onnxruntime", RuntimeError("onnxruntime failed to import"))
    with pytest.raises(pytest.skip.Exception):  # on a GPU the CPU-only package of the extra may not suffice
        helpers.skip_unavailable("onnxruntime", RuntimeError("no CUDA execution provider"), device="cuda")
