"""Model files: one safetensors file holding the stored features, with settings, versions and the backbone's
identity as JSON in its header. No pickle. A checksum over the header and every tensor catches truncated or
tampered files; the backbone's weights checksum catches a model loaded against different weights.

The file is written and read in a streaming way so that models with thousands of training images never need their
features in memory: pyramid features are copied chunk by chunk when saving and memory-mapped when loading. The
layout is plain safetensors (8-byte header length, JSON header, raw little-endian data), readable by any
safetensors reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import __version__
from .errors import ModelFileError, WeightsError

if TYPE_CHECKING:
    from .model import Spade

FORMAT = "spade-ad-model"
FORMAT_VERSION = 1
_CHUNK_BYTES = 64 * 2**20
_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8")}
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


def store_arrays(model: Spade) -> dict[str, np.ndarray]:
    """The fitted model's features as named arrays (levels stay memory-mapped)."""
    store = model.store_
    arrays = {"global_features": store.global_features.numpy().astype("<f4"), "shapes": store.shapes.astype("<i8")}
    arrays.update({f"level_{i}": level for i, level in enumerate(store.levels)})
    return arrays


def save_model(model: Spade, path: Path) -> Path:
    """Write `model` (fitted) to `path`, atomically (a crash never leaves a half-written file under that name)."""
    settings = model.get_params()
    settings["weights"] = str(settings["weights"]) if settings["weights"] is not None else None
    settings["layers"] = list(settings["layers"])
    header = {
        "settings": settings,
        "backbone": {
            "name": model.backbone_.name,
            "weights_sha256": model.backbone_.weights_sha256,
            "channels": list(model.backbone_.channels),
            "strides": list(model.backbone_.strides),
        },
        "train_names": model.train_names_,
        "calibration": {
            "image_threshold": model.image_threshold_,
            "pixel_threshold": model.pixel_threshold_,
            "scores": model.calibration_scores_,
        },
        "metrics": model.metrics_,
        "versions": {
            "spade_ad": __version__, "torch": torch.__version__, "python": platform.python_version(),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    write_safetensors(partial, store_arrays(model), json.dumps(header))
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
    if int(metadata.get("format_version", "0")) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer spade-ad (format {metadata['format_version']}); upgrade spade-ad"
        )
    header_json = metadata.get("header", "")
    if content_sha256(header_json, arrays) != metadata.get("content_sha256"):
        raise ModelFileError(f"{path} is corrupt or was modified: its content fails the checksum. Re-fit the model")
    try:
        header = json.loads(header_json)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path} has a damaged header: {exc}") from exc
    return header, arrays


def load(path: str | Path, *, weights: str | Path | None = None, device: str | None = None) -> Spade:
    """Load a model saved with `Spade.save`. `weights` overrides the backbone weights file recorded at fit time;
    the backbone's weights must be the very ones the model was fitted with (checked by checksum)."""
    from .model import Spade, _resolve_device
    from .search import FeatureStore

    header, arrays = read_model_file(path)
    settings = dict(header["settings"])
    settings["layers"] = tuple(settings["layers"])
    if weights is not None:
        settings["weights"] = str(weights)
    if device is not None:
        settings["device"] = device
    model = Spade(**settings)
    model.device_ = _resolve_device(model.device)
    try:
        model.backbone_ = model._build_backbone()
    except WeightsError as exc:
        raise ModelFileError(f"cannot load the backbone of model {path}: {exc}") from exc
    expected = header["backbone"]["weights_sha256"]
    if model.backbone_.weights_sha256 != expected:
        raise ModelFileError(
            f"model {path} was fitted with other weights for backbone {model.backbone!r} "
            f"(checksum {expected[:12]}, these are {model.backbone_.weights_sha256[:12]}): pass the original "
            f"weights file with weights=PATH (CLI: --weights PATH) or fit a new model"
        )
    n_levels = sum(1 for name in arrays if name.startswith("level_"))
    model.store_ = FeatureStore(
        torch.from_numpy(arrays["global_features"]), [arrays[f"level_{i}"] for i in range(n_levels)], arrays["shapes"]
    )
    model.train_names_ = list(header["train_names"])
    model.skipped_ = []
    calibration = header.get("calibration", {})
    model.image_threshold_ = calibration.get("image_threshold")
    model.pixel_threshold_ = calibration.get("pixel_threshold")
    model.calibration_scores_ = list(calibration.get("scores", []))
    model.metrics_ = dict(header.get("metrics", {}))
    return model
