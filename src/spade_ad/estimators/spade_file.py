"""Loading a model file into a `Spade` (the file format itself: `spade_ad.data.modelfile`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.calibration import Calibration
from ..core.device import resolve_device
from ..core.feature_store import FeatureStore
from ..data.modelfile import read_model
from ..data.sessions import sessions_of
from ..errors import ModelFileError, WeightsError
from .spade import Spade

__all__ = ["load"]


def load(path: str | Path, *, weights: str | Path | None = None, device: str | None = None) -> Spade:
    """Load a model saved with `Spade.save`. `weights` overrides the backbone weights file recorded at fit time;
    the backbone's weights must be the very ones the model was fitted with (checked by checksum)."""
    overrides: dict[str, Any] = {}
    if weights is not None:
        overrides["weights"] = str(weights)
    if device is not None:
        overrides["device"] = device
    contents = read_model(path, overrides=overrides)
    model = Spade(**contents.settings)
    model.device_ = resolve_device(model.device)
    try:
        model.backbone_ = model._build_backbone()
    except WeightsError as exc:
        raise ModelFileError(f"cannot load the backbone of model {path}: {exc}") from exc
    if list(model.backbone_.channels) != list(contents.backbone["channels"]):
        raise ModelFileError(
            f"model {path} records channels {contents.backbone['channels']} for its pyramid levels, but backbone "
            f"{model.backbone!r} with layers {model.layers} gives {list(model.backbone_.channels)}: the file's "
            f"settings were edited; re-create it with `spade-ad fit`"
        )
    expected = contents.backbone["weights_sha256"]
    if model.backbone_.weights_sha256 != expected:
        raise ModelFileError(
            f"model {path} was fitted with other weights for backbone {model.backbone!r} "
            f"(checksum {expected[:12]}, these are {model.backbone_.weights_sha256[:12]}): pass the original "
            f"weights file with weights=PATH (CLI: --weights PATH) or fit a new model"
        )
    stored = contents.store
    model.store_ = FeatureStore(torch.from_numpy(stored.global_features), stored.levels, stored.shapes, stored.orders)
    model.train_names_ = contents.train_names
    model.thumbnails_ = contents.thumbnails
    model.roi_ = contents.roi
    model.skipped_ = []
    model.score_scale_ = {k: (float(v[0]), float(v[1])) for k, v in contents.calibration["score_scale"].items()}
    model.calibration_ = Calibration.from_json(contents.calibration)
    model.sessions_ = sessions_of(model.calibration_.sessions, model.session_gap)
    model._apply_calibration()
    model.metrics_ = contents.metrics
    return model
