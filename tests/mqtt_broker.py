"""A throw-away Mosquitto broker on a free loopback port, stopped and restarted on the same port by the tests
(Debian's `mosquitto` package; `.ci/run` installs it). `start_broker` returns a reason string when it cannot."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (str(p) for p in (Path("/usr/sbin/mosquitto"), Path("/usr/local/sbin/mosquitto")) if p.is_file()), None)


class Broker:
    """Mosquitto with persistence (subscribers' sessions and queued messages survive a stop and restart)."""

    def __init__(self, binary: str, folder: Path, port: int) -> None:
        self.binary = binary
        self.folder = folder
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {folder}/\nlog_dest file {folder}/mosquitto.log\n"
            f"user {getpass.getuser()}\n"  # as root: keep root (the folder is root's), else ignored
        )

    def start(self, timeout: float = 10.0) -> None:
        assert self.process is None
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.folder / "mosquitto.log")
                raise RuntimeError(f"mosquitto exited: {log.read_text() if log.exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def start_broker(folder: Path) -> Broker | str:
    binary = mosquitto_binary()
    if binary is None:
        return "mosquitto is not installed (Debian: apt-get install mosquitto; .ci/run installs it)"
    try:
        import paho.mqtt  # noqa: F401
    except ImportError:
        return "paho-mqtt is not installed (pip install 'spade-ad[publish]')"
    broker = Broker(binary, folder, free_port())
    try:
        broker.start()
    except (OSError, RuntimeError) as exc:
        return f"mosquitto could not be started: {exc}"
    return broker
