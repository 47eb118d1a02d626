"""spade-ad: SPADE anomaly detection (Cohen & Hoshen, 2020) for images of manufactured products.

    from spade_ad import Spade, load
    model = Spade().fit("train/good")
    results = model.predict("test/", original_size=True)
"""

__version__ = "0.1.0"

from .backbones import available_backbones, build_backbone
from .errors import (
    DatasetLayoutError,
    ImageReadError,
    ModelFileError,
    NoImagesError,
    NotFittedError,
    SpadeError,
    WeightsError,
)
from .model import Prediction, Spade
from .persistence import load

__all__ = [
    "DatasetLayoutError",
    "ImageReadError",
    "ModelFileError",
    "NoImagesError",
    "NotFittedError",
    "Prediction",
    "Spade",
    "SpadeError",
    "WeightsError",
    "__version__",
    "available_backbones",
    "build_backbone",
    "load",
]
