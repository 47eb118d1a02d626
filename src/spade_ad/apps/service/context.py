"""Every request's context: a request id on every answer, internal errors logged (never shown), and connections
closed after an answer sent before the request's body was read.

The request id is the client's (or reverse proxy's) `X-Request-ID` when it is a short token
(`[A-Za-z0-9._:-]{1,64}`), else a fresh random one; it is in `request.state.request_id` and in the `X-Request-ID`
header of every answer the application sends. An exception no handler turned into an answer is logged (logger
`spade_ad.apps.service`, with its traceback and the request id) and answered `{"error": "internal error",
"request_id": ...}` with status 500: no exception text, paths or library details reach the client.
"""

from __future__ import annotations

import logging
import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["REQUEST_ID_HEADER", "RequestContext", "logger"]

REQUEST_ID_HEADER = "X-Request-ID"
_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
logger = logging.getLogger("spade_ad.apps.service")


def _expects_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    return (length is not None and length.strip() != "0") or "chunked" in headers.get("transfer-encoding", "").lower()


class RequestContext:
    """ASGI middleware (outermost): request id, `X-Content-Type-Options: nosniff`, generic 500 answers, and
    `Connection: close` on an answer sent while the request's body was still unread (a refused upload's remaining
    bytes are not waited for)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _TOKEN.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        body_read = not _expects_body(headers)
        started = False

        async def receive_counted() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_read = True
            return message

        async def send_marked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                answer = MutableHeaders(scope=message)
                answer[REQUEST_ID_HEADER] = request_id
                answer.setdefault("X-Content-Type-Options", "nosniff")
                if not body_read:
                    answer["Connection"] = "close"
            await send(message)

        try:
            await self.app(scope, receive_counted, send_marked)
        except Exception as exc:
            logger.error("request %s (%s %s) failed: %s: %s", request_id, scope.get("method"), scope.get("path"),
                         type(exc).__name__, exc, exc_info=exc)
            if started:  # the answer is under way: all that can be done is to break the connection
                raise
            await JSONResponse({"error": "internal error", "request_id": request_id}, 500)(
                scope, receive_counted, send_marked
            )
