"""A ``pacl-fast serve`` process on this machine's loopback, for scripts, tests and load benchmarks.

    with LocalServer(["--clip", "demo"], log_path=Path("serve.log")) as server:
        httpx.post(f"{server.base}/v1/segment", ...)

The server is a real ``python -m pacl_fast.serve`` child process on a free 127.0.0.1 port, its output
in ``log_path``; entering waits until ``/readyz`` answers 200 (the model is loaded and warm), leaving
stops it. ``start()`` and ``wait_ready()`` are separate for callers that load the model while doing
other work.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """``python -m pacl_fast.serve ARGS --host 127.0.0.1 --port PORT``; see the module docstring."""

    def __init__(self, args: Sequence[str], log_path: Path, ready_timeout: float = 600.0):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.ready_timeout = ready_timeout
        self.args = [sys.executable, "-m", "pacl_fast.serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.process: subprocess.Popen | None = None

    def start(self) -> LocalServer:
        """Start the process (returns at once; the model loads in the background)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        return self

    def wait_ready(self, timeout: float | None = None) -> LocalServer:
        """Wait until ``/readyz`` answers 200; ``RuntimeError`` naming the log if the process exits first
        or ``timeout`` (default ``ready_timeout``) seconds pass."""
        if self.process is None:
            raise RuntimeError("LocalServer.wait_ready() before start()")
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); log: {self.log_path}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=5, trust_env=False).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready in {limit:.0f} s; log: {self.log_path}")
            time.sleep(0.25)

    def log(self) -> str:
        """What the server has printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> LocalServer:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
