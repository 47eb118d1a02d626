"""spade-ad: SPADE anomaly detection (Cohen & Hoshen, 2020) for images of manufactured products.

    from spade_ad import Spade, load
    model = Spade().fit("train/good")
    results = model.predict("test/", original_size=True)

Names are imported on first use (PEP 562), so `import spade_ad` and `spade-ad --help` load neither torch nor timm.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    "Spade": "estimators.spade", "Prediction": "estimators.spade", "load": "estimators.spade_file",
    "available_backbones": "core.backbones", "build_backbone": "core.backbones",
    "SETTINGS": "settings",
    **{name: "errors" for name in (
        "DatasetLayoutError", "ImageReadError", "ModelFileError", "NoImagesError", "NotFittedError", "SettingError",
        "SpadeError", "WeightsError",
    )},
}

__all__ = [
    "SETTINGS", "DatasetLayoutError", "ImageReadError", "ModelFileError", "NoImagesError", "NotFittedError",
    "Prediction", "SettingError", "Spade", "SpadeError", "WeightsError", "__version__", "available_backbones",
    "build_backbone", "load",
]

if TYPE_CHECKING:
    from .core.backbones import available_backbones, build_backbone
    from .errors import (
        DatasetLayoutError,
        ImageReadError,
        ModelFileError,
        NoImagesError,
        NotFittedError,
        SettingError,
        SpadeError,
        WeightsError,
    )
    from .estimators.spade import Prediction, Spade
    from .estimators.spade_file import load
    from .settings import SETTINGS


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spade_ad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
