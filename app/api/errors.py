"""The one place where errors become HTTP responses, in the shape of the API the path belongs to.

* ``/v1`` and everything else: ``{"error": {"code": ..., "message": ...}}``;
* ``/v2`` (the Open Inference Protocol): ``{"error": "..."}``, with the protocol's statuses: it has no 422 (bad
  input is 400) and a name no task can have is an unknown model (404).

Exception handlers, the v2 routes and the pure ASGI middlewares (auth, body limits) all answer through
``error_response``/``exception_response``, so an error looks the same whichever layer refuses the request. No
traceback reaches a client: unexpected exceptions are logged here and answered with a generic 500.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.core.errors import (
    InferenceFailed,
    InvalidInput,
    InvalidTaskName,
    LimitExceeded,
    NotReady,
    Overloaded,
    ServiceError,
    StoreUnavailable,
    TaskNotFound,
    TaskUnusable,
)
from app.grafting.heads import HeadError
from app.grafting.patch import BaseMismatchError, PatchError
from app.jobs.errors import (
    CheckpointFromOtherBase,
    InvalidUpload,
    JobNotFound,
    QueueUnavailable,
    TaskExists,
    UnsupportedUpload,
)

log = logging.getLogger(__name__)


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(ServiceError):
    code = "forbidden"


# Error type -> HTTP status; the most specific class wins (lookup walks the exception's MRO).
STATUS: dict[type[Exception], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    TaskNotFound: 404,
    JobNotFound: 404,
    TaskExists: 409,
    UnsupportedUpload: 415,
    CheckpointFromOtherBase: 409,
    InvalidUpload: 422,
    QueueUnavailable: 503,
    InvalidTaskName: 422,
    InvalidInput: 422,
    LimitExceeded: 413,
    TaskUnusable: 409,
    BaseMismatchError: 409,
    PatchError: 400,
    # a task's head that cannot process a request (e.g. its template leaves no room within max_length): the
    # stored task is at fault, not the request, like any other unusable task
    HeadError: 409,
    Overloaded: 429,
    NotReady: 503,
    StoreUnavailable: 503,
    InferenceFailed: 500,
}
CODES: dict[type[Exception], str] = {
    BaseMismatchError: "base_mismatch",
    PatchError: "invalid_patch",
    HeadError: "task_unusable",
}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "limit_exceeded", 415: "unsupported_media_type"}
# A store that is full or read-only: the client gets a clean error naming the cause, never a traceback.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}
V2_PREFIX = "/v2"


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def status_of(exc: Exception) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            code = CODES.get(cls) or getattr(exc, "code", "error")
            return STATUS[cls], code
    return 500, "internal_error"


def error_response(
    path: str,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    hidden: tuple[str, ...] = (),
) -> JSONResponse:
    """An error in the shape of the API ``path`` belongs to; ``hidden`` strings (server paths) are masked."""
    for secret in hidden:
        if secret:
            message = message.replace(secret, "<store>")
    body: object = {"error": message or "invalid request"} if is_v2(path) else error_body(code, message)
    extra: dict[str, str] = {}
    if status in (429, 503):
        extra["Retry-After"] = "1"
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers={**extra, **(headers or {})} or None)


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """The first five problems of a pydantic/FastAPI validation error as one line: ``where: what; …``."""
    problems = []
    for item in list(errors)[:5]:
        where = ".".join(str(part) for part in item.get("loc", ()))
        problems.append(f"{where}: {item.get('msg', 'invalid')}" if where else str(item.get("msg", "invalid")))
    return "; ".join(problems)


def _describe(request: Request, exc: Exception) -> tuple[int, str, str, dict[str, str]]:
    """(status, code, message, headers) for ``exc``, in v1's terms."""
    if isinstance(exc, RequestValidationError):
        return 422, "validation_error", describe_validation_errors(exc.errors()) or "invalid request", {}
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 400:
            # Only body parsing raises a bare 400 (FastAPI for an undecodable JSON body, Starlette for a broken
            # multipart form): a malformed body is a 422 like any other here.
            detail = "not valid JSON" if exc.detail == "There was an error parsing the body" else str(exc.detail)
            return 422, "validation_error", f"body: {detail}", {}
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # One path may be served by several routes (GET and DELETE handlers): list every allowed method.
            headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
        return exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail), headers
    status, code = status_of(exc)
    if status != 500 or isinstance(exc, ServiceError):
        return status, code, str(exc), {}
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        log.error("store write failed on %s %s: %s", request.method, request.url.path, exc)
        message = f"the store cannot be written: {exc.strerror or 'error'}; nothing was changed"
        return 507, "store_unavailable", message, {}
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return 500, "internal_error", "internal server error", {}


def exception_response(request: Request, exc: Exception) -> JSONResponse:
    status, code, message, headers = _describe(request, exc)
    if is_v2(request.url.path):
        if isinstance(exc, InvalidTaskName):  # no task can have this name: an unknown model
            status = 404
        elif status == 422:
            status = 400
    return error_response(request.url.path, status, code, message, headers, _hidden_paths(request))


def _hidden_paths(request: Request) -> tuple[str, ...]:
    # Last line of defence: whatever an OSError put into a message, the store's location is not for clients.
    # Resolved once per app (it never changes), not on every error response.
    state = request.app.state
    hidden = getattr(state, "hidden_paths", None)
    if hidden is None:
        store = getattr(getattr(state, "settings", None), "store_dir", None)
        hidden = () if store is None else tuple(sorted({str(store), str(store.resolve())}, key=len, reverse=True))
        if store is not None:
            state.hidden_paths = hidden
    return hidden


def _allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return methods


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return exception_response(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    for kind in (ServiceError, PatchError, HeadError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _handle)


# The error responses each route documents in the OpenAPI schema.
def responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    descriptions = {
        400: "Malformed patch (the message names the problem)",
        401: "Missing or invalid API key",
        403: "The API key lacks the scope this route needs",
        404: "Unknown task",
        409: "Patch made for another base model, a stored patch that is unusable, or a task name taken",
        413: "Over a configured limit (named in the message)",
        415: "A pickle file (refused: uploads are never unpickled)",
        422: "Malformed request body or task name",
        429: "Batcher queue full: retry later",
        503: "Not ready, or the job queue or the object store is unavailable",
        507: "The store is full or read-only",
    }
    from app.api.schemas import ErrorResponse

    return {status: {"model": ErrorResponse, "description": descriptions[status]} for status in statuses}
