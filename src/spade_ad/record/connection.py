"""Connecting to an inspection record: which database a target names (a SQLite file path, `sqlite:///path`, a
`postgresql://...` URL), the checks of a SQLite file before it is opened (a database, writable, its folder writable;
or, read-only, an existing record), and the engine (SQLite in WAL mode with a busy timeout, so that several processes
can write and read one file at once; PostgreSQL through psycopg 3). Refusals are a `RecordError` naming the record
and what to do.
"""

from __future__ import annotations

import os
import stat
import time
import urllib.parse
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from ..errors import SpadeError

BUSY_TIMEOUT_MS = 15_000
"""How long a SQLite writer waits for another process's transaction before giving up."""


_SQLITE_MAGIC = b"SQLite format 3\x00"


class RecordError(SpadeError):
    """A record that cannot be used as it is (not a database, newer schema, read-only, unreachable)."""


class RecordUnavailable(RecordError):
    """The record went away while in use (a server stopped, a disk failed): what was written before stays."""


def now_ms() -> int:
    return int(time.time() * 1000)


def is_url(target: str) -> bool:
    return "://" in target


def shown(target: str | os.PathLike[str]) -> str:
    """The record as messages show it: a file path as given, a URL without its password."""
    text = os.fspath(target)
    if not is_url(text):
        return text
    try:
        return make_url(text).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return text


def _check_file(path: Path, readonly: bool = False) -> None:
    """Refuse, before SQLite touches it, a file that cannot become or be a record (`readonly`: that cannot be read)."""
    where = shown(path)
    if readonly:
        _check_readable(path)
        return
    if path.is_dir():
        raise RecordError(f"record {where} is a folder; give a file name for the record (e.g. inspections.db)")
    if not path.parent.is_dir():
        raise RecordError(f"record {where}: folder {path.parent} does not exist; create it or give another path")
    if path.exists():
        with open(path, "rb") as handle:
            head = handle.read(16)
        if head and head != _SQLITE_MAGIC:
            raise RecordError(f"record {where} is not a database (not a SQLite file); give a new file name or an "
                              f"existing inspection record")
        # Read-only by its mode: refused even for root (whom the system would let write), as the owner meant it.
        if not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK):
            raise RecordError(f"record {where} is read-only; make it writable (chmod u+w) or give another file")
    folder = path.parent
    if not os.access(folder, os.W_OK | os.X_OK) or not folder.stat().st_mode & stat.S_IWUSR:
        raise RecordError(f"record {where}: folder {folder} is read-only (SQLite writes its journal beside the file); "
                          f"make it writable or give another path")


def _check_readable(path: Path) -> None:
    """Refuse, for a read-only opening, a path that is not an existing SQLite file."""
    where = shown(path)
    if path.is_dir():
        raise RecordError(f"record {where} is a folder; give the record's file (e.g. inspections.db)")
    if not path.is_file():
        raise RecordError(f"record {where} does not exist; give the record that predict, watch or serve wrote "
                          f"(--record)")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head != _SQLITE_MAGIC:
        raise RecordError(f"record {where} is not a database (not a SQLite file); give an existing inspection record")


def _readonly_url(path: Path) -> sa.URL:
    """A SQLite URI that opens `path` read-only (`mode=ro`: nothing is written, a read-only file or folder is
    fine). Without write access to the folder and no `-wal` file beside it (no writer has it open: one always keeps
    its `-wal`), SQLite cannot make the shared-memory file a WAL database needs: then `immutable=1`."""
    resolved = path.resolve()
    folder_writable = os.access(resolved.parent, os.W_OK | os.X_OK) and resolved.parent.stat().st_mode & stat.S_IWUSR
    wal = Path(f"{resolved}-wal")
    parameters = "mode=ro" if folder_writable or wal.exists() else "mode=ro&immutable=1"
    return sa.URL.create("sqlite+pysqlite", database=f"file:{urllib.parse.quote(str(resolved))}?{parameters}",
                         query={"uri": "true"})


def make_engine(target: str, readonly: bool = False) -> sa.Engine:
    if not is_url(target):
        path = Path(target).expanduser()
        _check_file(path, readonly)
        url = _readonly_url(path) if readonly else sa.URL.create("sqlite+pysqlite", database=str(path.resolve()))
    else:
        try:
            url = make_url(target)
        except sa.exc.ArgumentError as exc:
            raise RecordError(f"record {target!r} is neither a file path nor a database URL "
                              f"(postgresql://user@host/db, sqlite:///file.db)") from exc
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        elif url.drivername == "sqlite" and url.database:
            _check_file(Path(url.database), readonly)
            if readonly:
                url = _readonly_url(Path(url.database))
        elif not url.drivername.startswith(("postgresql", "sqlite")):
            raise RecordError(f"record {shown(target)}: only SQLite files and PostgreSQL URLs are supported")
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN below, not the driver's
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if readonly:  # mode=ro: a WAL record is read as WAL; nothing to set (setting would write)
                cursor.execute("PRAGMA query_only = ON")
                cursor.close()
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(connection: sa.Connection) -> None:
            # A transaction that writes takes the lock at once (waiting up to the busy timeout), so that two
            # processes never both read, then both fail to upgrade to writing.
            immediate = connection.get_execution_options().get("write", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    options = {"options": "-c default_transaction_read_only=on"} if readonly else {}
    return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10, **options})


def driver_problem(exc: BaseException) -> str:
    """A driver error in one line."""
    original = getattr(exc, "orig", None) or exc
    return " ".join(str(original).split()) or type(original).__name__
