"""Errors of the job system (uploads, job lookup, the queue, stitched models). Each keeps its stable ``code``; the
HTTP status of each type is decided in ``app.api.errors`` only."""

from __future__ import annotations

from app.core.errors import ServiceError, TaskNotFound


class JobNotFound(ServiceError):
    code = "job_not_found"


class TaskExists(ServiceError):
    """The name is taken and the submission did not ask to replace it."""

    code = "task_exists"


class InvalidUpload(ServiceError):
    """An upload that cannot become a task; the message names the part and the problem."""

    code = "invalid_upload"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnsupportedUpload(InvalidUpload):
    """Pickle checkpoints (and other formats that would need unpickling) are refused outright."""

    code = "unsupported_upload"


class CheckpointFromOtherBase(InvalidUpload):
    """A checkpoint fine-tuned from another base model (its declared fingerprint, or its frozen tensors, differ)."""

    code = "base_mismatch"


class QueueUnavailable(ServiceError):
    """The job queue (Redis) cannot be reached: submissions fail cleanly, serving goes on."""

    code = "queue_unavailable"


class StitchNotFound(TaskNotFound):
    """No stitched model of that name (answered 404 like an unknown task)."""

    code = "stitch_not_found"
