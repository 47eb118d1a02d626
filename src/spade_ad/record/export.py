"""Getting inspections out of the record: `Selection` (which rows: verdict, label, time, model), `iter_rows` (them,
streamed in chunks, so a record of millions of rows exports in bounded memory), `write_csv` and `write_parquet`
(every column of the inspections table, plus `at` and `label_at` in ISO 8601 UTC), and `format_table` (a few
columns, aligned, for a terminal: `spade-ad record list`).

Only reads: open the record with `open_record(target, readonly=True)` (a read-only file, folder or mount is fine).
A file is written beside its destination and renamed into place when complete, so a failed export leaves no half
file. Parquet needs pyarrow (`pip install 'spade-ad[parquet]'`); CSV needs nothing more.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import sqlalchemy as sa

from .connection import RecordError
from .database import Record
from .schema import inspections

__all__ = ["FORMATS", "LABEL_CHOICES", "LIST_COLUMNS", "VERDICT_CHOICES", "Selection", "columns", "format_table",
           "iter_chunks", "iter_rows", "parse_time", "plain", "write_csv", "write_parquet"]

VERDICT_CHOICES = ("defect", "good", "error", "none")
"""What `--verdict` takes: the verdicts a row holds ("none": scored by a model without a threshold)."""
LABEL_CHOICES = ("good", "defect", "none")
"""What `--label` takes: the latest label given on the review page, or "none" (not labelled)."""
FORMATS = ("csv", "parquet")
LIST_COLUMNS = ("id", "at", "source", "model_name", "verdict", "score", "normalized_score", "label", "label_by")
"""The columns `format_table` shows by default."""
_CHUNK = 5000


def parse_time(value: str | None, option: str) -> int | None:
    """An ISO 8601 date or date-time (UTC unless it gives its offset) as milliseconds since 1970; a RecordError
    naming `option` when it is not one."""
    if value is None or value == "":
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise RecordError(f"{option}: not an ISO date or time (got {value!r}); e.g. 2026-12-03 or "
                          f"2026-12-03T14:00 (UTC) or 2026-12-03T14:00+01:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Selection:
    """Which inspections: `verdict` (one of VERDICT_CHOICES), `label` (LABEL_CHOICES; "none": not labelled),
    `since_ms` (at or after) and `until_ms` (before), `model` (id, id prefix or name), at most `limit` of them
    (the newest when `newest_first`, else the oldest), oldest first unless `newest_first`."""

    verdict: str | None = None
    label: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    model: str | None = None
    limit: int | None = None
    newest_first: bool = False

    def query(self, record: Record) -> sa.Select[Any]:
        """The SELECT over the inspections table (a RecordError for a bad choice or an unknown model)."""
        c = inspections.c
        query = sa.select(inspections)
        if self.verdict is not None:
            if self.verdict not in VERDICT_CHOICES:
                raise RecordError(f"--verdict must be one of {', '.join(VERDICT_CHOICES)} (got {self.verdict!r})")
            query = query.where(c.verdict == self.verdict)
        if self.label is not None:
            if self.label not in LABEL_CHOICES:
                raise RecordError(f"--label must be one of {', '.join(LABEL_CHOICES)} (got {self.label!r})")
            query = query.where(c.label.is_(None) if self.label == "none" else c.label == self.label)
        if self.since_ms is not None:
            query = query.where(c.at_ms >= self.since_ms)
        if self.until_ms is not None:
            query = query.where(c.at_ms < self.until_ms)
        if self.model is not None:
            query = query.where(c.model_id == record.model(self.model)["id"])
        order = (c.at_ms.desc(), c.id.desc()) if self.newest_first else (c.at_ms, c.id)
        query = query.order_by(*order)
        if self.limit is not None:
            if self.limit < 1:
                raise RecordError(f"--limit must be at least 1 (got {self.limit})")
            query = query.limit(self.limit)
        return query


def columns() -> list[str]:
    """The exported columns: `at`, then every column of the inspections table, then `label_at`."""
    return ["at", *(column.name for column in inspections.columns), "label_at"]


def _iso_column(values: Sequence[int | None]) -> list[str | None]:
    """Milliseconds as ISO 8601 UTC to the millisecond (`2026-12-03T14:00:00.000Z`), a chunk at a time."""
    stamps = np.array([v if v is not None else "NaT" for v in values], dtype="datetime64[ms]")
    return [None if text == "NaT" else text
            for text in np.datetime_as_string(stamps, unit="ms", timezone="UTC").tolist()]


def iter_chunks(record: Record, selection: Selection = Selection(),
                chunk: int = _CHUNK) -> Iterator[list[tuple[Any, ...]]]:
    """The selected inspections in lists of at most `chunk` tuples (the values of `columns()`, in that order)."""
    query = selection.query(record)
    names = [column.name for column in inspections.columns]
    at, label_ms = names.index("at_ms"), names.index("label_ms")
    with record.engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=chunk).execute(query)
        for part in result.partitions(chunk):
            times = _iso_column([row[at] for row in part] + [row[label_ms] for row in part])
            yield [(times[i], *row, times[len(part) + i]) for i, row in enumerate(part)]


def iter_rows(record: Record, selection: Selection = Selection(), chunk: int = _CHUNK) -> Iterator[dict[str, Any]]:
    """The selected inspections as dicts (`columns()`), read `chunk` rows at a time."""
    names = columns()
    for part in iter_chunks(record, selection, chunk):
        for values in part:
            yield dict(zip(names, values))


def _atomic(path: Path, binary: bool) -> tuple[IO[Any], str]:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise RecordError(f"output {path}: folder {folder} does not exist; create it or give another -o")
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    return (os.fdopen(handle, "wb") if binary else os.fdopen(handle, "w", newline="", encoding="utf-8")), name


def write_csv(record: Record, output: str | os.PathLike[str], selection: Selection = Selection()) -> int:
    """The selected inspections as CSV (a header of `columns()`, regions as JSON text, an empty cell for none) at
    `output` ("-": stdout); how many."""
    if os.fspath(output) == "-":
        return _write_csv(iter_chunks(record, selection), sys.stdout)
    path = Path(output)
    sink, part = _atomic(path, binary=False)
    try:
        with sink:
            count = _write_csv(iter_chunks(record, selection), sink)
        os.replace(part, path)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
    return count


def _write_csv(chunks: Iterator[list[tuple[Any, ...]]], sink: IO[str]) -> int:
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(columns())
    count = 0
    for part in chunks:
        writer.writerows(part)
        count += len(part)
    return count


def _arrow_schema() -> Any:
    import pyarrow as pa

    fields = [pa.field("at", pa.string())]
    for column in inspections.columns:
        python_type = column.type.python_type
        kind = pa.int64() if python_type is int else pa.float64() if python_type is float else pa.string()
        fields.append(pa.field(column.name, kind))
    fields.append(pa.field("label_at", pa.string()))
    return pa.schema(fields)


def write_parquet(record: Record, output: str | os.PathLike[str], selection: Selection = Selection(),
                  chunk: int = _CHUNK) -> int:
    """The selected inspections as a Parquet file at `output` (typed columns: integers, floats, text; `chunk` rows
    per row group); how many. Needs pyarrow: a RecordError saying which extra to install when it is missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise RecordError("--format parquet needs pyarrow, which is not installed: pip install 'spade-ad[parquet]' "
                          "(or export --format csv)") from None
    schema = _arrow_schema()
    path = Path(output)
    sink, part = _atomic(path, binary=True)
    count = 0
    try:
        with sink, pq.ParquetWriter(sink, schema) as writer:
            for rows in iter_chunks(record, selection, chunk):
                values = list(zip(*rows))
                writer.write_table(pa.Table.from_arrays([pa.array(column, type=field.type)
                                                         for column, field in zip(values, schema)], schema=schema))
                count += len(rows)
            if count == 0:  # the columns, no rows
                writer.write_table(schema.empty_table())
        os.replace(part, path)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
    return count


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if name == "at" and isinstance(value, str):
        return value[:19].replace("T", " ")  # to the second, UTC
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], names: Sequence[str] = LIST_COLUMNS, width: int = 40) -> str:
    """The rows as an aligned text table of the columns `names` (a cell cut to `width` characters)."""
    header = [name.replace("normalized_score", "normalised").replace("model_name", "model") for name in names]
    cells = [[_cell(name, row.get(name)) for name in names] for row in rows]
    cells = [[value if len(value) <= width else value[: width - 1] + "…" for value in line] for line in cells]
    widths = [max([len(header[i]), *(len(line[i]) for line in cells)]) for i in range(len(names))]
    numeric = {"id", "score", "normalized_score"}

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n in numeric else v.ljust(w)
                         for v, w, n in zip(values, widths, names)).rstrip()

    out = io.StringIO()
    out.write(line(header) + "\n")
    for values in cells:
        out.write(line(values) + "\n")
    return out.getvalue().rstrip("\n")


def plain(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON carries it: regions decoded."""
    item = dict(row)
    if isinstance(item.get("regions"), str):
        item["regions"] = json.loads(item["regions"])
    return item
