"""ASGI middleware in front of every route: the API key and the body-size limit.

Both are plain ASGI (no `BaseHTTPMiddleware`), so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from engine.entrypoints.errors import APIError, json_response

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]

# routes anyone may call: liveness and monitoring
OPEN_PATHS = ("/health", "/metrics")


class APIKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on every route but `OPEN_PATHS`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        # OPTIONS too needs the key: without it a client learns nothing of a
        # protected route, not even which methods it takes
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
            reason = "missing" if not header else "incorrect"
            error = APIError(401, f"{reason} API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
            await json_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Answers 413 to a request whose body is over `max_bytes` (by its
    Content-Length, or counted while reading a chunked body), before any route
    sees it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, send)
            return
        messages: list[dict[str, Any]] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(scope, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> dict[str, Any]:
            # the buffered body first, then the client's own messages (disconnect)
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, send: Callable) -> None:
        error = APIError(413, f"the request body is larger than the limit of {self.max_bytes} "
                              "bytes (--max-request-bytes)", code="request_too_large")

        async def no_body() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        await json_response(error)(scope, no_body, send)
