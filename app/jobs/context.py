"""What every job function runs with and reports through, whatever its kind (localize, stitch).

A ``JobContext`` holds the long-lived pieces of one runner process: the base model loaded once, the task store
(tasks, uploads and stitched models, local or in an object store) and the job store. The base given here must be
the runner's own copy: a localize job writes into it while it works. The helpers below are the record changes
every job kind makes the same way: start, cancellation check, storing a task patch, finish.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.store import StoredPatch, TaskStore
from app.core.store_sync import TaskNotice
from app.grafting.base import BaseModel
from app.grafting.patch import GraftPatch, load_patch, patch_to_bytes, validate_for_base
from app.jobs.inputs import UploadPaths
from app.jobs.models import JobRecord, JobState, utc_now
from app.jobs.store import JobStore


@dataclass
class JobContext:
    base_loader: Callable[[], BaseModel]
    tasks: TaskStore
    jobs: JobStore
    # Not read: uploads live in the task store (``tasks.open_upload``), wherever it is. Kept so callers that pass
    # the old fourth argument still construct a context.
    uploads_dir: Path | None = None
    # hours a failed job's upload stays for inspection; 0 deletes it when the job fails
    failed_upload_retention_h: float = 72.0
    # called after a task is (re)written, to tell the API replicas (Redis pub/sub in RQ mode)
    announce: Callable[[TaskNotice], None] | None = None
    # named datasets folder for jobs that score on them (None: the default beside the repository)
    data_dir: Path | None = None
    _base: BaseModel | None = None

    @property
    def base(self) -> BaseModel:
        if self._base is None:
            self._base = self.base_loader()
        return self._base

    def open_upload(self, job_id: str) -> AbstractContextManager[Path]:
        """The job's uploaded files in a local folder for the block (downloaded first from an object store)."""
        return self.tasks.open_upload(job_id)

    @staticmethod
    def upload_paths(folder: Path) -> UploadPaths:
        return UploadPaths(folder)


class Phases:
    """Wall time per phase, recorded into the job as it goes."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._started = time.perf_counter()
        self._phase: str | None = None

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        if self._phase is not None:
            self.timings[self._phase] = round(now - self._started, 4)
        self._phase, self._started = phase, now

    def close(self) -> dict[str, float]:
        self.enter("done")
        return self.timings


def start(ctx: JobContext, record: JobRecord, total: int) -> None:
    """Mark one attempt of the job running, in its first phase (``load``) with ``total`` steps ahead."""
    ctx.jobs.update(
        record.id,
        state=JobState.running,
        started_at=utc_now(),
        attempts=record.attempts + 1,
        progress={"phase": "load", "step": 0, "total": total},
    )


def is_cancelled(ctx: JobContext, job_id: str) -> bool:
    """Whether the job was cancelled meanwhile (by an API replica): running jobs poll this between steps."""
    current = ctx.jobs.get(job_id)
    return current is not None and current.state == JobState.cancelled


def store_task(ctx: JobContext, base: BaseModel, patch: GraftPatch, job_id: str) -> StoredPatch:
    """Write ``patch`` into the task store under its task name, validated against ``base`` before the rename."""

    def validate(path: Path) -> None:
        validate_for_base(load_patch(path), base)

    stored = ctx.tasks.write_patch(patch.task, patch_to_bytes(patch), validate, source=f"job:{job_id}")
    if ctx.announce is not None:
        ctx.announce(TaskNotice(patch.task, "written", stored.etag))
    return stored


def finish(
    ctx: JobContext,
    job_id: str,
    state: JobState,
    phases: Phases,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    ctx.jobs.update(
        job_id,
        state=state,
        result=result,
        error=error,
        finished_at=utc_now(),
        timings=phases.close(),
        progress={"phase": state.value},
    )
    if state == JobState.failed and ctx.failed_upload_retention_h <= 0:
        ctx.tasks.delete_upload(job_id)
