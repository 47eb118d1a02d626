"""Errors meant for the user: each message names the file involved and what to do about it."""

from __future__ import annotations

from sklearn.exceptions import NotFittedError as _SklearnNotFittedError


class SpadeError(Exception):
    """Base class of every error spade-ad raises on purpose (bad input, bad files, bad settings)."""


class ImageReadError(SpadeError):
    """An image file could not be read or decoded."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class NoImagesError(SpadeError):
    """A folder or input list holds no usable images."""


class DatasetLayoutError(SpadeError):
    """A dataset folder does not have the expected layout."""


class WeightsError(SpadeError):
    """Backbone weights are missing, cannot be downloaded, or do not match the architecture."""


class ModelFileError(SpadeError):
    """A saved model file is missing, truncated, tampered with, or from an incompatible version."""


class NotFittedError(SpadeError, _SklearnNotFittedError):
    """The model was used before `fit` (also a scikit-learn NotFittedError)."""
