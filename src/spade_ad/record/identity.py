"""What a record row says about its model and its image: the model's identity (a content hash of its file, or of
its bundle's files, and its name), the digest of its settings, and a file's SHA-256."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..data.inputs import file_sha256
from ..settings import stored

__all__ = ["file_sha256", "model_identity", "settings_digest"]


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_hash(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(sha256, kind) of a model file ("model file") or of a bundle folder ("bundle": every file's relative name and
    content, in name order), so that the same model copied elsewhere has the same identity."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path), "model file"
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(item.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file_sha256(item).encode())
    return digest.hexdigest(), "bundle"


def settings_digest(model: Any) -> str:
    """sha256 of the model's stored settings (sorted JSON): two models fitted alike have the same digest."""
    text = json.dumps(stored(model.get_params()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_identity(model: Any, path: str | os.PathLike[str] | None, name: str | None = None) -> dict[str, Any]:
    """The `spade_models` row of a fitted model (a `Spade` or a `Runtime`) loaded from `path` (a model file or a
    bundle folder; None, or a path that is not there, for a model only in memory: then identified by its settings and
    calibration scores)."""
    cal = model.calibration_
    if path is not None and Path(path).exists():
        model_id, kind = content_hash(path)
        shown = name or Path(path).name
    else:
        text = json.dumps([stored(model.get_params()), list(cal.scores), len(model.train_names_)], default=str)
        model_id, kind, shown = hashlib.sha256(text.encode()).hexdigest(), "in memory", name or "model"
    return {
        "id": model_id, "name": shown, "kind": kind, "settings_digest": settings_digest(model),
        "image_threshold": cal.image_threshold, "pixel_threshold": cal.pixel_threshold,
        "false_alarm_rate": cal.false_alarm_rate, "calibration_source": cal.source,
        "calibration_scores": json.dumps([float(s) for s in cal.scores]),
    }
