"""Test helper: `spade-ad serve` in a child process (`python -m spade_ad serve ...`), for the tests and the service
benchmark: start it on a free loopback port, wait until /healthz answers, stop it on exit. The service itself is
`spade_ad.service`; this helper is not part of the library. Tests import it as `child_server` (pytest puts tests/ on
sys.path); benchmarks/bench_service.py puts tests/ on sys.path itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ChildServer", "free_port", "serve_in_subprocess"]


@dataclass(frozen=True)
class ChildServer:
    """A `spade-ad serve` child process: its base URL, process and log file (stdout and stderr)."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def serve_in_subprocess(model_path: str | os.PathLike[str], *cli_args: str, timeout: float = 90.0) -> Iterator[
    ChildServer
]:
    """Run `spade-ad serve MODEL --port FREE CLI_ARGS...` in a child process on loopback; yield once /healthz answers.

    The child is terminated (then killed) on exit. Raises RuntimeError with the log's tail if it does not start."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="spade-serve-") as folder:
        log = Path(folder) / "server.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "spade_ad", "serve", str(model_path), "--port", str(port), *cli_args],
                stdout=sink, stderr=subprocess.STDOUT,
            )
        try:
            _wait_healthy(url, process, log, timeout)
            yield ChildServer(url, process, log)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    state = f"exited with {process.returncode}" if process.poll() is not None else f"not healthy after {timeout:.0f} s"
    raise RuntimeError(f"spade-ad serve {state}; its log ends:\n{tail}")
