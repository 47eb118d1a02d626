"""What the durable outbox costs: messages published through `spade_ad.apps.publish.Publisher` (outbox in SQLite, one
sender thread) against the same messages sent straight with paho (QoS 1, waiting for every PUBACK) or urllib (one
POST each), to a throw-away Mosquitto broker and a local webhook on loopback, in the same run.

Prints, per target: messages per second straight and through the outbox (ratio), and the time one `publish()` call
takes (median and 99th percentile: the caller's cost, one SQLite transaction with fsync).

    python benchmarks/bench_publish.py [--mqtt 2000] [--http 500]

Needs Debian's mosquitto (see .ci/run) for the MQTT part; without it that part is skipped, saying so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import publish_targets  # noqa: E402
from spade_ad.apps.publish import Publisher, message_id  # noqa: E402


def messages(n: int) -> list[dict[str, Any]]:
    """n messages the size of a flagged inspection's (three regions)."""
    out = []
    for i in range(n):
        source, sha = f"cam1/{i:06d}.png", f"{i:064x}"
        out.append({
            "schema": "spade-ad/inspection", "schema_version": 1, "id": message_id(source, sha, "m" * 64),
            "inspection_id": None, "time": "2026-12-06T15:40:01.123Z", "file": source, "sha256": sha,
            "model": {"name": "bottle.safetensors", "id": "m" * 64}, "score": 1.2345678, "normalized_score": 1.31,
            "p_value": 0.004, "image_threshold": 0.98765, "verdict": "defect", "width": 900, "height": 900,
            "map_size": [900, 900], "regions_total": 3, "error": None,
            "regions": [{"box": [10 * r, 20, 10 * r + 64, 90], "area": 2100, "peak": 2.5, "mean": 1.4}
                        for r in range(3)],
        })
    return out


def through_outbox(url: str, batch: list[dict[str, Any]], folder: Path) -> tuple[float, list[float]]:
    """Seconds from the first publish() to the last acknowledgement, and each publish() call's seconds."""
    publisher = Publisher.open(url, folder, log=lambda _: None)
    calls = []
    started = time.perf_counter()
    for message in batch:
        t = time.perf_counter()
        publisher.publish(message)
        calls.append(time.perf_counter() - t)
    left = publisher.close(timeout=120)
    assert left == 0, f"{left} messages not delivered"
    return time.perf_counter() - started, calls


def straight_mqtt(port: int, batch: list[dict[str, Any]]) -> float:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-straight", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    bodies = [json.dumps(m, separators=(",", ":")).encode() for m in batch]
    started = time.perf_counter()
    infos = [client.publish("bench/straight", body, qos=1) for body in bodies]
    for info in infos:
        info.wait_for_publish(30)
    seconds = time.perf_counter() - started
    client.loop_stop()
    client.disconnect()
    return seconds


def straight_http(url: str, batch: list[dict[str, Any]]) -> float:
    import urllib.request

    started = time.perf_counter()
    for message in batch:
        request = urllib.request.Request(url, data=json.dumps(message, separators=(",", ":")).encode(),
                                         method="POST", headers={"Content-Type": "application/json",
                                                                 "Idempotency-Key": message["id"]})
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
    return time.perf_counter() - started


class Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def report(name: str, n: int, straight: float, outbox: float, calls: list[float]) -> None:
    calls_ms = sorted(c * 1000 for c in calls)
    p99 = calls_ms[min(len(calls_ms) - 1, int(0.99 * len(calls_ms)))]
    print(f"{name}: {n} messages; straight {n / straight:,.0f}/s, through the outbox {n / outbox:,.0f}/s "
          f"(outbox / straight time {outbox / straight:.2f}x); publish() call median "
          f"{statistics.median(calls_ms):.2f} ms, p99 {p99:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mqtt", type=int, default=2000, help="messages to the broker")
    parser.add_argument("--http", type=int, default=500, help="messages to the webhook")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = publish_targets.start_broker(Path(tmp) / "broker")
        if isinstance(broker, str):
            print(f"MQTT skipped: {broker}")
        else:
            try:
                batch = messages(args.mqtt)
                straight = straight_mqtt(broker.port, batch)
                outbox, calls = through_outbox(f"mqtt://127.0.0.1:{broker.port}/bench/outbox", batch,
                                               Path(tmp) / "mqtt")
                report("MQTT (mosquitto, QoS 1)", args.mqtt, straight, outbox, calls)
            finally:
                broker.stop()
        server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        try:
            batch = messages(args.http)
            straight = straight_http(url, batch)
            outbox, calls = through_outbox(url, batch, Path(tmp) / "http")
            report("webhook (http.server)", args.http, straight, outbox, calls)
        finally:
            server.shutdown()


if __name__ == "__main__":
    main()
