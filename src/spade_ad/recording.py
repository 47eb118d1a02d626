"""Predictions into the inspection record: `Recorder` turns each `Prediction` (or an image that could not be read)
into a row of `spade_ad.record` and writes them in batches; `RecordingWriter` is the `PredictionWriter` of
`spade_ad.writers` that also records each prediction with where its overlay, map and "why" picture were written.
`predict --record`, `watch` and the service all record through these, so a row means the same whoever made it.

Batches: rows are gathered and written in one transaction when `batch_size` rows are waiting, when the oldest has
waited `max_wait` seconds, on `flush` (the watcher flushes whenever its folder is idle) and on `close`. A crash loses
at most the batch not yet written. When the record goes away (a server stopped, a disk failed) the rows already
written stay, the failing batch and everything after it are kept in `unrecorded` (names), and the caller says so;
the outputs on disk are written as usual.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ImageReadError
from .prediction import Prediction
from .record import Record, RecordUnavailable, file_sha256, model_identity
from .writers import PredictionWriter

__all__ = ["Recorder", "RecordingWriter", "prediction_row", "verdict_of"]


def verdict_of(prediction: Prediction) -> str:
    if prediction.is_anomalous is None:
        return "none"
    return "defect" if prediction.is_anomalous else "good"


def prediction_row(prediction: Prediction, *, source: str | None = None, path: str | os.PathLike[str] | None = None,
                   sha256: str | None = None, **paths: Any) -> dict[str, Any]:
    """The record row of one prediction (model columns are added by the `Recorder`); `paths`: overlay_path,
    map_path, why_path."""
    file = path if path is not None else prediction.path
    if sha256 is None and file is not None and Path(file).is_file():
        sha256 = file_sha256(file)
    if prediction.image is not None:
        width, height = prediction.image.width, prediction.image.height
    elif prediction.original_map is not None:
        height, width = prediction.original_map.shape[:2]
    else:
        width = height = None
    return {
        "source": source if source is not None else prediction.name,
        "path": None if file is None else str(Path(file).resolve()),
        "sha256": sha256, "width": width, "height": height, "score": prediction.score,
        "normalized_score": prediction.normalized_score, "p_value": prediction.p_value,
        "image_threshold": prediction.image_threshold, "pixel_threshold": prediction.pixel_threshold,
        "verdict": verdict_of(prediction), "regions": [region.to_json() for region in prediction.regions],
        **{name: None if value is None else str(Path(value).resolve()) for name, value in paths.items()},
    }


class Recorder:
    """Writes predictions of one model to a record, in batches (see the module's description). Thread-safe."""

    def __init__(self, record: Record, model: Any, model_path: str | os.PathLike[str] | None, *, origin: str,
                 name: str | None = None, batch_size: int = 64, max_wait: float = 2.0,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.record = record
        self.origin = origin
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.on_failure = on_failure
        self.recorded = 0
        self.unrecorded: list[str] = []
        self.problem: str | None = None
        self._pending: list[dict[str, Any]] = []
        self._oldest = 0.0
        self._lock = threading.Lock()
        self.set_model(model, model_path, name=name)

    def set_model(self, model: Any, model_path: str | os.PathLike[str] | None, *, name: str | None = None) -> None:
        """Record the next predictions under this model (e.g. after `add` changed it: a new identity)."""
        self.flush()
        identity = model_identity(model, model_path, name=name)
        self.model_id = self.record.register_model(identity)
        self.model_name = identity["name"]
        self.settings_digest = identity["settings_digest"]

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
        row.update(origin=self.origin, model_id=self.model_id, model_name=self.model_name,
                   settings_digest=self.settings_digest)
        return row

    def write(self, rows: list[dict[str, Any]]) -> list[int]:
        """Write `rows` (from `row`) now, in one transaction, after what is waiting; their ids ([] when the record
        has failed: the rows are then counted in `unrecorded`)."""
        self.flush()
        with self._lock:
            if self.problem is None:
                try:
                    ids = self.record.add(rows)
                except RecordUnavailable as exc:
                    self.problem = str(exc)
                else:
                    self.recorded += len(rows)
                    return ids
            self.unrecorded.extend(row["source"] for row in rows)
        if self.on_failure is not None:
            self.on_failure(str(self.problem))
        return []

    def _queue(self, row: dict[str, Any]) -> None:
        self._complete(row)
        with self._lock:
            if self.problem is not None:
                self.unrecorded.append(row["source"])
                return
            if not self._pending:
                self._oldest = time.monotonic()
            self._pending.append(row)
            due = len(self._pending) >= self.batch_size or time.monotonic() - self._oldest >= self.max_wait
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the waiting rows now (one transaction)."""
        with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            if self.problem is not None:
                self.unrecorded.extend(row["source"] for row in batch)
                return
            try:
                self.record.add(batch)
                self.recorded += len(batch)
            except RecordUnavailable as exc:
                self.problem = str(exc)
                self.unrecorded.extend(row["source"] for row in batch)
                failed = True
            else:
                failed = False
        if failed and self.on_failure is not None:
            self.on_failure(str(self.problem))

    def close(self) -> None:
        self.flush()

    def write_unrecorded(self, folder: str | os.PathLike[str]) -> Path | None:
        """List the names that were not recorded in FOLDER/unrecorded.txt (one a line); None when there are none."""
        if not self.unrecorded:
            return None
        target = Path(folder) / "unrecorded.txt"
        target.write_text("".join(f"{name}\n" for name in self.unrecorded), encoding="utf-8")
        return target

    def summary(self) -> str:
        """One line: how many were recorded where, and what was not."""
        line = f"recorded {self.recorded} inspections in {self.record.shown}"
        if self.unrecorded:
            line += f"; NOT recorded: {len(self.unrecorded)} ({self.problem})"
        return line


class RecordingWriter(PredictionWriter):
    """A `PredictionWriter` that also records every prediction and every skipped input with `recorder`, with the
    paths of the files it wrote for it (overlay, raw map or heat map, why picture). Attach the recorder with
    `attach` (the writer is made by `PredictionWriter.for_model`)."""

    recorder: Recorder | None = None
    _saved: dict[str, Path]

    def attach(self, recorder: Recorder | None, *, sources: dict[str, dict[str, Any]] | None = None) -> None:
        """`sources`: per prediction name, fields of its row known to the caller (its path, sha256)."""
        self.recorder = recorder
        self.sources = sources

    def _save(self, save: Callable[[Path], object], folder: str, stem: str, suffix: str = ".png") -> None:
        super()._save(save, folder, stem, suffix)
        self._saved[folder] = self.out_dir / folder / f"{stem}{suffix}"

    def write(self, prediction: Prediction) -> None:
        self._saved = {}
        super().write(prediction)
        if self.recorder is not None:
            known = (getattr(self, "sources", None) or {}).get(prediction.name, {})
            self.recorder.add(prediction, **known, overlay_path=self._saved.get("overlays"),
                              map_path=self._saved.get("maps", self._saved.get("heatmaps")),
                              why_path=self._saved.get("explain"))

    def skip(self, name: str, error: ImageReadError) -> None:
        super().skip(name, error)
        if self.recorder is not None:
            path = error.path if Path(error.path).is_file() else None
            self.recorder.add_error(name, error, path=path)


def labelled_images(record: Record, model: Any, model_path: str | os.PathLike[str]) -> tuple[list[Path], list[Path],
                                                                                            int]:
    """The images labelled in `record` for this model, for `calibrate --record`: (good, defect, missing).

    "This model" is any version of it: rows recorded under its file's content hash or under its name (the file
    name, or the service's product name; `add` changes the hash, not the name). Good images that are now in the
    model's training set (added with "good" and --allow-add) are left out: their scores would be leave-one-in.
    `missing` counts labelled images whose file is no longer on disk."""
    identity = model_identity(model, model_path)
    names = {identity["name"], Path(model_path).stem}
    training = {str(Path(name).resolve()) for name in model.train_names_ if name}
    found: dict[str, list[Path]] = {"good": [], "defect": []}
    missing = 0
    for label, rows in record.labelled().items():
        for row in rows:
            if row["model_id"] != identity["id"] and row["model_name"] not in names:
                continue
            path = row["path"]
            if not path or not Path(path).is_file():
                missing += 1
                continue
            if label == "good" and str(Path(path).resolve()) in training:
                continue
            found[label].append(Path(path))
    return found["good"], found["defect"], missing
