"""Where messages go: an MQTT broker (paho-mqtt 2.x, MQTT v5, QoS 1) or an HTTP(S) webhook (stdlib urllib, POST).

Both are driven by one sender thread (`spade_ad.apps.publish.publisher`) and report a failure as `TransportDown` with
the reason in words; what was acknowledged before the failure has been handed to `on_ack` already.

- MQTT: `mqtt://[user:password@]host[:port]/topic` (port 1883; `mqtts://`: TLS with the system's certificates,
  port 8883). Each message is one PUBLISH at QoS 1 with the message id as the user property `Idempotency-Key`,
  content type application/json; it counts as delivered on the broker's PUBACK (a reason code below 0x80). A client
  of its own, clean start, no session kept: after a lost connection the unacknowledged messages are sent again from
  the outbox (QoS 1: the broker may see one twice; the id tells them apart).
- HTTP: `http://` or `https://` URL; each message is one POST of the JSON body with the header `Idempotency-Key`,
  delivered on a 2xx answer; any other answer or no answer is an outage, retried. Redirects are not followed (a
  POST redirected would arrive as a GET without its body): a 3xx is an outage too, and the line names it.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from ...errors import SpadeError

__all__ = ["HttpTransport", "MqttTransport", "PublishError", "Target", "TransportDown", "parse_target"]

Batch = list[tuple[int, str, str]]  # (seq, id, body)


class PublishError(SpadeError):
    """A --publish target that cannot be used (a bad URL, paho-mqtt missing)."""


class TransportDown(Exception):
    """The broker or endpoint cannot take messages now (`reason` in words); retried later."""


@dataclass(frozen=True)
class Target:
    url: str  # as given
    shown: str  # without the password
    scheme: str  # mqtt, mqtts, http, https
    host: str
    port: int
    topic: str = ""  # MQTT
    username: str | None = None
    password: str | None = None


def parse_target(url: str) -> Target:
    """Parse and check a --publish URL; `PublishError` (one line, saying what is expected) when it is bad."""
    expected = "give mqtt://host[:port]/topic, mqtts://..., http://..., https://... or opc.tcp://host:port"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise PublishError(f"--publish {url}: {exc}; {expected}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts", "http", "https", "opc.tcp"):
        raise PublishError(f"--publish {url}: unknown scheme {parts.scheme or '(none)'!r}; {expected}")
    if not parts.hostname:
        raise PublishError(f"--publish {url}: no host; {expected}")
    shown_netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.username:
        shown_netloc = f"{parts.username}@{shown_netloc}"
    if port is not None:
        shown_netloc += f":{port}"
    shown = f"{scheme}://{shown_netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    if scheme.startswith("mqtt"):
        topic = unquote(parts.path.lstrip("/"))
        if not topic:
            raise PublishError(f"--publish {url}: no topic; give mqtt://host[:port]/topic, e.g. "
                               f"mqtt://{parts.hostname}/spade/line1")
        if "+" in topic or "#" in url:  # (urlsplit reads a # as the start of a fragment)
            raise PublishError(f"--publish {url}: the topic {topic!r} holds a wildcard (+ or #); "
                               f"give the topic to publish to")
        default_port = 8883 if scheme == "mqtts" else 1883
    elif scheme == "opc.tcp":  # a server of ours (spade_ad.apps.publish.opcua): the host is the address to listen on
        topic, default_port = "", 4840
        url = f"opc.tcp://{shown_netloc if port is not None else shown_netloc + ':4840'}{parts.path}"
    else:
        topic = ""
        default_port = 443 if scheme == "https" else 80
    return Target(url=url, shown=shown, scheme=scheme, host=parts.hostname, port=port or default_port, topic=topic,
                  username=unquote(parts.username) if parts.username else None,
                  password=unquote(parts.password) if parts.password else None)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return _reason(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class MqttTransport:
    """Publishes to an MQTT broker (see the module's description); used by one thread only."""

    def __init__(self, target: Target, *, keepalive: int = 30, timeout: float = 10.0) -> None:
        try:
            import paho.mqtt.client  # noqa: F401
        except ImportError as exc:
            raise PublishError(f"--publish {target.shown}: MQTT needs paho-mqtt: pip install "
                               f"'spade-ad[publish]'") from exc
        self.target = target
        self.keepalive = keepalive
        self.timeout = timeout
        self.client_id = f"spade-ad-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._client: Any = None
        self._connected = False
        self._refused: str | None = None
        self._acked: dict[int, Any] = {}

    def _new_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5,
                             reconnect_on_failure=False)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        if self.target.username is not None:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.scheme == "mqtts":
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)

        def on_connect(_c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
            if reason_code.is_failure:
                self._refused = f"the broker refused the connection ({reason_code})"
            else:
                self._connected = True

        def on_disconnect(_c: Any, _u: Any, _flags: Any, _reason_code: Any, _props: Any) -> None:
            self._connected = False

        def on_publish(_c: Any, _u: Any, mid: int, reason_code: Any, _props: Any) -> None:
            self._acked[mid] = reason_code

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        return client

    def _drop(self) -> None:
        client, self._client, self._connected = self._client, None, False
        if client is not None:
            try:
                client.disconnect()
                client.loop(0.05)
            except Exception:  # noqa: BLE001 - the connection is gone either way
                pass
            sock = client.socket()
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    def _connect(self) -> None:
        if self._client is not None and self._connected:
            return
        self._drop()
        self._refused = None
        self._acked.clear()
        client = self._new_client()
        try:
            client.connect(self.target.host, self.target.port, keepalive=self.keepalive, clean_start=True)
        except (OSError, ssl.SSLError) as exc:
            raise TransportDown(_reason(exc)) from None
        self._client = client
        deadline = time.monotonic() + self.timeout
        while not self._connected:
            rc = client.loop(0.1)
            if self._refused is not None:
                self._drop()
                raise TransportDown(self._refused)
            if rc != 0 or time.monotonic() > deadline:
                self._drop()
                raise TransportDown("no answer to CONNECT" if rc == 0 else "connection lost while connecting")

    def send(self, batch: Batch, on_ack: Callable[[list[tuple[int, str]]], None]) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._connect()
        client = self._client
        waiting: dict[int, tuple[int, str]] = {}
        for seq, message_id, body in batch:
            properties = Properties(PacketTypes.PUBLISH)
            properties.UserProperty = [("Idempotency-Key", message_id)]
            properties.ContentType = "application/json"
            properties.PayloadFormatIndicator = 1
            info = client.publish(self.target.topic, body.encode("utf-8"), qos=1, properties=properties)
            if info.rc != 0:
                self._drop()
                raise TransportDown("connection lost")
            waiting[info.mid] = (seq, message_id)
        deadline = time.monotonic() + self.timeout
        while waiting:
            rc = client.loop(0.1)
            acked, failed = [], []
            for mid in [mid for mid in list(self._acked) if mid in waiting]:
                code, item = self._acked.pop(mid), waiting.pop(mid)
                (failed if code.is_failure else acked).append(code if code.is_failure else item)
            if acked:
                on_ack(acked)
            if failed:
                self._drop()
                raise TransportDown(f"the broker refused a message ({failed[0]})")
            if not waiting:
                break
            if rc != 0 or not self._connected:
                self._drop()
                raise TransportDown("connection lost")
            if time.monotonic() > deadline:
                self._drop()
                raise TransportDown(f"no PUBACK within {self.timeout:g} s")

    def keep_alive(self) -> None:
        """While idle: answer the broker's keep-alive (a lost connection is found on the next send)."""
        if self._client is not None and self._connected and self._client.loop(0.0) != 0:
            self._drop()

    def close(self) -> None:
        self._drop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None  # urllib then raises HTTPError with the 3xx status


class HttpTransport:
    """POSTs each message to a webhook (see the module's description)."""

    def __init__(self, target: Target, *, timeout: float = 10.0) -> None:
        from ..._version import __version__

        self.target = target
        self.timeout = timeout
        self.user_agent = f"spade-ad/{__version__}"
        self._opener = urllib.request.build_opener(_NoRedirect)

    def send(self, batch: Batch, on_ack: Callable[[list[tuple[int, str]]], None]) -> None:
        for seq, message_id, body in batch:
            request = urllib.request.Request(self.target.url, data=body.encode("utf-8"), method="POST", headers={
                "Content-Type": "application/json", "Idempotency-Key": message_id, "User-Agent": self.user_agent,
            })
            try:
                with self._opener.open(request, timeout=self.timeout) as answer:
                    answer.read()
                    status = answer.status
            except urllib.error.HTTPError as exc:
                exc.close()
                raise TransportDown(f"HTTP {exc.code} {exc.reason}") from None
            except (OSError, ValueError) as exc:
                raise TransportDown(_reason(exc)) from None
            if not 200 <= status < 300:
                raise TransportDown(f"HTTP {status}")
            on_ack([(seq, message_id)])

    def keep_alive(self) -> None:
        pass

    def close(self) -> None:
        pass
