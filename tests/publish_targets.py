"""Test helpers of the publish tests: a throw-away Mosquitto broker on a free loopback port, stopped and restarted on
the same port (Debian's `mosquitto` package; `.ci/run` installs it; `start_broker` returns a reason string when it
cannot), a paho subscriber that keeps what it gets, and a local webhook that refuses (503) until told to accept."""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOPIC = "spade/line1"


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


class Subscriber:
    """A paho subscriber with a persistent session (QoS 1): keeps every message it gets, duplicates included."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.received: list[tuple[str, dict[str, Any]]] = []  # (Idempotency-Key, payload)
        self.subscribed = threading.Event()
        self.lock = threading.Lock()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-subscriber", protocol=mqtt.MQTTv5)
        client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)

        def on_connect(c: Any, _u: Any, flags: Any, reason_code: Any, _p: Any) -> None:
            if not reason_code.is_failure:
                c.subscribe(TOPIC, qos=1)

        def on_subscribe(*_: Any) -> None:
            self.subscribed.set()

        def on_message(_c: Any, _u: Any, message: Any) -> None:
            key = dict(message.properties.UserProperty).get("Idempotency-Key", "")
            with self.lock:
                self.received.append((key, json.loads(message.payload)))

        client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600  # the broker keeps our subscription and queue across its restart
        client.connect("127.0.0.1", port, clean_start=False, properties=properties)
        client.loop_start()
        assert self.subscribed.wait(10), "the subscriber could not subscribe"
        self.client = client

    def ids(self) -> list[str]:
        with self.lock:
            return [payload["id"] for _, payload in self.received]

    def wait_for(self, expected: set[str], timeout: float) -> set[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not expected <= set(self.ids()):
            time.sleep(0.05)
        return set(self.ids())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Webhook:
    """A local endpoint on loopback that answers 503 until `accept` is set, then 200; keeps what it accepted."""

    def __init__(self) -> None:
        self.accepted: list[tuple[str, dict[str, Any]]] = []
        self.refused = 0
        self.accept = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not hook.accept.is_set():
                    hook.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                hook.accepted.append((self.headers["Idempotency-Key"], json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/verdicts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
