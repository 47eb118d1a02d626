"""Requests the service refuses, as HTTP answers: `ApiError`, and the status for each kind of unreadable image."""

from __future__ import annotations

from ...errors import ImageReadError

__all__ = ["IMAGE_ERROR_STATUS", "ApiError", "image_error"]

IMAGE_ERROR_STATUS: dict[str, int] = {"empty": 400, "corrupt": 400, "too_large": 413, "unsupported": 415}
"""HTTP status for each `ImageReadError.kind` (see `spade_ad.errors`); any other kind is a 400."""


class ApiError(Exception):
    """A request the service refuses: becomes `{"error": message, "file": file}` with `status`."""

    def __init__(self, status: int, message: str, file: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.file, self.headers = status, message, file, headers


def image_error(exc: ImageReadError, file: str) -> ApiError:
    """The answer to an uploaded `file` that spade_ad.data.images could not read: its reason, with the kind's status."""
    return ApiError(IMAGE_ERROR_STATUS.get(exc.kind, 400), exc.reason, file)
