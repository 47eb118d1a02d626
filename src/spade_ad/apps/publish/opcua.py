"""The latest inspection on an OPC UA server, for PLCs and SCADA that read OPC UA rather than MQTT:
`--publish opc.tcp://HOST:PORT[/PATH]` starts a server (asyncua, imported only when used) at that endpoint, HOST
being the address to listen on (0.0.0.0: every interface).

Its address space, in the namespace `urn:spade-ad:inspection`, under Objects/SpadeAD:

- `LastInspection`: `Sequence` (UInt64, +1 per inspection: subscribe to it to see each new one), `Id`, `Time`
  (DateTime, UTC), `File`, `ModelName`, `ModelId`, `Verdict` (good, defect, none, error), `Reject` (Boolean: defect
  or error), `Score`, `NormalizedScore`, `PValue`, `Threshold` (Double; NaN when absent), `Regions` (Int32, how
  many), `Message` (String: the whole published JSON message, the one value read at once);
- `Counters`: `Inspections`, `Defects`, `Errors` (UInt64) since the server started.

Every variable is read-only to clients. `Sequence` is written last, so a client that sees it change reads values
that belong together after it; `Message` is one value and always consistent. The server speaks without security
(policy None, anonymous): put it on the line's network only. Latest-value semantics: nothing waits in an outbox;
a client that was away reads the newest inspection (the MQTT or webhook targets carry every one).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .transports import PublishError, Target

__all__ = ["NAMESPACE", "OpcUaServer"]

NAMESPACE = "urn:spade-ad:inspection"
_LAST = [  # (name, variant type, initial value)
    ("Id", "String", ""), ("Time", "DateTime", None), ("File", "String", ""), ("ModelName", "String", ""),
    ("ModelId", "String", ""), ("Verdict", "String", ""), ("Reject", "Boolean", False),
    ("Score", "Double", math.nan), ("NormalizedScore", "Double", math.nan), ("PValue", "Double", math.nan),
    ("Threshold", "Double", math.nan), ("Regions", "Int32", 0), ("Message", "String", ""),
    ("Sequence", "UInt64", 0),
]
_COUNTERS = ["Inspections", "Defects", "Errors"]


def _double(value: Any) -> float:
    return math.nan if value is None else float(value)


class OpcUaServer:
    """An OPC UA server holding the latest inspection (see the module's description); the publisher interface of
    `spade_ad.apps.publish.Publishers` (`publish`, `waiting`, `begin_close`, `finish_close`)."""

    def __init__(self, target: Target, *, log: Callable[[str], None]) -> None:
        try:
            from asyncua import ua
            from asyncua.sync import Server
        except ImportError as exc:
            raise PublishError(f"--publish {target.shown}: OPC UA needs asyncua: pip install "
                               f"'spade-ad[opcua]'") from exc
        logging.getLogger("asyncua").setLevel(logging.ERROR)  # its notes on running without security
        self.target = target
        self.log = log
        self._ua = ua
        self._lock = threading.Lock()
        self._sequence = 0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        server = Server()
        server.set_endpoint(target.url)
        server.set_server_name("spade-ad")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        index = server.register_namespace(NAMESPACE)
        root = server.nodes.objects.add_object(index, "SpadeAD")
        last = root.add_object(index, "LastInspection")
        counters = root.add_object(index, "Counters")
        self._nodes: dict[str, Any] = {}
        for name, kind, initial in _LAST:
            if kind == "DateTime":
                initial = datetime.fromtimestamp(0, tz=timezone.utc)
            self._nodes[name] = last.add_variable(index, name, initial, varianttype=getattr(ua.VariantType, kind))
        for name in _COUNTERS:
            self._nodes[name] = counters.add_variable(index, name, 0, varianttype=ua.VariantType.UInt64)
        try:
            server.start()
        except OSError as exc:
            raise PublishError(f"--publish {target.shown}: cannot listen there ({exc.strerror or exc}); give a free "
                               f"port and an address of this machine") from exc
        self._server = server
        self._closed = False
        self.log(f"publish {target.shown}: OPC UA server listening (latest inspection under Objects/SpadeAD)")

    def _write(self, name: str, value: Any) -> None:
        kind = next((k for n, k, _ in _LAST if n == name), "UInt64")
        self._nodes[name].write_value(self._ua.DataValue(self._ua.Variant(value, getattr(self._ua.VariantType, kind))))

    def publish(self, message: dict[str, Any]) -> str:
        """Show `message` as the latest inspection: "served" (or "closed" after `finish_close`)."""
        with self._lock:
            if self._closed:
                return "closed"
            verdict = str(message.get("verdict", ""))
            when = datetime.fromisoformat(str(message["time"]).replace("Z", "+00:00"))
            model = message.get("model") or {}
            values = {
                "Id": str(message["id"]), "Time": when, "File": str(message.get("file", "")),
                "ModelName": str(model.get("name") or ""), "ModelId": str(model.get("id") or ""),
                "Verdict": verdict, "Reject": verdict in ("defect", "error"),
                "Score": _double(message.get("score")), "NormalizedScore": _double(message.get("normalized_score")),
                "PValue": _double(message.get("p_value")), "Threshold": _double(message.get("image_threshold")),
                "Regions": int(message.get("regions_total", 0)),
                "Message": json.dumps(message, separators=(",", ":"), ensure_ascii=False),
            }
            for name, value in values.items():
                self._write(name, value)
            self._counts["Inspections"] += 1
            self._counts["Defects"] += verdict == "defect"
            self._counts["Errors"] += verdict == "error"
            for name, count in self._counts.items():
                self._write(name, count)
            self._sequence += 1
            self._write("Sequence", self._sequence)
        return "served"

    @property
    def waiting(self) -> int:
        return 0

    def begin_close(self, timeout: float) -> None:
        pass

    def finish_close(self) -> int:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._server.stop()
        return 0

    def close(self, timeout: float = 0.0) -> int:
        return self.finish_close()
