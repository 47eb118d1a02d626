"""Open what a front door is given: a model file (torch path, `spade_ad.estimators.spade_file.load`) or an exported
bundle folder (torch-free path, `spade_ad.estimators.runtime.load_bundle`). torch is imported only for model files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SettingError
from .runtime.bundle import is_bundle

if TYPE_CHECKING:
    from .detector import FittedModel


def open_model(path: str | Path, *, weights: str | Path | None = None, device: str | None = None,
               engine: str | None = None) -> FittedModel:
    """A `Spade` from a model file, or a `spade_ad.estimators.runtime.Runtime` from a bundle folder. `weights` and a
    CUDA `device` apply to model files only; `engine` to bundles only (default onnxruntime)."""
    if is_bundle(path):
        if weights is not None:
            raise SettingError("weights", "does not apply to a bundle (its graph holds the weights)", str(weights),
                               "leave it out, or give the model file")
        if device not in (None, "cpu", "auto"):
            raise SettingError("device", "does not apply to a bundle (it runs on the CPU)", device,
                               "cpu, or give the model file to run on a GPU")
        from .runtime import load_bundle

        return load_bundle(path, engine=engine or "onnxruntime")
    if engine is not None:
        raise SettingError("engine", "applies to bundles only (a model file runs on torch)", engine,
                           "leave it out, or export a bundle with `spade-ad export`")
    from .spade_file import load

    return load(path, weights=weights, device=device)
