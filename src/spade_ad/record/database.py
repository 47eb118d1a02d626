"""Opening an inspection record and reading and writing it: `Record`.

Where (`connection`): a file path is a SQLite database (created when missing) in WAL mode with a busy timeout, so
that several processes (a watcher, the service, `drift`) can write and read one file at once; a URL
`postgresql://...` is a PostgreSQL database (driver psycopg 3), `sqlite:///path` a SQLite file by URL.

Opening checks the record and brings it to this release's schema (`schema.MIGRATIONS`, in one transaction that
takes the write lock first, so two processes opening one new file do not both build it). What is refused, as a
`RecordError` naming the record and what to do: a file that is not a SQLite database, a database that holds other
tables but no record, a record of a newer schema than this release, a file or folder without write permission, a
server that cannot be reached. `open_record(target, readonly=True)` opens an existing record for reading only (the
commands that only read: drift, record list/export): a read-only file, folder or mount is fine, nothing is written.

Writes are transactional: `add` inserts a list of rows in one transaction (all or none), so a crash loses at most the
batch being written and never leaves half a batch; `spade_ad.record.recorder.RecordBatcher` gathers predictions into
such batches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .._version import __version__
from .connection import (
    BUSY_TIMEOUT_MS,
    RecordError,
    RecordUnavailable,
    driver_problem,
    is_url,
    make_engine,
    now_ms,
    shown,
)
from .schema import MIGRATIONS, SCHEMA_VERSION, inspections, labels, metadata, models, versions

__all__ = ["BORDERLINE", "LABELS", "Record", "open_record"]




BORDERLINE = 0.8


"""Normalised score (1 = the threshold) from which an image that passed still goes to the review queue."""


LABELS = ("good", "defect")


_VERDICTS = ("good", "defect", "none", "error")


_EMPTY_ROW = {column.name: None for column in inspections.columns if column.name != "id"}


class Record:
    """An open inspection record (see the module's description). Use `open_record`; close with `close` (or as a
    context manager)."""

    def __init__(self, target: str | os.PathLike[str], *, create: bool = True, readonly: bool = False) -> None:
        self.target = os.fspath(target)
        self.shown = shown(self.target)
        self.readonly = readonly
        if (not create or readonly) and not is_url(self.target) and not Path(self.target).expanduser().exists():
            raise RecordError(f"record {self.shown} does not exist; give the record that predict, watch or serve "
                              f"wrote (--record)")
        self.engine = make_engine(self.target, readonly)
        self.backend = self.engine.url.get_backend_name()
        self.schema_version = self._check_version() if readonly else self._migrate()
        self._file = self._sqlite_file()
        self._inode = self._file_identity()

    # -- the file under a SQLite record ---------------------------------------------------------------------------
    def _sqlite_file(self) -> Path | None:
        if self.backend != "sqlite":
            return None
        database = self.engine.url.database or ""
        if database.startswith("file:"):
            return None  # a read-only URI opening: never written
        return Path(database) if database and database != ":memory:" else None

    def _file_identity(self) -> tuple[int, int] | None:
        if self._file is None:
            return None
        try:
            info = self._file.stat()
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def _check_alive(self) -> None:
        """Before a write: a SQLite file deleted or replaced since it was opened is noticed (SQLite would go on
        writing into the deleted file) and reported as unavailable; `reopen` takes up a file put back."""
        if self._file is None:
            return
        identity = self._file_identity()
        if identity is None:
            raise RecordUnavailable(f"record {self.shown} was deleted while in use; put it back (or give a new one "
                                    f"to `spade-ad record backfill`)")
        if identity != self._inode:
            raise RecordUnavailable(f"record {self.shown} was replaced by another file while in use")

    def reopen(self) -> None:
        """After an outage: a SQLite file that was replaced (or put back) is opened anew and checked; a server is
        reconnected by the pool by itself. Raises RecordUnavailable while the record is still not there."""
        if self._file is None or self._file_identity() == self._inode:
            return
        if self._file_identity() is None:
            self._check_alive()
        self.engine.dispose()
        try:
            self.engine = make_engine(self.target)
            self._migrate()
        except RecordError as exc:
            raise RecordUnavailable(str(exc)) from None
        self._inode = self._file_identity()

    # -- opening --------------------------------------------------------------------------------------------------
    def _writing(self) -> sa.Connection:
        return self.engine.connect().execution_options(write=True)

    def _migrate(self) -> int:
        try:
            with self._writing() as connection, connection.begin():
                if self.backend == "postgresql":  # SQLite: BEGIN IMMEDIATE; here, a lock held to the commit
                    connection.execute(sa.text("SELECT pg_advisory_xact_lock(7221600)"))
                inspector = sa.inspect(connection)
                tables = set(inspector.get_table_names())
                if versions.name in tables:
                    found = connection.execute(sa.select(sa.func.max(versions.c.version))).scalar() or 0
                elif tables:
                    raise RecordError(f"record {self.shown} is a database that holds other tables but no inspection "
                                      f"record; give a new file (or an empty database)")
                else:
                    found = 0
                if found > SCHEMA_VERSION:
                    raise RecordError(f"record {self.shown} has schema version {found}, newer than this spade-ad "
                                      f"({__version__}, schema {SCHEMA_VERSION}) knows; upgrade spade-ad to use it")
                for version, step in MIGRATIONS:
                    if version > found:
                        step(connection)
                        connection.execute(versions.insert().values(version=version, applied_ms=now_ms(),
                                                                    release=__version__))
                return SCHEMA_VERSION
        except RecordError:
            self.engine.dispose()
            raise
        except sa.exc.DatabaseError as exc:
            self.engine.dispose()
            problem = driver_problem(exc)
            if "not a database" in problem or "malformed" in problem:
                raise RecordError(f"record {self.shown} is not a database ({problem}); give a new file name or an "
                                  f"existing inspection record") from None
            if "readonly" in problem or "read-only" in problem:
                raise RecordError(f"record {self.shown} is read-only ({problem}); make it writable or give another "
                                  f"file") from None
            raise RecordError(f"cannot open record {self.shown}: {problem}") from None

    def _check_version(self) -> int:
        """A read-only opening: the record's schema, which must be this release's (no migration is written)."""
        try:
            with self.engine.connect() as connection:
                tables = set(sa.inspect(connection).get_table_names())
                if versions.name not in tables:
                    raise RecordError(f"record {self.shown} holds no inspection record; give the record that "
                                      f"predict, watch or serve wrote (--record)")
                found = connection.execute(sa.select(sa.func.max(versions.c.version))).scalar() or 0
        except RecordError:
            self.engine.dispose()
            raise
        except sa.exc.DBAPIError as exc:
            self.engine.dispose()
            raise RecordError(f"cannot read record {self.shown}: {driver_problem(exc)}") from None
        if found != SCHEMA_VERSION:
            self.engine.dispose()
            newer = found > SCHEMA_VERSION
            raise RecordError(f"record {self.shown} has schema version {found}, "
                              + (f"newer than this spade-ad ({__version__}, schema {SCHEMA_VERSION}) knows; upgrade "
                                 f"spade-ad to read it" if newer else
                                 f"older than this spade-ad's {SCHEMA_VERSION} and opened read-only, so not migrated; "
                                 f"open it once with a command that writes (watch, serve --record) to migrate it"))
        return found

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Record:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------------------------------
    def register_model(self, identity: Mapping[str, Any]) -> str:
        """Make sure the model `identity` (`spade_ad.record.identity.model_identity`) has its row; returns its id."""
        row = dict(identity)
        try:
            self._check_alive()
            with self._writing() as connection, connection.begin():
                known = connection.execute(sa.select(models.c.id).where(models.c.id == row["id"])).first()
                if known is None:
                    connection.execute(models.insert().values(first_seen_ms=now_ms(), **row))
        except sa.exc.DBAPIError as exc:
            raise RecordUnavailable(f"record {self.shown}: cannot write ({driver_problem(exc)})") from None
        return str(row["id"])

    def add(self, rows: Sequence[Mapping[str, Any]], *, wait: float | None = None) -> list[int]:
        """Insert rows (columns of `schema.inspections`; `at_ms` defaults to now) in one transaction; their ids.

        A row whose `uid` is already in the record is not inserted again (a batch retried after its commit was not
        acknowledged), and its id is returned as if it had been. `wait`: on SQLite, how long to wait for another
        process's lock (seconds; default `BUSY_TIMEOUT_MS`), so that a retry in an outage does not stall its caller."""
        if not rows:
            return []
        stamp = now_ms()
        values = [{**_EMPTY_ROW, "at_ms": stamp, **row} for row in rows]  # every column: one executemany
        for row in values:
            if row.get("verdict") not in _VERDICTS:
                raise ValueError(f"verdict must be one of {_VERDICTS}, got {row.get('verdict')!r}")
            if isinstance(row.get("regions"), list):
                row["regions"] = json.dumps(row["regions"])
        try:
            self._check_alive()
            with self._writing() as connection:
                if wait is not None and self.backend == "sqlite":
                    connection.connection.dbapi_connection.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
                try:
                    with connection.begin():
                        return self._insert(connection, values)
                finally:
                    if wait is not None and self.backend == "sqlite":
                        connection.connection.dbapi_connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sa.exc.DBAPIError as exc:
            raise RecordUnavailable(f"record {self.shown}: {len(values)} inspection{'s' if len(values) != 1 else ''} "
                                    f"not written "
                                    f"({driver_problem(exc)})") from None

    def _insert(self, connection: sa.Connection, values: list[dict[str, Any]]) -> list[int]:
        uids = [row["uid"] for row in values if row.get("uid")]
        if not uids:  # rows without uids (callers of release 2): plain inserts
            if self.backend == "postgresql" or len(values) == 1:
                result = connection.execute(inspections.insert().returning(inspections.c.id), values)
                return [int(i) for i in result.scalars()]
            connection.execute(inspections.insert(), values)  # executemany: one statement, many rows
            last = connection.execute(sa.select(sa.func.max(inspections.c.id))).scalar_one()
            return list(range(int(last) - len(values) + 1, int(last) + 1))
        known = {uid: id_ for uid, id_ in connection.execute(sa.select(inspections.c.uid, inspections.c.id)
                                                            .where(inspections.c.uid.in_(uids)))}
        new = [row for row in values if row.get("uid") not in known]
        if new:
            connection.execute(inspections.insert(), new)
            added = sa.select(inspections.c.uid, inspections.c.id).where(inspections.c.uid.in_([r["uid"] for r in new]))
            known.update({uid: id_ for uid, id_ in connection.execute(added)})
        return [int(known[row["uid"]]) for row in values]

    def set_label(self, inspection_id: int, label: str, by: str) -> dict[str, Any]:
        """Label one inspection good or defect: the label is added to its history (`label_history`: every label,
        who gave it and when) and becomes the current one; the updated row. An inspection that could not be scored
        (verdict "error") has nothing to label: a RecordError."""
        if label not in LABELS:
            raise RecordError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        stamp = now_ms()
        try:
            self._check_alive()
            with self._writing() as connection, connection.begin():
                verdict = connection.execute(sa.select(inspections.c.verdict)
                                             .where(inspections.c.id == inspection_id)).scalar()
                if verdict is None:
                    raise KeyError(inspection_id)
                if verdict == "error":
                    raise RecordError(f"inspection {inspection_id} could not be scored (an unreadable file): there is "
                                      f"nothing to label")
                connection.execute(labels.insert().values(inspection_id=inspection_id, label=label, label_by=by,
                                                          label_ms=stamp))
                connection.execute(inspections.update().where(inspections.c.id == inspection_id)
                                   .values(label=label, label_by=by, label_ms=stamp))
        except sa.exc.DBAPIError as exc:
            raise RecordUnavailable(f"record {self.shown}: label not written ({driver_problem(exc)})") from None
        row = self.get(inspection_id)
        assert row is not None
        return row

    def label_history(self, inspection_id: int) -> list[dict[str, Any]]:
        """Every label given to one inspection, oldest first (the last one is its current label)."""
        return self._rows(sa.select(labels.c.label, labels.c.label_by, labels.c.label_ms)
                          .where(labels.c.inspection_id == inspection_id).order_by(labels.c.id))

    # -- reading --------------------------------------------------------------------------------------------------
    def _rows(self, query: sa.Select[Any]) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def get(self, inspection_id: int) -> dict[str, Any] | None:
        rows = self._rows(sa.select(inspections).where(inspections.c.id == inspection_id))
        return rows[0] if rows else None

    def count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(inspections)).scalar_one())

    def inspections(self, *, model: str | None = None, origin: str | None = None) -> list[dict[str, Any]]:
        """Every inspection, oldest first (for tests and exports; the views below page and aggregate)."""
        query = sa.select(inspections).order_by(inspections.c.id)
        if model is not None:
            query = query.where(inspections.c.model_id == model)
        if origin is not None:
            query = query.where(inspections.c.origin == origin)
        return self._rows(query)

    def was_scored(self, source: str, sha256: str) -> bool:
        """Whether this file (its name and content) is already in the record: the watcher's exactly-once."""
        query = sa.select(inspections.c.id).where(inspections.c.sha256 == sha256,
                                                  inspections.c.source == source).limit(1)
        try:
            with self.engine.connect() as connection:
                return connection.execute(query).first() is not None
        except sa.exc.DBAPIError as exc:
            raise RecordUnavailable(f"record {self.shown}: cannot read ({driver_problem(exc)})") from None

    def models(self) -> list[dict[str, Any]]:
        """The models seen, newest first, each with its number of inspections."""
        counts = (sa.select(inspections.c.model_id, sa.func.count().label("inspections"))
                  .group_by(inspections.c.model_id).subquery())
        query = (sa.select(models, sa.func.coalesce(counts.c.inspections, 0).label("inspections"))
                 .select_from(models.outerjoin(counts, counts.c.model_id == models.c.id))
                 .order_by(models.c.first_seen_ms.desc()))
        found = self._rows(query)
        for row in found:
            row["calibration_scores"] = json.loads(row["calibration_scores"] or "[]")
        return found

    def model(self, model_id: str | None = None) -> dict[str, Any]:
        """One model's row (`model_id` its id, a prefix of it, or its name; None: the newest model with
        inspections); a RecordError naming what is known when there is none. Answered from the indexes (no count
        over the inspections)."""
        found = self._rows(sa.select(models).order_by(models.c.first_seen_ms.desc()))
        for row in found:
            row["calibration_scores"] = json.loads(row["calibration_scores"] or "[]")
        if model_id is None:
            with self.engine.connect() as connection:
                for row in found:
                    used = sa.select(inspections.c.id).where(inspections.c.model_id == row["id"]).limit(1)
                    if connection.execute(used).first() is not None:
                        return row
            raise RecordError(f"record {self.shown} holds no inspections yet")
        matches = [m for m in found if m["id"].startswith(model_id) or m["name"] == model_id]
        if not matches:
            known = ", ".join(f"{m['name']} ({m['id'][:12]})" for m in found) or "none"
            raise RecordError(f"record {self.shown} has no model {model_id!r}; known: {known}")
        return matches[0]

    def queue(self, *, verdict: str | None = None, model: str | None = None, since_ms: int | None = None,
              until_ms: int | None = None, labelled: bool = False, limit: int = 50, before_id: int | None = None,
              borderline: float = BORDERLINE) -> list[dict[str, Any]]:
        """The review queue, newest first: flagged images and those that passed with a normalised score of at
        least `borderline`, not yet labelled (`labelled`: the labelled ones instead); filtered by verdict
        ("defect", "good": the borderline ones, "error": the files that could not be scored, only there), model,
        time; newest first (by time, then id), paged by `before_id` (the last id of the page before)."""
        c = inspections.c
        if verdict is None:
            wanted = sa.or_(c.verdict == "defect",
                            sa.and_(c.verdict == "good", c.normalized_score >= borderline))
        elif verdict == "good":
            wanted = sa.and_(c.verdict == "good", c.normalized_score >= borderline)
        else:
            wanted = c.verdict == verdict
        query = sa.select(inspections).where(wanted, c.label.is_not(None) if labelled else c.label.is_(None))
        if model is not None:
            query = query.where(c.model_id == model)
        if since_ms is not None:
            query = query.where(c.at_ms >= since_ms)
        if until_ms is not None:
            query = query.where(c.at_ms < until_ms)
        if before_id is not None:  # after the row `before_id` in this order (keyset paging: pages never overlap)
            anchor = sa.select(c.at_ms).where(c.id == before_id).scalar_subquery()
            query = query.where(sa.or_(c.at_ms < anchor, sa.and_(c.at_ms == anchor, c.id < before_id)))
        return self._rows(query.order_by(c.at_ms.desc(), c.id.desc()).limit(limit))

    def labelled(self, model: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """The labelled inspections by label ({"good": [...], "defect": [...]}), oldest first."""
        query = sa.select(inspections).where(inspections.c.label.is_not(None)).order_by(inspections.c.id)
        if model is not None:
            query = query.where(inspections.c.model_id == model)
        found: dict[str, list[dict[str, Any]]] = {label: [] for label in LABELS}
        for row in self._rows(query):
            found[row["label"]].append(row)
        return found

    def recent(self, model: str, window: int) -> list[dict[str, Any]]:
        """The last `window` scored inspections of `model` (errors left out), newest first."""
        c = inspections.c
        query = (sa.select(c.id, c.at_ms, c.score, c.normalized_score, c.verdict, c.image_threshold, c.label)
                 .where(c.model_id == model, c.verdict != "error")
                 .order_by(c.at_ms.desc(), c.id.desc()).limit(window))
        return self._rows(query)

    def history(self, model: str, *, bucket: str = "hour", since_ms: int | None = None) -> list[dict[str, Any]]:
        """Per hour or day (UTC) for `model`: inspections, flagged ones, and the mean, lowest and highest score."""
        size = {"hour": 3_600_000, "day": 86_400_000}[bucket]
        c = inspections.c
        slot = (c.at_ms // size).label("slot")  # floor division in SQL, on both back ends
        query = (sa.select(slot, sa.func.count().label("n"),
                           sa.func.sum(sa.case((c.verdict == "defect", 1), else_=0)).label("flagged"),
                           sa.func.avg(c.score).label("mean_score"), sa.func.min(c.score).label("min_score"),
                           sa.func.max(c.score).label("max_score"))
                 .where(c.model_id == model, c.verdict != "error").group_by(slot).order_by(slot))
        if since_ms is not None:
            query = query.where(c.at_ms >= since_ms)
        rows = self._rows(query)
        for row in rows:
            row["start_ms"] = int(row.pop("slot")) * size
            row["flagged"] = int(row["flagged"] or 0)
            row["rate"] = row["flagged"] / row["n"] if row["n"] else None
        return rows

    def scores(self, model: str, *, limit: int = 2000) -> list[dict[str, Any]]:
        """The last `limit` scores of `model` with their time and threshold, oldest first (the score-over-time plot)."""
        c = inspections.c
        query = (sa.select(c.id, c.at_ms, c.score, c.image_threshold, c.verdict, c.label)
                 .where(c.model_id == model, c.verdict != "error").order_by(c.at_ms.desc(), c.id.desc()).limit(limit))
        return self._rows(query)[::-1]

    def table_info(self) -> dict[str, Any]:
        """Columns and indexes of the record's tables, as the database reports them (tests compare migrations)."""
        with self.engine.connect() as connection:
            inspector = sa.inspect(connection)
            return {
                table: {"columns": sorted(col["name"] for col in inspector.get_columns(table)),
                        "indexes": sorted(index["name"] for index in inspector.get_indexes(table))}
                for table in sorted(metadata.tables)
            }


def open_record(target: str | os.PathLike[str], *, create: bool = True, readonly: bool = False) -> Record:
    """Open (create unless not `create`, migrate) the record at `target`: a SQLite file path or a database URL.
    `readonly`: open an existing record for reading only (SQLite `mode=ro`, PostgreSQL read-only transactions):
    a read-only file, folder or mount is fine; nothing is written, so a record that needs migrating is refused."""
    return Record(target, create=create, readonly=readonly)
