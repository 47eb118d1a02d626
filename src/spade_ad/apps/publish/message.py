"""The published message of one inspection (schema `spade-ad/inspection`, version 1): what a reject gate, a PLC
gateway or a line dashboard reads. The JSON schema is `inspection-v1.schema.json` beside this file
(`SCHEMA_FILE`); docs/publish.md documents it with an example.

A message's `id` is stable: the SHA-256 of the source name, the file's SHA-256 and the model id (and the record's
inspection id when there is one), so the same inspection published twice (a retry, a restart) carries the same id
and a consumer that keeps the ids it has seen acts on it once.
"""

from __future__ import annotations

import hashlib
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...estimators.prediction import Prediction

__all__ = [
    "MAX_REGIONS", "SCHEMA_FILE", "SCHEMA_NAME", "SCHEMA_VERSION", "error_message", "inspection_message", "message_id",
]

SCHEMA_NAME = "spade-ad/inspection"
SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("inspection-v1.schema.json")
MAX_REGIONS = 100  # the strongest regions a message carries; `regions_total` counts them all


def message_id(source: str, sha256: str | None, model_id: str | None, inspection_id: int | None = None) -> str:
    """The stable id of an inspection: 32 hex digits of the SHA-256 of its source name, file SHA-256 and model id
    (and the record's inspection id when given)."""
    parts = [source, sha256 or "", model_id or ""]
    if inspection_id is not None:
        parts.append(str(int(inspection_id)))
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


def _number(value: Any) -> float | None:
    """A finite float for JSON, None for a missing or non-finite value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def iso_time(at: float | datetime | None = None) -> str:
    """UTC time in ISO 8601 with milliseconds and a Z: `2026-12-06T15:40:01.123Z` (now when `at` is None)."""
    if at is None:
        at = time.time()
    moment = at if isinstance(at, datetime) else datetime.fromtimestamp(float(at), tz=timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def inspection_message(prediction: Prediction, *, source: str, sha256: str | None, model_name: str,
                       model_id: str | None, inspection_id: int | None = None,
                       at: float | datetime | None = None) -> dict[str, Any]:
    """The versioned message of one inspection (see the module's description and `SCHEMA_FILE`): `source` the
    file's name as the line knows it (relative to the watched folder, or the upload's name), `sha256` its content
    hash, `model_name` / `model_id` the model that judged it (the record's model identity), `inspection_id` the
    record's row id when recorded, `at` when it was inspected (seconds since the epoch or a datetime; now)."""
    verdict = prediction.verdict  # "none": an uncalibrated model, no threshold, no verdict
    width, height = prediction.image_size or (None, None)
    found_in = prediction.original_map if prediction.original_map is not None else prediction.anomaly_map
    regions = prediction.regions
    return {
        **_envelope(source, sha256, model_name, model_id, inspection_id, at),
        "score": _number(prediction.score),
        "normalized_score": _number(prediction.normalized_score),
        "p_value": _number(prediction.p_value),
        "image_threshold": _number(prediction.image_threshold),
        "verdict": verdict,
        "width": width,
        "height": height,
        "map_size": [int(found_in.shape[1]), int(found_in.shape[0])],
        "regions": [
            {"box": [int(v) for v in region.box], "area": int(region.area), "peak": _number(round(region.peak, 6)),
             "mean": _number(round(region.mean, 6))}  # as regions.jsonl and the record write them
            for region in regions[:MAX_REGIONS]
        ],
        "regions_total": len(regions),
        "error": None,
    }


def _envelope(source: str, sha256: str | None, model_name: str, model_id: str | None, inspection_id: int | None,
              at: float | datetime | None) -> dict[str, Any]:
    """The fields every message starts with, in this order: schema, its version, the message id, the record's row,
    the time, the file, its hash and the model."""
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "id": message_id(source, sha256, model_id, inspection_id),
        "inspection_id": None if inspection_id is None else int(inspection_id),
        "time": iso_time(at),
        "file": source,
        "sha256": sha256,
        "model": {"name": model_name, "id": model_id},
    }


def error_message(*, source: str, sha256: str | None, reason: str, model_name: str, model_id: str | None,
                  inspection_id: int | None = None, at: float | datetime | None = None) -> dict[str, Any]:
    """The message of an image that could not be inspected (not an image, broken, too large): verdict "error",
    `error` the reason in words, no scores. A reject gate should treat the part as not passed."""
    return {
        **_envelope(source, sha256, model_name, model_id, inspection_id, at),
        "score": None,
        "normalized_score": None,
        "p_value": None,
        "image_threshold": None,
        "verdict": "error",
        "width": None,
        "height": None,
        "map_size": None,
        "regions": [],
        "regions_total": 0,
        "error": reason,
    }
