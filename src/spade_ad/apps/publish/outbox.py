"""The durable outbox of one publishing target: a small SQLite file (WAL, synchronous=FULL) of the messages not yet
acknowledged, oldest first.

A message is written here before anyone tries to send it and deleted only once the broker's PUBACK or the
endpoint's 2xx arrived, so a crash, a broker or endpoint outage or a restart loses none: the next run opens the same
file and sends what is left. The ids of the last `KEEP_SENT` delivered messages are kept too, so the same message
published again (a watcher restarted between publishing and marking its file done) is not sent twice.

Bounded: at most `max_messages` wait; when full, the waiting ones (the oldest) are kept and new messages are
refused (`add` says "full") until some are delivered.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

__all__ = ["KEEP_SENT", "Outbox"]

KEEP_SENT = 10_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                                   body TEXT NOT NULL, queued REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sent (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sent_at ON sent (at);
"""


class Outbox:
    """Messages waiting for one target (see the module's description); safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str], *, target: str, max_messages: int = 100_000) -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1 (got {max_messages})")
        self.path = Path(path)
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('target', ?)", (target,))
        self._removed = 0

    @property
    def target(self) -> str:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'target'").fetchone()
        return str(row[0])

    def add(self, message_id: str, body: str) -> str:
        """Queue one message: "queued"; "duplicate" when a message of that id waits or was delivered lately;
        "full" when `max_messages` wait (the message is not kept)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute("SELECT 1 FROM outbox WHERE id = ? UNION ALL SELECT 1 FROM sent WHERE id = ?",
                                    (message_id, message_id)).fetchone():
                    outcome = "duplicate"
                elif self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] >= self.max_messages:
                    outcome = "full"
                else:
                    self._db.execute("INSERT INTO outbox (id, body, queued) VALUES (?, ?, ?)",
                                     (message_id, body, time.time()))
                    outcome = "queued"
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return outcome

    def oldest(self, limit: int) -> list[tuple[int, str, str]]:
        """Up to `limit` waiting messages, oldest first: (seq, id, body)."""
        with self._lock:
            return list(self._db.execute("SELECT seq, id, body FROM outbox ORDER BY seq LIMIT ?", (limit,)))

    def remove(self, delivered: list[tuple[int, str]]) -> None:
        """Delete delivered messages, (seq, id) each, and remember their ids among the last `KEEP_SENT`."""
        if not delivered:
            return
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq, _ in delivered])
                self._db.executemany("INSERT OR REPLACE INTO sent VALUES (?, ?)", [(i, now) for _, i in delivered])
                self._removed += len(delivered)
                if self._removed >= KEEP_SENT // 10:  # trim now and then, not on every delivery
                    self._removed = 0
                    self._db.execute("DELETE FROM sent WHERE id NOT IN (SELECT id FROM sent ORDER BY at DESC "
                                     "LIMIT ?)", (KEEP_SENT,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
