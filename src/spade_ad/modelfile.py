"""Model files: one safetensors file holding the stored features, with settings, versions and the backbone's
identity as JSON in its header. No pickle. A checksum over the header and every tensor catches truncated or
tampered files; the backbone's weights checksum catches a model loaded against different weights.

The file is written and read in a streaming way so that models with thousands of training images never need their
features in memory: pyramid features are copied chunk by chunk when saving and memory-mapped when loading. The
layout is plain safetensors (8-byte header length, JSON header, raw little-endian data), readable by any
safetensors reader.

This module knows the settings table and the feature store, never the estimator: `spade_ad.model` builds a `Spade`
from the `ModelContents` read here.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from . import settings as settings_table
from .errors import ModelFileError, SettingError
from .store import FeatureStore

FORMAT = "spade-ad-model"
#: 2: conformal calibration (leave-one-out scores, pixel quantiles, score scales) replaced the margin rule.
FORMAT_VERSION = 2
_CHUNK_BYTES = 64 * 2**20
_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"),
           "I32": np.dtype("<i4")}
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
class ModelContents:
    """What a model file holds: validated settings, the backbone's identity, training image names, calibration,
    metrics, versions and the feature store (pyramid levels memory-mapped)."""

    settings: dict[str, Any]
    backbone: dict[str, Any]
    train_names: list[str]
    calibration: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, Any]
    store: FeatureStore


def store_arrays(store: FeatureStore) -> dict[str, np.ndarray]:
    """The store's features as named arrays (levels stay memory-mapped)."""
    arrays = {"global_features": store.global_features.numpy().astype("<f4"), "shapes": store.shapes.astype("<i8")}
    arrays.update({f"level_{i}": level for i, level in enumerate(store.levels)})
    arrays.update({f"order_{i}": order.astype("<i4") for i, order in enumerate(store.orders or [])})
    return arrays


def write_model(
    path: Path,
    *,
    settings: dict[str, Any],
    backbone: dict[str, Any],
    store: FeatureStore,
    train_names: list[str],
    calibration: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write a fitted model to `path`, atomically (a crash never leaves a half-written file under that name).

    `settings` are checked against the settings table first: a file is never written with settings it would refuse
    to load."""
    header = {
        "settings": settings_table.stored(settings_table.validate(settings)),
        "backbone": backbone,
        "train_names": train_names,
        "calibration": calibration,
        "metrics": metrics,
        "versions": {
            "spade_ad": __version__, "torch": torch.__version__, "python": platform.python_version(),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    write_safetensors(partial, store_arrays(store), json.dumps(header))
    os.replace(partial, path)
    return path


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
    Raises ModelFileError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    unreadable = (f"{path} is not a readable spade-ad model file (truncated, damaged or not a model: {{}}). "
                  f"Re-create it with `spade-ad fit`")
    file_size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(file_size - 8, 100 * 2**20):
                raise ValueError("header length beyond the end of the file")
            entries = json.loads(handle.read(length))
        metadata = entries.pop("__metadata__", {}) or {}
        arrays = {}
        for name, entry in entries.items():
            begin, end = entry["data_offsets"]
            dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
            if end - begin != int(np.prod(shape)) * dtype.itemsize or 8 + length + end > file_size:
                raise ValueError(f"tensor {name} runs past the end of the file")
            array = np.memmap(path, dtype=dtype, mode="r", offset=8 + length + begin, shape=shape)
            arrays[name] = array if name.startswith("level_") else np.array(array)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelFileError(unreadable.format(exc)) from exc
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path} is a safetensors file but not a spade-ad model (no '{FORMAT}' header)")
    version = int(metadata.get("format_version", "0")) if str(metadata.get("format_version", "0")).isdigit() else -1
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path} was written by a newer spade-ad (format {version}); upgrade spade-ad")
    if version < FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by an older spade-ad (format {version}, thresholds by the old margin rule); "
            f"re-fit it with `spade-ad fit` to get calibrated thresholds"
        )
    header_json = metadata.get("header", "")
    if content_sha256(header_json, arrays) != metadata.get("content_sha256"):
        raise ModelFileError(f"{path} is corrupt or was modified: its content fails the checksum. Re-fit the model")
    try:
        header = json.loads(header_json)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path} has a damaged header: {exc}") from exc
    return header, arrays


def read_model(path: str | Path, *, overrides: dict[str, Any] | None = None) -> ModelContents:
    """Read, verify and validate a model file. Settings are checked with the same rules as `Spade()` (a header
    edited with its checksum recomputed is refused naming the setting), and every tensor's shape and dtype against
    the header. `overrides` replaces runtime settings (device, batch size, weights path). Raises ModelFileError."""
    header, arrays = read_model_file(path)
    try:
        raw = dict(header["settings"])
        raw.update(overrides or {})
        settings = settings_table.validate(raw)
    except SettingError as exc:
        raise ModelFileError(f"{path} holds an invalid setting: {exc}. Re-create it with `spade-ad fit`") from exc
    except (KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path} has no valid settings in its header ({exc}); re-create it") from exc
    try:
        store = _checked_store(header, arrays, settings)
        calibration = dict(header.get("calibration") or {})
        return ModelContents(
            settings=settings, backbone=dict(header["backbone"]), train_names=[str(n) for n in header["train_names"]],
            calibration=calibration, metrics=dict(header.get("metrics") or {}),
            versions=dict(header.get("versions") or {}), store=store,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path} has a header that does not match its tensors ({exc}); re-create it") from exc


def _checked_store(header: dict[str, Any], arrays: dict[str, np.ndarray], settings: dict[str, Any]) -> FeatureStore:
    """The feature store, after checking every tensor's shape and dtype against the header and settings."""
    n_levels = len(settings["layers"])
    expected = {"global_features", "shapes", *(f"level_{i}" for i in range(n_levels)),
                *(f"order_{i}" for i in range(n_levels))}
    if set(arrays) != expected:
        raise ValueError(f"tensors {sorted(arrays)} where {sorted(expected)} were expected")
    globals_, shapes = arrays["global_features"], arrays["shapes"]
    n_images = len(header["train_names"])
    if globals_.ndim != 2 or globals_.shape[0] != n_images or globals_.dtype != np.float32:
        raise ValueError(f"global_features {globals_.shape} {globals_.dtype} for {n_images} training images")
    if shapes.shape != (n_images, n_levels, 2) or shapes.dtype != np.int64 or (shapes < 1).any():
        raise ValueError(f"shapes {shapes.shape} for {n_images} images and {n_levels} levels")
    channels = list(header["backbone"]["channels"])
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
    return FeatureStore(
        torch.from_numpy(np.array(globals_)), [arrays[f"level_{i}"] for i in range(n_levels)], np.array(shapes),
        [np.array(arrays[f"order_{i}"]) for i in range(n_levels)],
    )
