"""Test helper: `spade-ad serve` in a child process (`python -m spade_ad serve ...`), for the tests and the service
benchmark: start it on a free loopback port, wait until /healthz answers, stop it on exit; and `serve_in_thread`, an
application served by uvicorn in a thread of the test process (so a test can reach into the model). The service
itself is `spade_ad.apps.service`; this helper is not part of the library. Tests import it as `child_server` (pytest
puts tests/ on sys.path); benchmarks/bench_service.py puts tests/ on sys.path itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ChildServer", "free_port", "serve_in_subprocess", "serve_in_thread", "wait_until"]


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
def serve_in_subprocess(
    model_path: str | os.PathLike[str], *cli_args: str, timeout: float = 90.0, env: dict[str, str] | None = None
) -> Iterator[ChildServer]:
    """Run `spade-ad serve MODEL --port FREE CLI_ARGS...` in a child process on loopback; yield once /healthz answers.
    `env`: variables added to the child's environment.

    The child is terminated (then killed) on exit. Raises RuntimeError with the log's tail if it does not start."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="spade-serve-") as folder:
        log = Path(folder) / "server.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "spade_ad", "serve", str(model_path), "--port", str(port), *cli_args],
                stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
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


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "a condition") -> None:
    """Poll `condition` every 10 ms until it is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.01)


@contextmanager
def serve_in_thread(app: Any, **config: Any) -> Iterator[str]:
    """Serve the ASGI `app` with uvicorn in a thread of this process on a free loopback port (uvicorn.Config
    options in `config`); yield its base URL; stop it on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, what="the in-process server")
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
