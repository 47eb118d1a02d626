"""Predictions into the inspection record: `Recorder` turns each `Prediction` (or an image that could not be read)
into a row of `spade_ad.record` and writes them in batches; `Recorder.follow(writer)` subscribes it to a
`spade_ad.outputs.writers.PredictionWriter`, so that each prediction written is recorded with where its overlay, map and
"why" picture were written. `predict --record`, `watch` and the service all record through these, so a row means
the same whoever made it.

Batches: rows are gathered and written in one transaction when `batch_size` rows are waiting, when the oldest has
waited `max_wait` seconds, on `flush` (the watcher flushes whenever its folder is idle) and on `close`.

Outages: a record that is locked, full, deleted or unreachable does not end recording. The rows that could not be
written wait in the outbox: in memory and, with `outbox=FILE`, in that JSON Lines file (each row once, with its
model's identity), so that a crash or a restart loses none of them. Every `poll` (the watcher polls in its loop) and
every new row retry the record with a growing pause (`retry_after` seconds, doubling up to `retry_max`), waiting at
most `retry_wait` seconds for a lock; once the record answers the waiting rows are written, oldest first, and the
outbox file is emptied. Every row has a `uid`, and the record skips a uid it holds already, so a batch retried after
its commit was lost is never written twice. `on_failure(message)` and `on_resume(message)` say when recording
stopped and resumed, and how many rows waited. A Recorder opened on an outbox that an earlier run left writes it
first (the next start of `watch` or `predict`, or `spade-ad record backfill`). At most `max_waiting` rows wait: past
that, the newest are kept only by name in `unrecorded` (OUT/unrecorded.txt) and said so.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ImageReadError
from ..estimators.prediction import Prediction
from ..outputs.writers import PredictionWriter
from . import EvidenceChanged, Record, RecordUnavailable, file_sha256, model_identity, verified_image

__all__ = ["OUTBOX_FILE", "Recorder", "backfill", "labelled_images", "prediction_row"]

OUTBOX_FILE = "record-outbox.jsonl"
"""The outbox's file name in an output folder (`predict --record`, `watch --record`)."""


def prediction_row(prediction: Prediction, *, source: str | None = None, path: str | os.PathLike[str] | None = None,
                   sha256: str | None = None, **paths: Any) -> dict[str, Any]:
    """The record row of one prediction (model columns are added by the `Recorder`); `paths`: overlay_path,
    map_path, why_path, kept_path."""
    file = path if path is not None else prediction.path
    if sha256 is None and file is not None and Path(file).is_file():
        sha256 = file_sha256(file)
    width, height = prediction.image_size or (None, None)
    return {
        "source": source if source is not None else prediction.name,
        "path": None if file is None else str(Path(file).resolve()),
        "sha256": sha256, "width": width, "height": height, "score": prediction.score,
        "normalized_score": prediction.normalized_score, "p_value": prediction.p_value,
        "image_threshold": prediction.image_threshold, "pixel_threshold": prediction.pixel_threshold,
        "verdict": prediction.verdict, "regions": [region.to_json() for region in prediction.regions],
        **{name: None if value is None else str(Path(value).resolve()) for name, value in paths.items()},
    }


class Recorder:
    """Writes predictions of one model to a record, in batches, through outages (see the module's description).
    Thread-safe."""

    def __init__(self, record: Record, model: Any, model_path: str | os.PathLike[str] | None, *, origin: str,
                 name: str | None = None, batch_size: int = 64, max_wait: float = 2.0,
                 outbox: str | os.PathLike[str] | None = None, retry_after: float = 2.0, retry_max: float = 20.0,
                 retry_wait: float = 1.0, max_waiting: int = 100_000,
                 on_failure: Callable[[str], None] | None = None,
                 on_resume: Callable[[str], None] | None = None) -> None:
        self.record = record
        self.origin = origin
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.on_failure = on_failure
        self.on_resume = on_resume
        self.retry_after = retry_after
        self.retry_max = retry_max
        self.retry_wait = retry_wait
        self.max_waiting = max_waiting
        self.outbox = Path(outbox) if outbox is not None else None
        self.recorded = 0
        self.unrecorded: list[str] = []  # names past max_waiting: kept by name only
        self.problem: str | None = None
        self.backfilled = 0  # rows an earlier run left in the outbox, written by this one
        self._pending: list[dict[str, Any]] = []
        self._waiting: list[dict[str, Any]] = []
        self._models: dict[str, dict[str, Any]] = {}  # identities of the models of waiting rows
        self._registered: set[str] = set()
        self._oldest = 0.0
        self._next_try = 0.0
        self._delay = retry_after
        self._lock = threading.RLock()
        self._load_outbox()
        self.set_model(model, model_path, name=name)
        if self._waiting and not self.poll(force=True) and on_failure is not None:
            on_failure(f"{len(self._waiting)} inspections left waiting by an earlier run in {self.outbox} still "
                       f"cannot be written: {self.problem}; retrying")

    # -- the model --------------------------------------------------------------------------------------------------
    def set_model(self, model: Any, model_path: str | os.PathLike[str] | None, *, name: str | None = None) -> None:
        """Record the next predictions under this model (e.g. after `add` changed it: a new identity)."""
        self.flush()
        identity = model_identity(model, model_path, name=name)
        with self._lock:
            self._models[identity["id"]] = identity
            self.model_id = identity["id"]
            self.model_name = identity["name"]
            self.settings_digest = identity["settings_digest"]
            try:
                self._register(identity["id"])
            except RecordUnavailable as exc:
                self._fail(str(exc), [])

    def _register(self, model_id: str) -> None:
        if model_id not in self._registered:
            self.record.register_model(self._models[model_id])
            self._registered.add(model_id)

    # -- rows -------------------------------------------------------------------------------------------------------
    def add(self, prediction: Prediction, **fields: Any) -> None:
        """Record one prediction (`fields`: see `prediction_row`)."""
        self._queue(prediction_row(prediction, **fields))

    def add_error(self, source: str, error: BaseException | str, *, path: str | os.PathLike[str] | None = None,
                  sha256: str | None = None) -> None:
        """Record an input that could not be scored (verdict "error", the reason in `error`)."""
        reason = error.reason if isinstance(error, ImageReadError) else str(error)
        if sha256 is None and path is not None and Path(path).is_file():
            sha256 = file_sha256(path)
        self._queue({"source": source, "path": None if path is None else str(Path(path).resolve()),
                     "sha256": sha256, "verdict": "error", "error": reason})

    def row(self, prediction: Prediction, **fields: Any) -> dict[str, Any]:
        """The complete row of one prediction (its model's columns included), to `write` at once."""
        return self._complete(prediction_row(prediction, **fields))

    def _complete(self, row: dict[str, Any]) -> dict[str, Any]:
        row.setdefault("uid", uuid.uuid4().hex)
        row.setdefault("at_ms", int(time.time() * 1000))
        row.update(origin=self.origin, model_id=self.model_id, model_name=self.model_name,
                   settings_digest=self.settings_digest)
        return row

    def write(self, rows: list[dict[str, Any]]) -> list[int]:
        """Write `rows` (from `row`) now, in one transaction, after what is waiting; their ids ([] when the record
        does not answer: the rows then wait in the outbox)."""
        self.flush()
        with self._lock:
            if not self._waiting:
                try:
                    self._register(self.model_id)
                    ids = self.record.add(rows)
                except RecordUnavailable as exc:
                    self._fail(str(exc), rows)
                    return []
                self.recorded += len(rows)
                return ids
            self._wait(rows)
        self.poll()
        return []

    def _queue(self, row: dict[str, Any]) -> None:
        self._complete(row)
        with self._lock:
            if self._waiting:  # an outage: behind the rows that wait, in order
                self._wait([row])
                due = False
            else:
                if not self._pending:
                    self._oldest = time.monotonic()
                self._pending.append(row)
                due = len(self._pending) >= self.batch_size or time.monotonic() - self._oldest >= self.max_wait
        if due:
            self.flush()
        else:
            self.poll()

    def flush(self) -> None:
        """Write the waiting rows now (one transaction); in an outage, retry the record if its pause is over."""
        with self._lock:
            batch, self._pending = self._pending, []
            if self._waiting:
                self._wait(batch)
            elif batch:
                try:
                    self._register(self.model_id)
                    self.record.add(batch)
                except RecordUnavailable as exc:
                    self._fail(str(exc), batch)
                else:
                    self.recorded += len(batch)
        self.poll()

    @property
    def waiting(self) -> int:
        """How many rows wait for the record (an outage)."""
        return len(self._waiting)

    def poll(self, *, force: bool = False) -> bool:
        """In an outage, try the record again if the pause is over (`force`: now); True once nothing waits."""
        with self._lock:
            if not self._waiting:
                return True
            if not force and time.monotonic() < self._next_try:
                return False
            waited = len(self._waiting)
            try:
                self.record.reopen()
                for model_id in {row["model_id"] for row in self._waiting if row.get("model_id")}:
                    self._register(model_id)
                while self._waiting:
                    chunk = self._waiting[:500]
                    self.record.add(chunk, wait=self.retry_wait)
                    del self._waiting[:len(chunk)]
                    self.recorded += len(chunk)
            except RecordUnavailable as exc:
                self.problem = str(exc)
                self._next_try = time.monotonic() + self._delay
                self._delay = min(self._delay * 2, self.retry_max)
                self._rewrite_outbox()
                return False
            self._rewrite_outbox()
            self.problem = None
            self._delay = self.retry_after
        if self.on_resume is not None:
            self.on_resume(f"recording resumed in {self.record.shown}: the {waited} inspection"
                           f"{'s' if waited != 1 else ''} that waited {'are' if waited != 1 else 'is'} written")
        return True

    def follow(self, writer: PredictionWriter,
               fields: Callable[[str], Mapping[str, Any]] | None = None) -> PredictionWriter:
        """Record every prediction `writer` writes, with the paths of its files (overlay, raw map or heat map, why
        picture), and every input it lists as skipped (verdict "error"); `fields(name)`: the row's fields known to
        the caller for that prediction (its path, sha256, kept_path). Returns `writer`."""
        def written(prediction: Prediction, paths: Mapping[str, Path]) -> None:
            known = dict(fields(prediction.name)) if fields is not None else {}
            self.add(prediction, **known, overlay_path=paths.get("overlays"),
                     map_path=paths.get("maps", paths.get("heatmaps")), why_path=paths.get("explain"))

        def skipped(name: str, error: ImageReadError) -> None:
            known = dict(fields(name)) if fields is not None else {}
            path = known.get("path") or (error.path if Path(error.path).is_file() else None)
            self.add_error(name, error, path=path, sha256=known.get("sha256"))

        writer.subscribe(written, on_skipped=skipped)
        return writer

    # -- the outbox -------------------------------------------------------------------------------------------------
    def _fail(self, problem: str, rows: list[dict[str, Any]]) -> None:
        """The record did not answer: `rows` wait (under the lock)."""
        first = not self._waiting
        self.problem = problem
        self._registered.clear()  # a record put back may have lost them
        self._wait(rows)
        self._next_try = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.retry_max)
        if first and self.on_failure is not None:
            where = f" in {self.outbox}" if self.outbox is not None else " in memory"
            self.on_failure(f"recording stopped: {problem}; inspections wait{where} and are written when the record "
                            f"answers again")

    def _wait(self, rows: list[dict[str, Any]]) -> None:
        room = self.max_waiting - len(self._waiting)
        kept, dropped = rows[:max(room, 0)], rows[max(room, 0):]
        if dropped:
            self.unrecorded.extend(row["source"] for row in dropped)
        if not kept:
            return
        self._waiting.extend(kept)
        if self.outbox is not None:
            with open(self.outbox, "a", encoding="utf-8") as handle:
                for model_id in {row.get("model_id") for row in kept} - {None}:
                    handle.write(json.dumps({"model": self._models[model_id]}) + "\n")
                for row in kept:
                    handle.write(json.dumps({"row": row}) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def _rewrite_outbox(self) -> None:
        """The outbox file holds exactly what waits (written whole: a temporary file, then renamed)."""
        if self.outbox is None or not (self.outbox.exists() or self._waiting):
            return
        if not self._waiting:
            self.outbox.unlink(missing_ok=True)
            return
        partial = self.outbox.with_name(self.outbox.name + ".partial")
        with open(partial, "w", encoding="utf-8") as handle:
            for model_id in {row.get("model_id") for row in self._waiting} - {None}:
                handle.write(json.dumps({"model": self._models[model_id]}) + "\n")
            for row in self._waiting:
                handle.write(json.dumps({"row": row}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.outbox)

    def _load_outbox(self) -> None:
        if self.outbox is None or not self.outbox.exists():
            return
        for item in read_outbox(self.outbox):
            if "model" in item:
                self._models[item["model"]["id"]] = item["model"]
            elif "row" in item:
                self._waiting.append(item["row"])
        self.backfilled = len(self._waiting)
        self.problem = "rows left by an earlier run"

    def close(self) -> None:
        """Write what is pending (one last try of the record in an outage: the rest stays in the outbox)."""
        self.flush()
        self.poll(force=True)

    def write_unrecorded(self, folder: str | os.PathLike[str]) -> Path | None:
        """List the names that are not in the record (waiting in the outbox, or past its bound) in
        FOLDER/unrecorded.txt (one a line); None when there are none (an earlier list is then removed)."""
        target = Path(folder) / "unrecorded.txt"
        names = [row["source"] for row in self._waiting] + self.unrecorded
        if not names:
            target.unlink(missing_ok=True)
            return None
        target.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
        return target

    def summary(self) -> str:
        """One line: how many were recorded where, and what was not."""
        count = self.recorded
        line = f"recorded {count} inspection{'s' if count != 1 else ''} in {self.record.shown}"
        if self.backfilled:
            line += f" ({self.backfilled} of them left waiting by an earlier run)"
        if self._waiting:
            where = f"in {self.outbox}" if self.outbox is not None else "in memory only: lost at exit"
            line += (f"; {len(self._waiting)} WAITING {where} ({self.problem}): they are written at the next start, "
                     f"or with `spade-ad record backfill`")
        if self.unrecorded:
            line += f"; NOT recorded: {len(self.unrecorded)} (past the outbox's {self.max_waiting} rows)"
        return line


def read_outbox(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The items of an outbox file (a line cut short by a crash is left out)."""
    items = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return items


def backfill(record: Record, outbox: str | os.PathLike[str]) -> int:
    """Write the rows an outbox file holds into `record` (each once: rows it holds already are skipped by uid) and
    remove the file; how many rows it held."""
    items = read_outbox(outbox)
    models = {item["model"]["id"]: item["model"] for item in items if "model" in item}
    rows = [item["row"] for item in items if "row" in item]
    for model_id in {row.get("model_id") for row in rows} - {None}:
        if model_id in models:
            record.register_model(models[model_id])
    for start in range(0, len(rows), 500):
        record.add(rows[start:start + 500])
    Path(outbox).unlink()
    return len(rows)


def labelled_images(record: Record, model: Any, model_path: str | os.PathLike[str]) -> tuple[list[Path], list[Path],
                                                                                            list[str]]:
    """The images labelled in `record` for this model, for `calibrate --record`: (good, defect, refused).

    "This model" is any version of it: rows recorded under its file's content hash or under its name (the file
    name, or the service's product name; `add` changes the hash, not the name). Good images that are now in the
    model's training set (added with "good" and --allow-add) are left out: their scores would be leave-one-in.
    Each image is the one inspected (`spade_ad.record.verified_image`: its kept copy, or its file if the SHA-256
    still matches); `refused` says, one line each, which labelled inspections were left out because their image
    changed or is gone. Rows that could not be scored (verdict "error") are never used."""
    identity = model_identity(model, model_path)
    names = {identity["name"], Path(model_path).stem}
    training = {str(Path(name).resolve()) for name in model.train_names_ if name}
    found: dict[str, list[Path]] = {"good": [], "defect": []}
    refused: list[str] = []
    for label, rows in record.labelled().items():
        for row in rows:
            if row["model_id"] != identity["id"] and row["model_name"] not in names:
                continue
            if row["verdict"] == "error":
                continue
            try:
                path = verified_image(row)
            except EvidenceChanged as exc:
                refused.append(str(exc))
                continue
            if label == "good" and row.get("path") and str(Path(row["path"]).resolve()) in training:
                continue
            found[label].append(path)
    return found["good"], found["defect"], refused
