"""API keys with two scopes, checked in one place for every route.

* ``read``: classify, list and read tasks, jobs and metadata (every GET, plus the inference POSTs).
* ``admin``: everything ``read`` may, plus uploads, deletes, cancels, patch PUTs and stitching (every other
  write). An unknown write route is admin-only by default, so a new route cannot be left open by accident.

Keys travel as ``Authorization: Bearer <key>`` and are compared in constant time. With no keys configured the
service runs open (``create_app`` says so loudly when it binds beyond loopback).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.errors import ServiceError

Scope = Literal["read", "admin"]
# Liveness/readiness probes, the API description and the dashboard page answer without a key.
# The dashboard page itself is static HTML; the API calls it makes carry the key the user enters.
OPEN_PATHS = re.compile(r"^/(|health|ready|docs|redoc|openapi\.json|v2/health/(live|ready))/?$")
# Writes that only read: inference.
READ_WRITES = re.compile(r"^/(v1/classify|v2/models/[^/]+(/versions/[^/]+)?/infer)/?$")

bearer = HTTPBearer(auto_error=False, description="API key with the `read` or `admin` scope")


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(ServiceError):
    code = "forbidden"


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


BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


async def authorize(request: Request, credentials: BearerCredentials) -> None:
    """App-wide dependency: the route's scope from its method and path, then the key's scopes."""
    keys: KeyRing | None = getattr(request.app.state, "keys", None)
    if keys is None or not keys.enabled:
        return
    scope = required_scope(request.method, request.url.path)
    if scope is None:
        return
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    held = keys.scopes_of(credentials.credentials)
    if not held:
        raise Unauthorized("the API key is not valid")
    if scope not in held:
        raise Forbidden(f"this API key lacks the '{scope}' scope needed for {request.method} {request.url.path}")
