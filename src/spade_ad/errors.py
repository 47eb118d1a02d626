"""Errors meant for the user: each message names the file or setting involved and what to do about it.

Pure Python (no scikit-learn import): the CLI loads this module to answer `--help` quickly.
"""

from __future__ import annotations

from typing import Any


class SpadeError(Exception):
    """Base class of every error spade-ad raises on purpose (bad input, bad files, bad settings)."""


class ImageReadError(SpadeError):
    """An image file could not be read or decoded: `reason` in words, `kind` for programs (one of IMAGE_ERROR_KINDS:
    "missing", "empty" (no bytes or no pixels), "too_large" (over the pixel limit), "unsupported" (not an image in an
    accepted format or mode), "corrupt" (truncated or damaged data), "unreadable" (anything else))."""

    def __init__(self, path: object, reason: str, kind: str = "unreadable") -> None:
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"cannot read image {self.path}: {reason}")


IMAGE_ERROR_KINDS = ("missing", "empty", "too_large", "unsupported", "corrupt", "unreadable")


class ImageTooLargeError(ImageReadError):
    """An image whose network input would be too large or too elongated (kind "too_large"): refused before any
    memory is spent on it, and skipped or reported like an unreadable image."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(path, reason, kind="too_large")


class NoImagesError(SpadeError):
    """A folder or input list holds no usable images."""


class DatasetLayoutError(SpadeError):
    """A dataset folder does not have the expected layout."""


class WeightsError(SpadeError):
    """Backbone weights are missing, cannot be downloaded, or do not match the architecture."""


class OutputError(SpadeError):
    """An output folder cannot be used: it is a file, or it holds an earlier run's results (and overwriting was not
    asked for)."""


class ModelFileError(SpadeError):
    """A saved model file is missing, truncated, tampered with, or from an incompatible version."""


class SettingError(SpadeError, ValueError):
    """A setting has a value the settings table does not allow (also a ValueError, as scikit-learn raises)."""

    def __init__(self, name: str, problem: str, value: Any, allowed: str) -> None:
        self.name = name
        self.problem = problem
        self.value = value
        self.allowed = allowed
        shown = "" if value is None and problem in ("is not a setting", "must be set") else f" (got {value!r})"
        super().__init__(f"setting {name} {problem}{shown}; allowed: {allowed}")


class NotFittedError(SpadeError, ValueError, AttributeError):
    """The model was used before `fit`. Same bases as scikit-learn's NotFittedError (ValueError, AttributeError),
    and registered as a virtual subclass of it when scikit-learn is imported by the model."""
