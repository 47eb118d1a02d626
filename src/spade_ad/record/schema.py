"""The inspection record's tables and the migrations that build them (SQLAlchemy Core, SQLite and PostgreSQL alike).

A record is built by applying `MIGRATIONS` in order, from version 0 (an empty database) to `SCHEMA_VERSION`; the
version reached is kept in the table `spade_schema` (one row per applied step). A newer release appends steps and
applies the missing ones to an older record when it opens it; a record of a newer version than this release knows is
refused (`spade_ad.record.database`), never written to. The Table objects below describe the latest version: a fresh
record and a migrated one have the same columns and indexes (tests compare them).

Times are integer milliseconds since 1970 (UTC): one type on both back ends, ordered and bucketed (per hour, per day)
with integer division in SQL alike.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

SCHEMA_VERSION = 3
"""The record schema this release writes (see `MIGRATIONS`)."""

metadata = sa.MetaData()

versions = sa.Table(
    "spade_schema", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_ms", sa.BigInteger, nullable=False),
    sa.Column("release", sa.String(40), nullable=False),
)

models = sa.Table(
    "spade_models", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # sha256 of the model file (or of the bundle's files)
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),  # "model file" | "bundle"
    sa.Column("settings_digest", sa.String(64), nullable=False),
    sa.Column("image_threshold", sa.Float),
    sa.Column("pixel_threshold", sa.Float),
    sa.Column("false_alarm_rate", sa.Float),
    sa.Column("calibration_source", sa.String(40)),
    sa.Column("calibration_scores", sa.Text),  # JSON list: the good images' (leave-one-out) scores, for drift
    sa.Column("first_seen_ms", sa.BigInteger, nullable=False),
)



def _inspection_columns() -> list[sa.Column]:
    """The inspections' columns of release 1 (new Column objects at each call)."""
    return [
        sa.Column("id", sa.Integer().with_variant(sa.BigInteger, "postgresql"), primary_key=True, autoincrement=True),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("origin", sa.String(20), nullable=False),  # predict | watch | serve
        sa.Column("source", sa.Text, nullable=False),  # the file's name (relative to the input folder) or upload name
        sa.Column("path", sa.Text),  # where the file is now (absolute), when it is on this machine's disk
        sa.Column("sha256", sa.String(64)),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("spade_models.id")),
        sa.Column("model_name", sa.String(200)),
        sa.Column("settings_digest", sa.String(64)),
        sa.Column("score", sa.Float),
        sa.Column("normalized_score", sa.Float),
        sa.Column("p_value", sa.Float),
        sa.Column("image_threshold", sa.Float),
        sa.Column("pixel_threshold", sa.Float),
        sa.Column("verdict", sa.String(10), nullable=False),  # good | defect | none (no threshold) | error
        sa.Column("regions", sa.Text),  # JSON list of Region.to_json()
        sa.Column("map_path", sa.Text),
        sa.Column("overlay_path", sa.Text),
        sa.Column("label", sa.String(10)),  # None | good | defect
        sa.Column("label_by", sa.String(200)),
        sa.Column("label_ms", sa.BigInteger),
        sa.Column("error", sa.Text),  # why the file could not be scored (verdict "error")
    ]


inspections = sa.Table(
    "spade_inspections", metadata, *_inspection_columns(),
    sa.Column("why_path", sa.Text),  # version 2: the "why" picture of a flagged image
    sa.Column("uid", sa.String(32)),  # version 3: unique per inspection, so that a row written twice is kept once
    sa.Column("kept_path", sa.Text),  # version 3: the kept copy of the image as inspected (content-addressed)
)

# version 3: every label given, with who and when (the inspection's label columns hold the latest one).
labels = sa.Table(
    "spade_labels", metadata,
    sa.Column("id", sa.Integer().with_variant(sa.BigInteger, "postgresql"), primary_key=True, autoincrement=True),
    sa.Column("inspection_id", sa.Integer().with_variant(sa.BigInteger, "postgresql"),
              sa.ForeignKey("spade_inspections.id"), nullable=False),
    sa.Column("label", sa.String(10), nullable=False),
    sa.Column("label_by", sa.String(200)),
    sa.Column("label_ms", sa.BigInteger, nullable=False),
    sa.Index("ix_spade_labels_inspection", "inspection_id", "id"),
)

# version 2: what the review queue, the watcher's "already scored?" and drift ask for, answered from indexes.
INDEXES = (
    sa.Index("ix_spade_inspections_at", inspections.c.at_ms),
    sa.Index("ix_spade_inspections_model_at", inspections.c.model_id, inspections.c.at_ms),
    sa.Index("ix_spade_inspections_sha", inspections.c.sha256),
    sa.Index("ix_spade_inspections_source", inspections.c.source),
    sa.Index("ix_spade_inspections_label", inspections.c.label, inspections.c.at_ms),
)
# version 3: a row written again (a retried batch whose commit was not acknowledged) is recognised by its uid.
UID_INDEX = sa.Index("ux_spade_inspections_uid", inspections.c.uid, unique=True)


def _v1(connection: sa.Connection) -> None:
    """Release 1: versions, models and inspections (without the why pictures and without indexes)."""
    old = sa.MetaData()
    for table in (versions, models):
        table.to_metadata(old)
    sa.Table(inspections.name, old, *_inspection_columns())
    old.create_all(connection)


def _v2(connection: sa.Connection) -> None:
    """Release 2: the why picture's path, and the indexes of the review queue, the watcher and drift."""
    connection.execute(sa.text(f"ALTER TABLE {inspections.name} ADD COLUMN why_path TEXT"))
    for index in INDEXES:
        index.create(connection)


def _v3(connection: sa.Connection) -> None:
    """Release 3: each inspection's uid and kept image; the label history (earlier labels carried over)."""
    for column in ("uid VARCHAR(32)", "kept_path TEXT"):
        connection.execute(sa.text(f"ALTER TABLE {inspections.name} ADD COLUMN {column}"))
    UID_INDEX.create(connection)
    labels.create(connection)
    c = inspections.c
    connection.execute(labels.insert().from_select(
        ["inspection_id", "label", "label_by", "label_ms"],
        sa.select(c.id, c.label, c.label_by, sa.func.coalesce(c.label_ms, c.at_ms)).where(c.label.is_not(None))))


MIGRATIONS: list[tuple[int, Callable[[sa.Connection], None]]] = [(1, _v1), (2, _v2), (3, _v3)]
"""(version, step): applied in order to records below that version, each in the transaction that records it."""
assert MIGRATIONS[-1][0] == SCHEMA_VERSION
