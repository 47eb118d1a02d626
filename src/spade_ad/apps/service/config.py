"""The service's own settings: where to listen, whom to answer, and how much work, data and time to accept."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

__all__ = ["DEFAULT_PORTS", "MAX_HEADER_BYTES", "ServiceSettings", "normalized_origin", "split_host"]

MAX_HEADER_BYTES = 16 * 2**10
"""Largest request line plus headers (h11's limit on an incomplete event); beyond it the request is refused (400) and
the connection closed."""
_NOT_LIMITS = ("host", "port", "allow_hosts", "allow_origins", "allow_add")
DEFAULT_PORTS = {"http": 80, "https": 443}
_NAME = re.compile(r"[a-z0-9._-]+|[0-9a-f:.]+")  # a DNS name or IPv4 address; or an IPv6 address (in brackets)


def split_host(value: str) -> tuple[str, int | None] | None:
    """(name, port) of a Host header or `allow_hosts` entry (lower case, IPv6 without brackets), None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or ":" not in name:
            return None
    else:
        name, _, port_part = value.partition(":")
        rest = value[len(name):]
        if ":" in port_part:
            return None
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return None
    port = int(rest[1:]) if rest else None
    if not name or not _NAME.fullmatch(name) or (port is not None and not 0 < port < 65536):
        return None
    return name, port


def normalized_origin(value: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin header or `allow_origins` entry (default port filled in); None when it is
    not an http(s) origin (e.g. "null")."""
    try:
        parts = urlsplit(value.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query \
            or parts.fragment or parts.username is not None:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


@dataclass(frozen=True)
class ServiceSettings:
    """Where to listen, whom to answer, and how much work, data and time to accept.

    host, port: address to bind (loopback by default: not reachable from other machines).
    workers: inference threads. max_queue: predict requests that may wait for a worker; beyond: 503.
    max_upload_bytes: largest request body (all files together). max_pixels: largest image (width x height),
    checked before decoding. max_files: files per request. max_connections: open connections (uvicorn answers 503
    beyond; covers the page, docs and health checks too).
    max_uploads: predict requests holding a body at once (being read, waiting or being scored; beyond: 503), so the
    memory held by uploads is at most max_uploads x max_upload_bytes.
    read_timeout: seconds to receive a request's whole body (408 and the connection closed beyond).
    header_timeout: seconds to receive a request line and headers, from the connection's start or the end of the
    previous answer (the connection is closed beyond). keep_alive_timeout: seconds an idle connection is kept.
    allow_hosts: Host header values accepted besides the bound address (and, bound to loopback, localhost /
    127.0.0.1 / [::1]) on the bound port: "name" (any port), "name:port", "*.domain" or "*" (any).
    allow_origins: origins (scheme://host[:port]) whose pages may POST (CORS); "*" for any. By default only the
    service's own origin may.
    allow_add: whether `POST /v1/good` may add uploaded images to the model as good ones (and save the model back
    to its file); off by default (403).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_queue: int = 8
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_files: int = 16
    max_connections: int = 64
    max_uploads: int = 16
    read_timeout: float = 30.0
    header_timeout: float = 10.0
    keep_alive_timeout: int = 5
    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    allow_add: bool = False

    def __post_init__(self) -> None:
        minimum = {"workers": 1, "max_queue": 0, "max_upload_bytes": 1, "max_pixels": 1, "max_files": 1,
                   "max_connections": 1, "max_uploads": 1, "port": 0, "keep_alive_timeout": 1}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("read_timeout", "header_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("allow_hosts", "allow_origins"):
            object.__setattr__(self, name, tuple(str(value).strip().lower() for value in getattr(self, name)))
        for entry in self.allow_hosts:
            if entry != "*" and split_host(entry[2:] if entry.startswith("*.") else entry) is None:
                raise ValueError(f"allow_hosts: {entry!r} is not a host name, host:port, *.domain or *")
        for entry in self.allow_origins:
            if entry != "*" and normalized_origin(entry) is None:
                raise ValueError(f"allow_origins: {entry!r} is not an origin like https://example.com[:port] or *")

    @property
    def limits(self) -> dict[str, int | float]:
        """The limits and timeouts (not the address nor the host and origin lists), as `/v1/model` reports them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_LIMITS}
