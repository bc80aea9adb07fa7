"""Request body limits enforced before a body is parsed: a pure ASGI middleware.

FastAPI reads a multipart form completely before a route runs, so the upload limit must act earlier: a declared
``Content-Length`` over the limit is refused at once, and a body sent without one (chunked) is cut off with 413
as soon as it passes the limit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response

# Digits as HTTP means them: ASCII only (str.isdigit() is also true for '²' and other Unicode digits).
ASCII_DIGITS = re.compile(r"[0-9]{1,20}")


def ascii_int(value: str | None) -> int | None:
    """The value of an HTTP length header, or None when it is absent or not plain ASCII digits."""
    return int(value) if value is not None and ASCII_DIGITS.fullmatch(value) else None


@dataclass(frozen=True)
class BodyLimit:
    """The first rule whose methods and path match a request sets its body limit."""

    methods: frozenset[str]
    path: re.Pattern[str]
    max_bytes: int
    setting: str


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, limits: Sequence[BodyLimit]) -> None:
        self.app = app
        self.limits = list(limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = next(
            (lim for lim in self.limits if scope["method"] in lim.methods and lim.path.fullmatch(scope["path"])), None
        )
        if limit is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = ascii_int(headers.get(b"content-length", b"").decode("latin-1"))
        if declared is not None and declared > limit.max_bytes:
            reason = f"request body of {declared} bytes is larger than {limit.setting}={limit.max_bytes}"
            await _refuse(scope, receive, send, reason)
            return
        received = 0
        started = refused = False

        async def counted_receive() -> Message:
            nonlocal received, refused, started
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    # Answer now and tell the app the client is gone: whatever it tries to send is dropped.
                    refused = True
                    if not started:
                        started = True
                        reason = f"request body is larger than {limit.setting}={limit.max_bytes}"
                        await _refuse(scope, receive, send, reason)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted_receive, tracking_send)


async def _refuse(scope: Scope, receive: Receive, send: Send, message: str) -> None:
    # The rest of the body is never read: close the connection rather than drain it.
    response = error_response(scope["path"], 413, "limit_exceeded", message, {"Connection": "close"})
    await response(scope, receive, send)
