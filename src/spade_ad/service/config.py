"""The service's own settings: where to listen and how much work and data to accept."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["ServiceSettings"]


@dataclass(frozen=True)
class ServiceSettings:
    """Where to listen and how much work and data to accept.

    host, port: address to bind (loopback by default: not reachable from other machines).
    workers: inference threads. max_queue: predict requests that may wait for a worker; beyond: 503.
    max_upload_bytes: largest request body (all files together). max_pixels: largest image (width x height),
    checked before decoding. max_files: files per request. max_connections: open connections (uvicorn answers 503
    beyond; covers the page, docs and health checks too).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_queue: int = 8
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_files: int = 16
    max_connections: int = 64

    def __post_init__(self) -> None:
        minimum = {"workers": 1, "max_queue": 0, "max_upload_bytes": 1, "max_pixels": 1, "max_files": 1,
                   "max_connections": 1, "port": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")

    @property
    def limits(self) -> dict[str, int]:
        """The limits (everything but the address), as `/v1/model` reports them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("host", "port")}
