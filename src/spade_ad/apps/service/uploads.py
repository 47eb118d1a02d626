"""Reading predict requests within limits: admission (capacity and queue, uploads held), body size and time,
multipart parsing."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .config import ServiceSettings
from .errors import ApiError

__all__ = ["DRAIN_FACTOR", "FIELD", "Capacity", "check_request", "read_files", "receive_files"]

FIELD = "files"
"""Name of the multipart field that carries the images."""
DRAIN_FACTOR = 4
"""An oversized body is read and dropped up to this many times the limit before answering 413, so that the client
sees the answer instead of a reset connection; beyond that the connection is simply closed."""
BUSY = "the server is busy: too many images are being scored; try again shortly"


class Capacity:
    """Counts admitted requests (at most `limit`) and keeps a running mean of their service time; `busy` is the
    503 answer's message."""

    def __init__(self, limit: int, workers: int, busy: str = BUSY) -> None:
        self.limit, self.workers, self.busy = limit, workers, busy
        self.in_flight = 0
        self._mean_seconds = 1.0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def record(self, seconds: float) -> None:
        with self._lock:
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the admitted requests' expected service time, per worker."""
        with self._lock:
            return max(1, math.ceil(self._mean_seconds * self.limit / self.workers))

    def _refuse(self) -> ApiError:
        return ApiError(503, self.busy, headers={"Retry-After": str(self.retry_after())})

    def refuse_if_full(self) -> None:
        """Raise 503 with Retry-After if no place is free now (admits nothing: a cheap early answer)."""
        with self._lock:
            full = self.in_flight >= self.limit
        if full:
            raise self._refuse()

    def acquire_or_refuse(self) -> None:
        """Admit one request, or raise 503 with Retry-After when all places are taken."""
        if not self.try_acquire():
            raise self._refuse()


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


async def _limited(stream: AsyncGenerator[bytes, None], limit: int) -> AsyncGenerator[bytes, None]:
    """Pass the body through, counting; past `limit` drop the rest (up to DRAIN_FACTOR x limit) and raise 413."""
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size <= limit:
            yield chunk
        elif size > DRAIN_FACTOR * limit:
            break
    if size > limit:
        raise ApiError(413, f"the upload is larger than the limit of {_megabytes(limit)}; send fewer or smaller files")


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise ApiError(400, f"the Content-Length header is not a number: {value!r}")
    return int(value)


def _check_multipart(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            f"send the images as multipart/form-data in the field '{FIELD}' (got Content-Type "
            f"{content_type or 'none'}); e.g. curl -F {FIELD}=@image.png URL",
        )


def check_request(request: Request, settings: ServiceSettings) -> int | None:
    """Refuse, before reading the body, a request that is not multipart/form-data (415) or declares a body over
    DRAIN_FACTOR x `max_upload_bytes` (413); return the declared length (None without Content-Length)."""
    _check_multipart(request)
    limit = settings.max_upload_bytes
    declared = _declared_length(request)
    if declared is not None and declared > DRAIN_FACTOR * limit:
        raise ApiError(413, f"the upload ({_megabytes(declared)}) is larger than the limit of {_megabytes(limit)}")
    return declared


async def receive_files(request: Request, settings: ServiceSettings, declared: int | None) -> list[tuple[str, bytes]]:
    """The (name, bytes) of each file in the `files` field (`read_files`), the whole body received within
    `read_timeout` seconds (else 408, and the connection is closed). A body declared over `max_upload_bytes` (but
    within DRAIN_FACTOR x) is read and dropped, then refused (413), so that the client sees the answer."""
    limit = settings.max_upload_bytes

    async def receive() -> list[tuple[str, bytes]]:
        if declared is not None and declared > limit:
            async for _ in request.stream():
                pass
            raise ApiError(413, f"the upload ({_megabytes(declared)}) is larger than the limit of {_megabytes(limit)}")
        return await read_files(request, settings)

    try:
        return await asyncio.wait_for(receive(), settings.read_timeout)
    except asyncio.TimeoutError:
        raise ApiError(
            408, f"the upload did not arrive within the read timeout ({settings.read_timeout:g} s); send it faster "
            "or in smaller requests", headers={"Connection": "close"},
        ) from None


async def read_files(request: Request, settings: ServiceSettings) -> list[tuple[str, bytes]]:
    """The (name, bytes) of each file in the `files` field, the body limited to `max_upload_bytes`."""
    parser = MultiPartParser(
        request.headers, _limited(request.stream(), settings.max_upload_bytes), max_files=settings.max_files,
        max_fields=settings.max_files,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"the upload is not valid multipart/form-data: {exc.message}") from exc
    try:
        fields = form.getlist(FIELD)
        if not fields:
            given = ", ".join(sorted(set(form.keys()))) or "none"
            raise ApiError(422, f"no images found: send them in the multipart field '{FIELD}' (fields given: {given})")
        files = []
        for number, value in enumerate(fields, 1):
            if not isinstance(value, UploadFile):
                raise ApiError(422, f"field '{FIELD}' #{number} is text, not a file: send it with a filename")
            files.append((value.filename or f"file {number}", await value.read()))
        return files
    finally:
        await form.close()
