"""Model files: one safetensors file holding the stored features, with settings, versions and the backbone's
identity as JSON in its header. No pickle. A checksum over the header and every tensor catches truncated or
tampered files; the backbone's weights checksum catches a model loaded against different weights.

The file is written and read in a streaming way so that models with thousands of training images never need their
features in memory: pyramid features are copied chunk by chunk when saving and memory-mapped when loading. The
layout is plain safetensors (8-byte header length, JSON header, raw little-endian data), readable by any
safetensors reader.

This module knows the settings table, never the estimator or torch: `spade_ad.estimators.spade` builds a `Spade` (and
its torch feature store) from the `ModelContents` read here, and the torch-free runtime (`spade_ad.estimators.runtime`)
reads the same contents from a bundle.

Over 300 lines: the streaming safetensors writer/reader and the checks that a loaded file can never fail
later (every header field and every tensor's shape, dtype and range) belong together; the fuzz test exercises both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import settings as settings_table
from .._version import __version__
from ..errors import ModelFileError, SettingError

FORMAT = "spade-ad-model"
#: 2: conformal calibration (leave-one-out scores, pixel quantiles, score scales) replaced the margin rule.
#: 3: the global feature of the square view (setting global_view) and the fused image score (map_top + kNN).
FORMAT_VERSION = 3
_CHUNK_BYTES = 64 * 2**20
_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"),
           "I32": np.dtype("<i4"), "U8": np.dtype("u1")}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_PLACEHOLDER = "0" * 64


def _chunks(array: np.ndarray) -> Iterator[bytes]:
    """The array's bytes in C order, a few tens of MB at a time (memory maps are read lazily)."""
    flat = array.reshape(-1) if array.ndim else array.reshape(1)
    step = max(1, _CHUNK_BYTES // max(1, flat.itemsize))
    for start in range(0, flat.shape[0], step):
        yield np.ascontiguousarray(flat[start:start + step]).tobytes()


def _hashed_data(arrays: dict[str, np.ndarray], digest: Any) -> Iterator[bytes]:
    """The arrays' bytes in name order (the file's data layout), feeding `digest` with each array's name, shape,
    dtype and bytes on the way: one definition of the checksum for writing and for verifying."""
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(f"{name}:{tuple(array.shape)}:{_DTYPE_NAMES[array.dtype]}".encode())
        for chunk in _chunks(array):
            digest.update(chunk)
            yield chunk


def content_sha256(header_json: str, arrays: dict[str, np.ndarray]) -> str:
    """Checksum of the JSON header and the named arrays (names, shapes, dtypes, bytes), in name order."""
    digest = hashlib.sha256(header_json.encode())
    for _ in _hashed_data(arrays, digest):
        pass
    return digest.hexdigest()


@dataclass
class StoredArrays:
    """The stored features as numpy arrays: global features (N, D) float32 in memory; per level, every spatial
    vector of every image (n_vectors, C_l), memory-mapped; each image's map shape per level (N, L, 2); per level,
    each image's rows in coreset order (int32, within-image)."""

    global_features: np.ndarray
    levels: list[np.ndarray]
    shapes: np.ndarray
    orders: list[np.ndarray]


@dataclass
class ModelContents:
    """What a model file holds: validated settings, the backbone's identity, training image names, calibration,
    metrics, versions and the feature store (pyramid levels memory-mapped)."""

    settings: dict[str, Any]
    backbone: dict[str, Any]
    train_names: list[str]
    calibration: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, Any]
    store: StoredArrays
    thumbnails: list[np.ndarray]  # small uint8 RGB images (h, w, 3) of the training images, or []
    roi: np.ndarray | None = None  # the region of interest (bool (H, W), original pixels, True = inspect) or None


def store_arrays(store: Any) -> dict[str, np.ndarray]:
    """A feature store's (`spade_ad.core.feature_store.FeatureStore` or `StoredArrays`) features as named arrays (levels
    stay memory-mapped)."""
    arrays = {"global_features": np.asarray(store.global_features, dtype="<f4"), "shapes": store.shapes.astype("<i8")}
    arrays.update({f"level_{i}": level for i, level in enumerate(store.levels)})
    arrays.update({f"order_{i}": order.astype("<i4") for i, order in enumerate(store.orders or [])})
    return arrays


def write_model(path: Path, *, settings: dict[str, Any], backbone: dict[str, Any], store: Any,
                train_names: list[str], calibration: dict[str, Any], metrics: dict[str, Any],
                thumbnails: list[np.ndarray] | None = None, versions: dict[str, str] | None = None,
                roi: np.ndarray | None = None) -> Path:
    """Write a fitted model to `path`, atomically: into a partial file first (see `partial_path`), renamed when
    complete. A crash never leaves a half-written file under that name, and a failed or interrupted write leaves no
    partial file either (a killed process's one is deleted by the next save of the same path on this host).

    `settings` are checked against the settings table first: a file is never written with settings it would refuse
    to load."""
    versions = {"spade_ad": __version__, **(versions or {}), "python": platform.python_version()}
    header = {"settings": settings_table.stored(settings_table.validate(settings)), "backbone": backbone,
              "train_names": train_names, "calibration": calibration, "metrics": metrics, "versions": versions}
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    partial = partial_path(path)
    try:
        arrays = store_arrays(store)
        if thumbnails:
            arrays["thumbnails"] = np.concatenate([np.asarray(th, dtype=np.uint8).ravel() for th in thumbnails])
            arrays["thumbnail_shapes"] = np.array([th.shape[:2] for th in thumbnails], dtype="<i8")
        if roi is not None:  # the region of interest, 0/1 per original pixel (a file without it inspects all)
            arrays["roi"] = np.asarray(roi, dtype=bool).astype(np.uint8)
        write_safetensors(partial, arrays, json.dumps(header))
        os.replace(partial, path)
    except BaseException:  # a failed or interrupted write leaves neither a model nor a partial file behind
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise
    return path


def partial_path(path: Path) -> Path:
    """Where `write_model` writes before renaming: `<name>.<host>.<pid>.partial`, so that two processes (or hosts
    sharing a folder) saving the same model never write the same file; stale ones are removed before a save."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.partial")


def _remove_stale_partials(path: Path) -> None:
    """Delete partial files of `path` left on this host by killed processes (no process with their pid runs) or by
    this one (a pid reused: about to be written again)."""
    prefix = f"{path.name}.{socket.gethostname()}."
    with contextlib.suppress(OSError):
        for stale in [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".partial")]:
            pid = stale.name[len(prefix):-len(".partial")]
            if not (pid.isascii() and pid.isdigit()):
                continue
            try:
                if int(pid) != os.getpid():
                    os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
                    continue
            except ProcessLookupError:
                pass
            except (OSError, OverflowError):  # another user's process (EPERM), or no way to tell: leave it
                continue
            stale.unlink(missing_ok=True)


def write_safetensors(path: Path, arrays: dict[str, np.ndarray], header_json: str) -> None:
    """Stream `arrays` into a safetensors file whose metadata carries `header_json` and the content checksum.

    The checksum is computed while the data is written, then patched into the header (fixed-width field)."""
    entries: dict[str, Any] = {}
    offset = 0
    for name in sorted(arrays):
        size = arrays[name].size * arrays[name].dtype.itemsize
        entries[name] = {
            "dtype": _DTYPE_NAMES[arrays[name].dtype], "shape": list(arrays[name].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "header": header_json,
                "content_sha256": _PLACEHOLDER}
    encoded = json.dumps({"__metadata__": metadata, **entries}).encode()
    encoded += b" " * (-len(encoded) % 8)
    digest = hashlib.sha256(header_json.encode())
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for chunk in _hashed_data(arrays, digest):
            handle.write(chunk)
        checksum = digest.hexdigest()
        handle.seek(8 + encoded.index(_PLACEHOLDER.encode()))
        handle.write(checksum.encode())


def read_model_file(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify a model file: (header, arrays). Pyramid levels come back memory-mapped, the rest in memory.
    Raises ModelFileError on any problem (never another exception, whatever the bytes)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    unreadable = (f"{path} is not a readable spade-ad model file (truncated, damaged or not a model: {{}}). "
                  f"Re-create it with `spade-ad fit`")
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(file_size - 8, 100 * 2**20):
                raise ValueError("header length beyond the end of the file")
            entries = json.loads(handle.read(length))
        if not isinstance(entries, dict):
            raise ValueError("the safetensors header is not a JSON object")
        metadata = entries.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError("the safetensors metadata is not a JSON object")
        arrays = {name: _tensor(path, name, entry, 8 + length, file_size) for name, entry in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, struct.error, RecursionError) as exc:
        raise ModelFileError(unreadable.format(exc)) from exc
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path} is a safetensors file but not a spade-ad model (no '{FORMAT}' header)")
    raw_version = str(metadata.get("format_version", "0"))
    version = int(raw_version) if raw_version.isascii() and raw_version.isdigit() else -1
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path} was written by a newer spade-ad (format {version}); upgrade spade-ad")
    if version == 2:
        raise ModelFileError(
            f"{path} was written by an older spade-ad (format 2, before the square global view and the fused image "
            f"score): its scores would not be computed as they were; re-fit it with `spade-ad fit`"
        )
    if version < FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by an older spade-ad (format {version}, thresholds by the old margin rule); "
            f"re-fit it with `spade-ad fit` to get calibrated thresholds"
        )
    header_json = metadata.get("header", "")
    try:  # (a header with a lone surrogate cannot even be encoded: it was not written by spade-ad)
        intact = isinstance(header_json, str) and content_sha256(header_json, arrays) == metadata.get("content_sha256")
    except UnicodeError:
        intact = False
    if not intact:
        raise ModelFileError(f"{path} is corrupt or was modified: its content fails the checksum. Re-fit the model")
    try:
        header = json.loads(header_json)
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{path} has a damaged header: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} has a damaged header: not a JSON object")
    return header, arrays


def _tensor(path: Path, name: str, entry: Any, data_start: int, file_size: int) -> np.ndarray:
    """One tensor of the file, after checking its entry (dtype, shape, offsets within the file); ValueError if bad."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _DTYPES:
        raise ValueError(f"tensor {name} has no valid dtype (one of {', '.join(_DTYPES)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not _KINDS["naturals"](shape) or not _KINDS["naturals"](offsets) or len(offsets) != 2:
        raise ValueError(f"tensor {name} has no valid shape and data offsets")
    (begin, end), dtype = offsets, _DTYPES[entry["dtype"]]
    if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize or data_start + end > file_size:
        raise ValueError(f"tensor {name} does not fit its shape or runs past the end of the file")
    if begin == end:  # an empty tensor: nothing to map
        return np.zeros(shape, dtype=dtype)
    array = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=tuple(shape))
    return array if name.startswith("level_") else np.array(array)


def read_model(path: str | Path, *, overrides: dict[str, Any] | None = None) -> ModelContents:
    """Read, verify and validate a model file. Settings are checked with the same rules as `Spade()` (a header
    edited with its checksum recomputed is refused naming the setting), and every tensor's shape and dtype against
    the header. `overrides` replaces runtime settings (device, batch size, weights path). Raises ModelFileError."""
    header, arrays = read_model_file(path)
    try:
        raw = dict(header["settings"])
        # a file from before a setting existed behaves as it did then, not as today's default
        raw.update({s.name: s.before for s in settings_table.SETTINGS
                    if s.stored and s.before is not ... and s.name not in raw})
        raw.update(overrides or {})
        settings = settings_table.validate(raw)
    except SettingError as exc:
        raise ModelFileError(f"{path} holds an invalid setting: {exc}. Re-create it with `spade-ad fit`") from exc
    except (LookupError, TypeError, AttributeError, ValueError, OverflowError) as exc:
        raise ModelFileError(f"{path} has no valid settings in its header ({exc}); re-create it") from exc
    missing = [s.name for s in settings_table.SETTINGS if s.stored and s.name not in header["settings"]
               and s.before is ...]
    if missing:
        raise ModelFileError(f"{path} has a damaged header: setting {missing[0]} is missing; re-create it")
    problem = _header_problem(header)
    if problem:
        raise ModelFileError(f"{path} has a damaged header: {problem}; re-create it with `spade-ad fit`")
    try:
        store = _checked_store(header, arrays, settings)
        thumbnails = _checked_thumbnails(arrays, len(header["train_names"]))
        roi = _checked_roi(arrays)
        parts = header["calibration"].get("train_parts", [])
        if parts and len(parts) != len(header["train_names"]):  # a row per training image, or none (density off)
            raise ValueError(f"calibration.train_parts has {len(parts)} rows for {len(header['train_names'])} "
                             f"training images")
        kept = header["calibration"].get("parts", [])
        if kept and len(kept) != len(header["calibration"]["scores"]):  # a row per calibration score, or none
            raise ValueError(f"calibration.parts has {len(kept)} rows for {len(header['calibration']['scores'])} "
                             f"calibration scores")
        sessions = header["calibration"].get("sessions", [])
        if sessions and len(sessions) != len(header["train_names"]):  # one per training image, or none
            raise ValueError(f"calibration.sessions has {len(sessions)} values for {len(header['train_names'])} "
                             f"training images")
    except (LookupError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ModelFileError(f"{path} has a header that does not match its tensors ({exc}); re-create it") from exc
    _tiled_as_written(settings, header["calibration"])
    return ModelContents(
        settings=settings, backbone=dict(header["backbone"]), train_names=list(header["train_names"]),
        calibration=dict(header["calibration"]), metrics=dict(header.get("metrics") or {}),
        versions=dict(header.get("versions") or {}), store=store, thumbnails=thumbnails, roi=roi,
    )


def _tiled_as_written(settings: dict[str, Any], calibration: dict[str, Any]) -> None:
    """A tiled model written before tiled models had the fused score's coarse part and density normalisation (its
    calibration has no "coarse" scale, no training parts) scores as it did then: those settings read as off."""
    if settings["tile_size"] is None or settings["image_score"] != "fused":
        return
    if "coarse" not in calibration.get("score_scale", {}):
        settings["coarse_weight"] = 0.0
    if not calibration.get("train_parts"):
        settings["density_k"] = 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integers(v: Any, least: int) -> bool:
    return isinstance(v, list) and all(_number(x) and isinstance(x, int) and x >= least for x in v)


_MISSING = object()
_KINDS: dict[str, Any] = {  # JSON value checks by name (the names show in messages)
    "text": lambda v: isinstance(v, str), "object": lambda v: isinstance(v, dict),
    "object|null": lambda v: v is None or isinstance(v, dict), "number": _number,
    "number|null": lambda v: v is None or _number(v), "numbers": lambda v: isinstance(v, list) and all(map(_number, v)),
    "texts": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "counts": lambda v: _integers(v, 1), "naturals": lambda v: _integers(v, 0),
    "scales": lambda v: isinstance(v, dict) and all(_KINDS["numbers"](p) and len(p) == 2 for p in v.values()),
    "rows of 3 finite numbers": lambda v: isinstance(v, list) and all(
        isinstance(row, list) and len(row) == 3 and all(_number(x) and math.isfinite(x) for x in row) for row in v),
}
#: The header fields `spade_ad.estimators.spade_file.load` reads beyond the settings: (path, kind, value when absent).
_HEADER_FIELDS = (
    ("backbone", "object", _MISSING), ("backbone.name", "text", _MISSING), ("backbone.weights_sha256", "text",
    _MISSING), ("backbone.channels", "counts", _MISSING), ("backbone.strides", "counts", _MISSING),
    ("train_names", "texts", _MISSING), ("metrics", "object|null", None), ("versions", "object|null", None),
    ("calibration", "object", _MISSING), ("calibration.source", "text", _MISSING),
    ("calibration.scores", "numbers", _MISSING), ("calibration.false_alarm_rate", "number", _MISSING),
    ("calibration.image_threshold", "number|null", _MISSING),
    ("calibration.pixel_false_alarm_rate", "number", _MISSING),
    ("calibration.pixel_threshold", "number|null", _MISSING), ("calibration.pixel_quantiles", "numbers", []),
    ("calibration.median", "number|null", None), ("calibration.threshold_source", "text", ""),
    ("calibration.note", "text", ""), ("calibration.score_scale", "scales", _MISSING),
    ("calibration.suspects", "texts", []), ("calibration.suspect_scores", "numbers", []),
    ("calibration.suspect_raw_scores", "numbers", []), ("calibration.suspect_raw_end", "number|null", None),
    ("calibration.train_parts", "rows of 3 finite numbers", []), ("calibration.sessions", "naturals", []),
    ("calibration.parts", "rows of 3 finite numbers", []), ("calibration.added_images", "texts", []),
)


def _header_problem(header: dict[str, Any]) -> str:
    """The first field of `_HEADER_FIELDS` missing or of the wrong kind, in words ("" if none): a model that loads
    never fails later on its header."""
    for path, kind, default in _HEADER_FIELDS:
        value: Any = header
        for key in path.split("."):  # a parent of the wrong kind was reported before its fields
            value = value.get(key, default) if isinstance(value, dict) else default
        if value is _MISSING:
            return f"{path} is missing"
        if not _KINDS[kind](value):
            return f"{path} is a {type(value).__name__}, expected {kind}"
    return ""


def _checked_store(header: dict[str, Any], arrays: dict[str, np.ndarray], settings: dict[str, Any]) -> StoredArrays:
    """The feature store, after checking every tensor's shape and dtype against the header and settings."""
    n_levels = len(settings["layers"])
    expected = {"global_features", "shapes", *(f"level_{i}" for i in range(n_levels)),
                *(f"order_{i}" for i in range(n_levels))}
    if set(arrays) - {"thumbnails", "thumbnail_shapes", "roi"} != expected:
        raise ValueError(f"tensors {sorted(arrays)} where {sorted(expected)} were expected")
    globals_, shapes = arrays["global_features"], arrays["shapes"]
    n_images = len(header["train_names"])
    if globals_.ndim != 2 or globals_.shape[0] != n_images or globals_.dtype != np.float32:
        raise ValueError(f"global_features {globals_.shape} {globals_.dtype} for {n_images} training images")
    if not np.isfinite(globals_).all():  # (the pyramid levels, possibly GBs on disk, are not scanned)
        raise ValueError("global_features hold NaN or infinite values")
    if shapes.shape != (n_images, n_levels, 2) or shapes.dtype != np.int64 or (shapes < 1).any():
        raise ValueError(f"shapes {shapes.shape} for {n_images} images and {n_levels} levels")
    channels = list(header["backbone"]["channels"])
    if len(channels) != n_levels or len(header["backbone"]["strides"]) != n_levels:
        raise ValueError(f"the backbone's channels and strides are not given for each of the {n_levels} layers")
    for i in range(n_levels):
        level = arrays[f"level_{i}"]
        rows = int((shapes[:, i, 0] * shapes[:, i, 1]).sum())
        if level.shape != (rows, channels[i]) or level.dtype != np.dtype(settings["feature_dtype"]):
            raise ValueError(f"level_{i} is {level.shape} {level.dtype}, expected ({rows}, {channels[i]}) "
                             f"{settings['feature_dtype']}")
        order = arrays[f"order_{i}"]
        largest = int((shapes[:, i, 0] * shapes[:, i, 1]).max())
        if order.shape != (rows,) or order.dtype != np.int32 or (rows and (order.min() < 0 or order.max() >= largest)):
            raise ValueError(f"order_{i} is {order.shape} {order.dtype}, expected ({rows},) int32 within each image")
    return StoredArrays(
        np.array(globals_), [arrays[f"level_{i}"] for i in range(n_levels)], np.array(shapes),
        [np.array(arrays[f"order_{i}"]) for i in range(n_levels)],
    )


def _checked_thumbnails(arrays: dict[str, np.ndarray], n_images: int) -> list[np.ndarray]:
    """The training thumbnails (optional), after checking them against their shapes."""
    if "thumbnails" not in arrays and "thumbnail_shapes" not in arrays:
        return []
    flat, shapes = arrays["thumbnails"], arrays["thumbnail_shapes"]
    if shapes.shape != (n_images, 2) or shapes.dtype != np.int64 or (shapes < 1).any() or flat.dtype != np.uint8:
        raise ValueError(f"thumbnail_shapes {shapes.shape} {shapes.dtype} for {n_images} images")
    sizes = shapes[:, 0] * shapes[:, 1] * 3
    if flat.shape != (int(sizes.sum()),):
        raise ValueError(f"thumbnails hold {flat.shape} values, their shapes need {int(sizes.sum())}")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [flat[a:b].reshape(int(h), int(w), 3) for a, b, (h, w) in zip(starts[:-1], starts[1:], shapes)]


def _checked_roi(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The region of interest (optional: files without one inspect every pixel), 2-D 0/1 uint8 with a 1."""
    if "roi" not in arrays:
        return None
    roi = arrays["roi"]
    if roi.ndim != 2 or roi.dtype != np.uint8 or roi.size == 0 or roi.max() != 1:
        raise ValueError(f"roi is {roi.shape} {roi.dtype}, expected a 2-D 0/1 uint8 mask with a 1 in it")
    return np.asarray(roi, dtype=bool)
