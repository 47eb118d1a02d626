"""Model files: one safetensors file holding the stored features, with settings, versions and the backbone's
identity as JSON in its header. No pickle. A checksum over the header and every tensor catches truncated or
tampered files; the backbone's weights checksum catches a model loaded against different weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import ModelFileError, WeightsError

if TYPE_CHECKING:
    from .model import Spade

FORMAT = "spade-ad-model"
FORMAT_VERSION = 1


def content_sha256(header_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """Checksum of the JSON header and the named tensors (names, shapes, dtypes, bytes), in a fixed order."""
    digest = hashlib.sha256(header_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_model(model: Spade, path: Path) -> Path:
    """Write `model` (fitted) to `path`, atomically (a crash never leaves a half-written file under that name)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.store_.tensors().items()}
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
    header_json = json.dumps(header)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "header": header_json,
        "content_sha256": content_sha256(header_json, tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def read_model_file(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a model file: (header, tensors). Raises ModelFileError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # the safetensors reader raises several types for a bad file
        raise ModelFileError(
            f"{path} is not a readable spade-ad model file (truncated or not a model: {exc}). "
            f"Re-create it with `spade-ad fit`"
        ) from exc
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path} is a safetensors file but not a spade-ad model (no '{FORMAT}' header)")
    if int(metadata.get("format_version", "0")) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer spade-ad (format {metadata['format_version']}); upgrade spade-ad"
        )
    header_json = metadata.get("header", "")
    if content_sha256(header_json, tensors) != metadata.get("content_sha256"):
        raise ModelFileError(f"{path} is corrupt or was modified: its content fails the checksum. Re-fit the model")
    try:
        header = json.loads(header_json)
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} has a damaged header: {exc}") from exc
    return header, tensors


def load(path: str | Path, *, weights: str | Path | None = None, device: str | None = None) -> Spade:
    """Load a model saved with `Spade.save`. `weights` overrides the backbone weights file recorded at fit time;
    the backbone's weights must be the very ones the model was fitted with (checked by checksum)."""
    from .model import Spade, _resolve_device
    from .search import FeatureStore

    header, tensors = read_model_file(path)
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
    model.store_ = FeatureStore.from_tensors(tensors)
    model.train_names_ = list(header["train_names"])
    model.skipped_ = []
    calibration = header.get("calibration", {})
    model.image_threshold_ = calibration.get("image_threshold")
    model.pixel_threshold_ = calibration.get("pixel_threshold")
    model.calibration_scores_ = list(calibration.get("scores", []))
    model.metrics_ = dict(header.get("metrics", {}))
    return model
