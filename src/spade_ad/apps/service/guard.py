"""Whom the service answers: the Host header (DNS rebinding) and the origin of state-changing requests (cross-site
POSTs), checked on every request before any route runs.

Host: accepted when it names the address the service is bound to, or the local address the connection came in on
(and localhost / 127.0.0.1 / [::1] on loopback; this machine's host name when bound to a wildcard or another
interface), on the port the connection came in on (no port: 80, or 443 for https), or when it matches an
`allow_hosts` entry. Anything else: 400. A page of another site whose name was re-pointed at 127.0.0.1 (DNS
rebinding) sends its own name in the Host header, so it is refused.

Origin: a request other than GET / HEAD / OPTIONS that carries an `Origin` header is accepted only from the
service's own origin (the scheme it was reached by and its accepted Host) or an `allow_origins` entry; without an
`Origin`, a browser's `Sec-Fetch-Site: cross-site` / `same-site` is refused the same way. Anything else: 403.
A request whose headers total over MAX_HEADER_BYTES is refused too (431; h11 only limits a head still arriving).
Starlette's TrustedHostMiddleware is not used: it ignores the port and cannot parse `[::1]:8000`.
"""

from __future__ import annotations

import ipaddress
import socket

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import DEFAULT_PORTS, MAX_HEADER_BYTES, ServiceSettings, normalized_origin, split_host

__all__ = ["HostOriginGuard", "HostPolicy", "OriginPolicy", "is_loopback"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})


def _address(ip: str) -> str:
    """A socket's address as a Host header names it: an IPv4-mapped IPv6 address (a dual-stack socket's IPv4
    client) as the IPv4 address."""
    try:
        mapped = getattr(ipaddress.ip_address(ip), "ipv4_mapped", None)
    except ValueError:
        return ip.lower()
    return str(mapped) if mapped is not None else ip.lower()


def is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """Which Host header values the service answers (see the module's description)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.any = "*" in settings.allow_hosts
        self.port = settings.port
        self.extra: list[tuple[str, int | None]] = []
        for entry in settings.allow_hosts:
            if entry == "*":
                continue
            parsed = split_host(entry[2:] if entry.startswith("*.") else entry)
            assert parsed is not None  # checked by ServiceSettings
            self.extra.append((("*." if entry.startswith("*.") else "") + parsed[0], parsed[1]))
        bound = settings.host.strip().lower().strip("[]")
        self.names = set() if bound in WILDCARD_ADDRESSES else {bound}
        if is_loopback(bound):
            self.names |= LOOPBACK_NAMES
        else:  # reachable from elsewhere: by this machine's name too
            self.names.add(socket.gethostname().lower())

    def allows(self, host: str, server: tuple[str, int | None] | None, scheme: str) -> bool:
        if self.any:
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        port = port if port is not None else DEFAULT_PORTS.get(scheme, 80)
        for pattern, pattern_port in self.extra:
            named = name.endswith(pattern[1:]) if pattern.startswith("*.") else name == pattern
            if named and pattern_port in (None, port):
                return True
        local_ip = _address(server[0]) if server else None
        local_port = server[1] if server and server[1] else self.port
        names = self.names | ({local_ip} if local_ip else set())
        if local_ip and is_loopback(local_ip):
            names |= LOOPBACK_NAMES
        return port == local_port and name in names


class OriginPolicy:
    """Which origins may send state-changing requests: the service's own, and `allow_origins`."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.any = "*" in settings.allow_origins
        self.allowed = set()
        for entry in settings.allow_origins:
            if entry == "*":
                continue
            origin = normalized_origin(entry)
            assert origin is not None  # checked by ServiceSettings
            self.allowed.add(origin)

    def cors_origins(self) -> list[str]:
        """The allowed origins as browsers write them (default ports left out), for the CORS answers."""
        if self.any:
            return ["*"]
        return sorted(f"{scheme}://{f'[{host}]' if ':' in host else host}"
                      f"{'' if port == DEFAULT_PORTS[scheme] else f':{port}'}" for scheme, host, port in self.allowed)

    def allows(self, origin: str, scheme: str, host: str) -> bool:
        if self.any:
            return True
        parsed = normalized_origin(origin)
        own = split_host(host)
        if parsed is None:
            return False
        if parsed in self.allowed:
            return True
        return own is not None and parsed == (scheme, own[0], own[1] or DEFAULT_PORTS.get(scheme, 80))


def _shown(value: str) -> str:
    return repr(value[:80] + ("..." if len(value) > 80 else ""))


class HostOriginGuard:
    """ASGI middleware: refuse oversized headers (431), requests for another Host (400) and cross-origin
    state-changing requests (403)."""

    def __init__(self, app: ASGIApp, hosts: HostPolicy, origins: OriginPolicy) -> None:
        self.app, self.hosts, self.origins = app, hosts, origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        scheme = scope.get("scheme", "http")
        hosts = headers.getlist("host")
        problem = None
        if sum(len(name) + len(value) + 4 for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            problem = 431, f"the request headers are larger than {MAX_HEADER_BYTES // 1024} KiB"
        elif len(hosts) != 1 or not self.hosts.allows(hosts[0], scope.get("server"), scheme):
            shown = _shown(hosts[0]) if len(hosts) == 1 else f"{len(hosts)} Host headers"
            problem = 400, (f"Host {shown} is not accepted by this service (DNS-rebinding guard); use its address, "
                            "or start it with --allow-host NAME")
        elif scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site", "")
            if origin is not None and not self.origins.allows(origin, scheme, hosts[0]):
                problem = 403, (f"cross-origin request from {_shown(origin)} refused; start the service with "
                                "--allow-origin ORIGIN to accept requests from that site's pages")
            elif origin is None and site in ("cross-site", "same-site") and not self.origins.any:
                problem = 403, "cross-site request refused (Sec-Fetch-Site); send it from the service's own page"
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, message = problem
        await JSONResponse({"error": message, "file": None}, status)(scope, receive, send)
