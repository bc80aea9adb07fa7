"""Errors of the serving layers below HTTP. Each carries a stable machine-readable ``code``; the HTTP status for
each type is decided in one place only (``app.api.errors``), so the engine, the CLI and the KServe v2 routes
share these without knowing about HTTP."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client may see; ``str(error)`` is the client-facing message (no internals)."""

    code = "service_error"


class InvalidTaskName(ServiceError):
    code = "invalid_task_name"


class TaskNotFound(ServiceError):
    code = "task_not_found"


class TaskUnusable(ServiceError):
    """The store holds a patch under this name that fails validation (e.g. written by another process)."""

    code = "task_unusable"


class LimitExceeded(ServiceError):
    """A request over a configured limit; the message names the limit and its value."""

    code = "limit_exceeded"


class InvalidInput(ServiceError):
    code = "invalid_input"


class Overloaded(ServiceError):
    """The batcher queue is full: the client should retry later rather than queue without bound."""

    code = "overloaded"


class NotReady(ServiceError):
    code = "not_ready"


class InferenceFailed(ServiceError):
    """The forward pass raised; the base weights were restored and the engine keeps serving."""

    code = "inference_failed"


class StoreUnavailable(ServiceError):
    """The shared task store (an object store) cannot be reached or refuses us: what this replica has cached keeps
    serving, anything else waits until it answers again."""

    code = "store_unreachable"
