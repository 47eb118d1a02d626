"""Publishing messages through a durable outbox, delivered by a background thread.

`Publisher.open(url, outbox_dir)` opens (or creates) the target's outbox file in `outbox_dir` and starts the sender
thread. `publish(message)` only writes the message to the outbox (a few milliseconds: one SQLite transaction) and
wakes the sender, which sends the oldest waiting messages (up to 50 at a time) and deletes each once acknowledged.

When the broker or endpoint cannot be reached the sender retries with a backoff doubling from 0.5 s to `max_backoff`
(10 s by default), and says so in two timestamped lines, no traceback: one when publishing stops (why, and how
many messages wait) and one when it resumes (after how long, how many waited). `log` receives the lines; the
default, `stamped`, writes them to stderr after the local time. `close(timeout)` keeps sending for up to `timeout`
seconds, then leaves what is still waiting in the outbox for the next run and says so.

`Publishers` is several targets at once (`--publish` given more than once), each with its own outbox; its
`inspection(prediction, ...)` builds the message (`spade_ad.apps.publish.message`) and publishes it to each.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .message import error_message, inspection_message
from .outbox import Outbox
from .transports import HttpTransport, MqttTransport, PublishError, Target, TransportDown, parse_target

if TYPE_CHECKING:
    from ...estimators.prediction import Prediction

__all__ = ["DEFAULT_MAX_MESSAGES", "Publisher", "Publishers", "outbox_file"]

DEFAULT_MAX_MESSAGES = 100_000
BATCH = 50


def stamped(line: str) -> None:
    """The default `log`: the line on stderr after the local time (ISO 8601, as the command line's long-running
    commands write theirs)."""
    print(f"{datetime.now().astimezone().isoformat(timespec='seconds')} {line}", file=sys.stderr, flush=True)


def _messages(n: int) -> str:
    return f"{n} message{'' if n == 1 else 's'}"


def outbox_file(outbox_dir: str | os.PathLike[str], target: Target) -> Path:
    """The outbox file of `target` in `outbox_dir`: named after the URL (without its password), so that a later run
    with the same --publish finds what an earlier one left."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", target.shown.split("://", 1)[1]).strip("-")[:48]
    digest = hashlib.sha256(target.shown.encode("utf-8")).hexdigest()[:8]
    return Path(outbox_dir) / f"publish-{target.scheme}-{slug}-{digest}.outbox.sqlite"


class Publisher:
    """Publishes messages to one target through its outbox (see the module's description)."""

    def __init__(self, target: Target, outbox: Outbox, transport: Any, *, log: Callable[[str], None] = stamped,
                 max_backoff: float = 10.0, min_backoff: float = 0.5) -> None:
        self.target = target
        self.outbox = outbox
        self.transport = transport
        self.log = log
        self.max_backoff = max_backoff
        self.min_backoff = min_backoff
        self.sent = 0  # delivered by this run
        self.dropped = 0  # refused because the outbox was full
        self.failed = 0  # not published since the outbox could last be written
        self._dropped_since_full = 0
        self._down_since: float | None = None
        self._wake = threading.Event()  # a message was queued
        self._retry = threading.Event()  # close(): stop waiting out the backoff
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._closed = False
        left = outbox.count()
        if left:
            self._say(f"{_messages(left)} left by an earlier run in {outbox.path}: sending them")
        self._thread = threading.Thread(target=self._run, name=f"spade-publish-{target.scheme}", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, url: str, outbox_dir: str | os.PathLike[str], *, max_messages: int = DEFAULT_MAX_MESSAGES,
             max_backoff: float = 10.0, log: Callable[[str], None] = stamped) -> Publisher:
        """A publisher to `url` (mqtt://host[:port]/topic, mqtts://, http://, https://) whose outbox lives in
        `outbox_dir`; `PublishError` (one line) for a bad URL or an outbox that cannot be opened."""
        target = parse_target(url)
        if target.scheme == "opc.tcp":
            raise PublishError(f"--publish {target.shown}: an OPC UA endpoint is a server of the latest inspection, "
                               f"not a destination of messages; open it with Publishers.open")
        transport: Any = MqttTransport(target) if target.scheme.startswith("mqtt") else HttpTransport(target)
        path = outbox_file(outbox_dir, target)
        try:
            outbox = Outbox(path, target=target.shown, max_messages=max_messages)
        except (OSError, sqlite3.Error) as exc:
            raise PublishError(f"--publish {target.shown}: cannot open its outbox {path} ({exc}); give an output "
                               f"folder that can be written") from exc
        return cls(target, outbox, transport, log=log, max_backoff=max_backoff)

    # -- the caller's side ----------------------------------------------------------------------------------------
    def publish(self, message: dict[str, Any]) -> str:
        """Queue `message` (a JSON-able dict with a string `id`) for delivery and return at once: "queued",
        "duplicate" (that id waits or was delivered lately), "full" (not kept: the outbox holds `max_messages`) or
        "failed" (the outbox file cannot be written: a full disk; said in one line, never raised, so the inspection
        goes on). After `close` (a request finishing while a service stops) the message is still kept in the outbox,
        for the next run to send."""
        body = json.dumps(message, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        try:
            outcome = self.outbox.add(str(message["id"]), body)
        except (sqlite3.Error, OSError) as exc:
            self.failed += 1
            if self.failed == 1:
                self._say(f"cannot write the outbox {self.outbox.path} ({exc}): inspections are not published "
                          f"until it can be written again")
            return "failed"
        if self.failed:
            self._say(f"the outbox can be written again: {_messages(self.failed)} could not be published meanwhile")
            self.failed = 0
        if outcome == "full":
            self.dropped += 1
            self._dropped_since_full += 1
            if self._dropped_since_full == 1:
                self._say(f"outbox full ({_messages(self.outbox.max_messages)} waiting in {self.outbox.path}): the "
                          f"oldest are kept, new inspections are not published until it drains")
        elif outcome == "queued":
            if self._closed:
                self._say(f"an inspection came after closing: kept in {self.outbox.path} for the next run")
            if self._dropped_since_full:
                self._say(f"outbox has room again: {_messages(self._dropped_since_full)} were not published while "
                          f"it was full")
                self._dropped_since_full = 0
            self._wake.set()
        return outcome

    @property
    def waiting(self) -> int:
        """Messages in the outbox, not yet acknowledged."""
        return self.outbox.count()

    def begin_close(self, timeout: float) -> None:
        """Start closing: keep sending for up to `timeout` seconds more (see `close`)."""
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._closing.set()
        self._retry.set()
        self._wake.set()

    def close(self, timeout: float = 10.0) -> int:
        """Send what waits for up to `timeout` seconds, stop the sender and close the outbox; the number of
        messages left in it (sent by the next run), said in one line when not 0."""
        if self._closed:
            return 0
        if not self._closing.is_set():
            self.begin_close(timeout)
        return self.finish_close()

    def finish_close(self) -> int:
        """Wait for the sender to stop (after `begin_close`); the messages left in the outbox."""
        # the sender gives up at the deadline; a send in progress ends within the transport's own timeout (10 s).
        # The outbox stays open (closed with the process): a late publish() is still kept for the next run.
        self._thread.join(max(0.0, self._deadline - time.monotonic()) + 15.0)
        self._closed = True
        left = self.outbox.count()
        if left:
            self._say(f"{_messages(left)} not delivered, kept in {self.outbox.path}: the next run with "
                      f"--publish {self.target.shown} sends them")
        return left

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the sender thread ----------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.log(f"publish {self.target.shown}: {text}")

    def _waiting(self) -> str:
        try:
            return _messages(self.outbox.count())
        except sqlite3.Error:
            return "an unknown number of messages"

    def _delivered(self, items: list[tuple[int, str]]) -> None:
        if self._down_since is not None:
            self._say(f"resumed after {time.monotonic() - self._down_since:.0f} s; {self._waiting()} waited")
            self._down_since = None
        self.outbox.remove(items)
        self.sent += len(items)

    def _went_down(self, reason: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._say(f"stopped ({reason}); {self._waiting()} waiting in the outbox, retrying")

    def _run(self) -> None:
        backoff = self.min_backoff
        while True:
            if self._closing.is_set() and time.monotonic() >= self._deadline:
                break
            try:
                batch = self.outbox.oldest(BATCH)
                if not batch:
                    if self._closing.is_set():
                        break
                    self.transport.keep_alive()
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                self.transport.send(batch, self._delivered)
            except TransportDown as exc:
                self._went_down(str(exc))
            except Exception as exc:  # noqa: BLE001 - a sender that dies would lose the line's verdicts silently
                self._went_down(f"{type(exc).__name__}: {exc}")  # the outbox unreadable, a full disk, a bug
            else:
                backoff = self.min_backoff
                continue
            wait = backoff
            if self._closing.is_set():
                wait = min(wait, max(0.0, self._deadline - time.monotonic()))
            if self._retry.wait(wait):
                self._retry.clear()  # close() asked for one more try now; then the backoff again
            backoff = min(backoff * 2, self.max_backoff)
        try:
            self.transport.close()
        except Exception:  # noqa: BLE001, S110 - closing a dead connection
            pass


class Publishers:
    """Several publishers (one per --publish URL) fed the same messages; `inspection` builds them. An
    `opc.tcp://` URL is not a Publisher but an OPC UA server of the latest inspection
    (`spade_ad.apps.publish.opcua`)."""

    def __init__(self, publishers: Sequence[Any], *, model_name: str = "model",
                 model_id: str | None = None) -> None:
        self.publishers = list(publishers)
        self.model_name = model_name
        self.model_id = model_id

    @classmethod
    def open(cls, urls: Sequence[str], outbox_dir: str | os.PathLike[str], *, model_name: str = "model",
             model_id: str | None = None, **options: Any) -> Publishers:
        """One `Publisher.open(url, outbox_dir, **options)` per URL, an `OpcUaServer` per opc.tcp:// URL (closed
        again if a later one fails)."""
        opened: list[Any] = []
        try:
            for url in urls:
                if parse_target(url).scheme == "opc.tcp":
                    from .opcua import OpcUaServer

                    opened.append(OpcUaServer(parse_target(url), log=options.get("log", stamped)))
                else:
                    opened.append(Publisher.open(url, outbox_dir, **options))
        except BaseException:
            for publisher in opened:
                publisher.close(timeout=0)
            raise
        return cls(opened, model_name=model_name, model_id=model_id)

    @classmethod
    def for_model(cls, urls: Sequence[str], outbox_dir: str | os.PathLike[str], model: Any,
                  model_path: str | os.PathLike[str] | None, *, name: str | None = None,
                  **options: Any) -> Publishers:
        """`open`, the messages naming `model` (loaded from `model_path`) as the inspection record does: its file's
        name (or `name`) and its content hash (`spade_ad.record.model_identity`)."""
        from ...record import model_identity

        for url in urls:  # a bad URL is refused before the model file is hashed
            parse_target(url)
        identity = model_identity(model, model_path, name=name)
        return cls.open(urls, outbox_dir, model_name=str(identity["name"]), model_id=str(identity["id"]), **options)

    def publish(self, message: dict[str, Any]) -> list[str]:
        """`Publisher.publish` on each: their outcomes."""
        return [publisher.publish(message) for publisher in self.publishers]

    def inspection(self, prediction: Prediction, *, source: str, sha256: str | None, model_name: str | None = None,
                   model_id: str | None = None, inspection_id: int | None = None,
                   at: float | datetime | None = None) -> dict[str, Any]:
        """Build the message of one inspection (the model named as this object's unless given) and publish it;
        the message is returned."""
        message = inspection_message(
            prediction, source=source, sha256=sha256, model_name=model_name or self.model_name,
            model_id=model_id if model_id is not None else self.model_id, inspection_id=inspection_id, at=at,
        )
        self.publish(message)
        return message

    def error(self, *, source: str, sha256: str | None, reason: str, model_name: str | None = None,
              model_id: str | None = None, inspection_id: int | None = None,
              at: float | datetime | None = None) -> dict[str, Any]:
        """Build and publish the message of an image that could not be inspected (verdict "error")."""
        message = error_message(
            source=source, sha256=sha256, reason=reason, model_name=model_name or self.model_name,
            model_id=model_id if model_id is not None else self.model_id, inspection_id=inspection_id, at=at,
        )
        self.publish(message)
        return message

    @property
    def waiting(self) -> int:
        return sum(p.waiting for p in self.publishers)

    def close(self, timeout: float = 10.0) -> int:
        """Close every publisher, sending for up to `timeout` seconds in all; the messages left in their outboxes."""
        for publisher in self.publishers:
            publisher.begin_close(timeout)
        return sum(publisher.finish_close() for publisher in self.publishers)

    def __enter__(self) -> Publishers:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
