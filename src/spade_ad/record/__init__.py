"""The inspection record: every prediction of `predict`, `watch` and the service in a database (SQLite file by
default, PostgreSQL by URL), with its review label (`schema` the tables and migrations, `connection` the database a
target names and its engine, `store` the `Record`, `identity` model and file hashes, `evidence` the kept images,
`export` rows out as CSV, Parquet or a table). SQLAlchemy 2 Core; imported only when a record is asked for."""

from __future__ import annotations

from .connection import RecordError, RecordUnavailable, now_ms, shown
from .database import BORDERLINE, LABELS, Record, open_record
from .evidence import EvidenceChanged, EvidenceStore, default_files_dir, verified_image
from .identity import file_sha256, model_identity, settings_digest
from .schema import SCHEMA_VERSION

__all__ = ["BORDERLINE", "LABELS", "SCHEMA_VERSION", "EvidenceChanged", "EvidenceStore", "Record", "RecordError",
           "RecordUnavailable", "default_files_dir", "file_sha256", "model_identity", "now_ms", "open_record",
           "settings_digest", "shown", "verified_image"]
