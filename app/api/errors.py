"""The one place where errors become HTTP responses: ``{"error": {"code": ..., "message": ...}}``.

No traceback reaches a client: unexpected exceptions are logged here and answered with a generic 500.
"""

from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.api.auth import Forbidden, Unauthorized
from app.core.errors import (
    InferenceFailed,
    InvalidInput,
    InvalidTaskName,
    LimitExceeded,
    NotReady,
    Overloaded,
    ServiceError,
    TaskNotFound,
    TaskUnusable,
)
from app.grafting.patch import BaseMismatchError, PatchError
from app.jobs.errors import InvalidUpload, JobNotFound, QueueUnavailable, TaskExists, UnsupportedUpload

log = logging.getLogger(__name__)

# Error type -> HTTP status; the most specific class wins (lookup walks the exception's MRO).
STATUS: dict[type[Exception], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    TaskNotFound: 404,
    JobNotFound: 404,
    TaskExists: 409,
    UnsupportedUpload: 415,
    InvalidUpload: 422,
    QueueUnavailable: 503,
    InvalidTaskName: 422,
    InvalidInput: 422,
    LimitExceeded: 413,
    TaskUnusable: 409,
    BaseMismatchError: 409,
    PatchError: 400,
    Overloaded: 429,
    NotReady: 503,
    InferenceFailed: 500,
}
CODES: dict[type[Exception], str] = {BaseMismatchError: "base_mismatch", PatchError: "invalid_patch"}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "limit_exceeded", 415: "unsupported_media_type"}


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def status_of(exc: Exception) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            code = CODES.get(cls) or getattr(exc, "code", "error")
            return STATUS[cls], code
    return 500, "internal_error"


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    status, code = status_of(exc)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(code, str(exc)), status_code=status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for item in exc.errors()[:5]:
        where = ".".join(str(part) for part in item.get("loc", ()))
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return JSONResponse(error_body("validation_error", "; ".join(problems) or "invalid request"), status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # FastAPI's answer to an undecodable body: a malformed body is a 422 like any other here.
        return JSONResponse(error_body("validation_error", "body: not valid JSON"), status_code=422)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        # One path may be served by several routes (GET and DELETE handlers): list every allowed method.
        headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers or None)


def _allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return methods


# A store that is full or read-only: the client gets a clean error naming the cause, never a traceback.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        log.error("store write failed on %s %s: %s", request.method, request.url.path, exc)
        message = f"the store cannot be written: {exc.strerror or exc}; nothing was changed"
        return JSONResponse(error_body("store_unavailable", message), status_code=507)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(PatchError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


# The error responses each route documents in the OpenAPI schema.
def responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    descriptions = {
        400: "Malformed patch (the message names the problem)",
        401: "Missing or invalid API key",
        403: "The API key lacks the scope this route needs",
        404: "Unknown task",
        409: "Patch made for another base model, a stored patch that is unusable, or a task name taken",
        413: "Over a configured limit (named in the message)",
        415: "A pickle checkpoint (refused: uploads are never unpickled)",
        422: "Malformed request body or task name",
        429: "Batcher queue full: retry later",
        503: "Not ready, or the job queue is unavailable",
        507: "The store is full or read-only",
    }
    from app.api.schemas import ErrorResponse

    return {status: {"model": ErrorResponse, "description": descriptions[status]} for status in statuses}
