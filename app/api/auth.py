"""API keys with two scopes, checked in one place for every route.

* ``read``: classify, list and read tasks, jobs and metadata (every GET, plus the inference POSTs).
* ``admin``: everything ``read`` may, plus uploads, deletes, cancels, patch PUTs and stitching (every other
  write). An unknown write route is admin-only by default, so a new route cannot be left open by accident.

Keys travel as ``Authorization: Bearer <key>`` and are compared in constant time. With no keys configured the
service runs open (``create_app`` says so loudly when it binds beyond loopback).

The key is checked by ``AuthMiddleware``, a pure ASGI middleware that runs before routing, so before any body is
read, spooled or parsed: a client without a valid key costs the server one header lookup, whatever it sends.
``required_scope`` is the one table of which route needs which key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Literal

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as ASGIScope

from app.api.errors import Forbidden, Unauthorized, error_response, status_of

Scope = Literal["read", "admin"]
# Liveness/readiness probes, the API description and the dashboard page answer without a key.
# The dashboard page itself is static HTML; the API calls it makes carry the key the user enters.
OPEN_PATHS = re.compile(r"^/(|health|ready|docs|redoc|openapi\.json|v2/health/(live|ready))/?$")
# Writes that only read: inference.
READ_WRITES = re.compile(r"^/(v1/classify|v2/models/[^/]+(/versions/[^/]+)?/infer)/?$")

# How the OpenAPI document describes the key (``app.api.openapi`` adds it to every secured operation).
BEARER_SCHEME_NAME = "HTTPBearer"
BEARER_SCHEME = {"type": "http", "scheme": "bearer", "description": "API key with the `read` or `admin` scope"}


@dataclass(frozen=True)
class KeyRing:
    """Hashes of the configured keys per scope (an admin key also holds the read scope)."""

    read: tuple[bytes, ...]
    admin: tuple[bytes, ...]

    @classmethod
    def from_settings(cls, read_keys: list[str], admin_keys: list[str]) -> KeyRing:
        return cls(tuple(_digest(k) for k in read_keys), tuple(_digest(k) for k in admin_keys))

    @property
    def enabled(self) -> bool:
        return bool(self.read or self.admin)

    def scopes_of(self, key: str) -> set[Scope]:
        digest = _digest(key)
        # compare against every key (no early exit) so timing says nothing about which one matched
        is_admin = _any_equal(digest, self.admin)
        is_read = _any_equal(digest, self.read)
        scopes: set[Scope] = set()
        if is_admin:
            scopes.update(("admin", "read"))
        if is_read:
            scopes.add("read")
        return scopes


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _any_equal(digest: bytes, candidates: tuple[bytes, ...]) -> bool:
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(digest, candidate)
    return found


def required_scope(method: str, path: str) -> Scope | None:
    if OPEN_PATHS.match(path):
        return None
    if method in ("GET", "HEAD", "OPTIONS") or READ_WRITES.match(path):
        return "read"
    return "admin"


def check_key(keys: KeyRing, method: str, path: str, authorization: str | None) -> None:
    """Raise ``Unauthorized`` or ``Forbidden`` unless the ``Authorization`` header grants what the route needs."""
    if not keys.enabled:
        return
    scope = required_scope(method, path)
    if scope is None:
        return
    scheme, _, key = (authorization or "").strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    held = keys.scopes_of(key)
    if not held:
        raise Unauthorized("the API key is not valid")
    if scope not in held:
        raise Forbidden(f"this API key lacks the '{scope}' scope needed for {method} {path}")


class AuthMiddleware:
    """Refuses a request without the key its route needs before the app sees it (so before its body is read)."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            check_key(self.keys, scope["method"], scope["path"], headers.get("authorization"))
        except (Unauthorized, Forbidden) as exc:
            status, code = status_of(exc)
            # The body is never read: close the connection after answering rather than drain what the client sends.
            has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
            extra = {"Connection": "close"} if has_body else None
            await error_response(scope["path"], status, code, str(exc), extra)(scope, receive, send)
            return
        await self.app(scope, receive, send)
