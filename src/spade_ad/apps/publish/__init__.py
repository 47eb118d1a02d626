"""Verdicts out: each inspection published to the line's systems, to an MQTT broker (QoS 1) or an HTTP webhook,
through a durable outbox, so that an outage of the broker or endpoint loses and doubles nothing.

- `message`: the versioned message of one inspection (`inspection_message`, `error_message`; the JSON schema
  `inspection-v1.schema.json`), with a stable `id` per inspection;
- `outbox`: the SQLite file of the messages not yet acknowledged (bounded; survives restarts);
- `transports`: MQTT (paho-mqtt, imported only when used) and HTTP (stdlib), and the URL of a target;
- `publisher`: `Publisher` (one target: `open`, `publish`, `close`) and `Publishers` (several), whose sender thread
  delivers the outbox with retries and backoff.

docs/publish.md is the user's page. Importing this package imports neither paho nor the network.
"""

from .message import SCHEMA_FILE, SCHEMA_NAME, SCHEMA_VERSION, error_message, inspection_message, message_id
from .outbox import Outbox
from .publisher import DEFAULT_MAX_MESSAGES, Publisher, Publishers, outbox_file
from .transports import PublishError, Target, parse_target

__all__ = [
    "DEFAULT_MAX_MESSAGES", "SCHEMA_FILE", "SCHEMA_NAME", "SCHEMA_VERSION", "Outbox", "PublishError", "Publisher",
    "Publishers", "Target", "error_message", "inspection_message", "message_id", "outbox_file", "parse_target",
]
